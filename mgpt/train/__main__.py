"""Train a music GPT: `python -m mgpt.train --config=configs/tiny.py --workdir=W [--config.train.steps=100]`.

The same command runs on a laptop CPU, a GPU, or every host of a TPU pod slice, and re-running
it resumes from the latest checkpoint in `W/checkpoints` (the design: mgpt/train/loop.py).
"""

from absl import app, flags
from ml_collections import config_flags

from mgpt.errors import reported
from mgpt.train import config as config_lib
from mgpt.train import loop

if __name__ == "__main__":
    # The command's flags exist only here, so importing mgpt.train defines none.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/tiny.py.",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, config.json, vocab.json and TensorBoard logs go.")
    app.run(reported(lambda argv: loop.main(argv, _CONFIG.value, _WORKDIR.value)),
            flags_parser=reported(config_lib.parse_flags))
