"""Controls: the small demo model trained with attribute control tokens (docs/controls.md).

    python -m mgpt.train --config=configs/controls.py --workdir=runs/controls

About 16 minutes on one free CPU core. At the start of every 2 s segment of its pieces the model
reads that segment's note density, polyphony, register, loudness and mode (8 levels each, mode
major/minor/none), each left out of a training row with probability 0.5, so `mgpt.generate
--controls`/`--mood` and `mgpt.live`'s steer menus can ask for any subset of them.

No fill-in-the-middle rows: controls and infilling are not combined yet. 8 rows x 1,440 steps (the
same tokens as small.py's 16 x 720): on the controls sweep this model's requests cost 2.0 points of
style accuracy against 8-9 for the 16 x 720 one, and it follows polyphony more closely
(docs/controls.md).
"""

from configs import small


def get_config():
    c = small.get_config()
    c.data.control_seconds = 2.0
    c.data.fim_rate = 0.0
    c.train.update(batch_size=8, steps=1440, eval_every=240, checkpoint_every=240)
    return c
