"""Small: the CPU demo. About 11 minutes on 2 free CPU cores, install included (~5,800 tokens/s,
2.95 M training tokens, ~8 passes over the demo corpus); validation ends near 1.02 nats/event (Muon).

720 steps, not 480: on the same data and seed, validation 1.184 against 1.282; at the default sampling
settings, both sampled with the earlier note-length guard, British/Irish folk notes 0.90x the test
pieces' length against 0.72x and feature overlap 0.906x the ceiling against 0.849x (README, Results),
for about 2.5 minutes more. (480 had replaced 360 the same way: validation 1.29-1.30 against 1.35-1.39.)
"""

from configs import common


def get_config():
    c = common.base()
    c.data.seq_len = 256
    # Every tenth segment unconditioned: the demo model can then sample with --guidance.
    c.data.style_dropout = 0.1
    # A quarter of the rows trained for fill-in-the-middle, so the demo model can --infill. Kept to a
    # quarter because this small, briefly trained model is also the continuation demo; FIM rows still
    # predict every event of their crop, so what the other three quarters lose is little (README).
    c.data.fim_rate = 0.25
    c.model.update(num_layers=4, num_heads=4, d_model=192, mlp_dim=512, max_len=256)
    # The notes sounding, as an input (mgpt.model.gpt.heard_counts; the demo corpus has 88 pitches).
    # The same run without it, seed 0: validation 1.1452 against 1.0939; the LSTM, which tracks
    # held notes in its state, 1.1532. Without it the GPT predicted which note ends worse than the
    # LSTM (docs/recipe.md).
    c.model.sounding_pitches = 88
    # Muon for the blocks' matrices (AdamW for the rest): same seed, validation 1.0205 against AdamW's
    # 1.0939, and ahead at every evaluation; 1.0277 against 1.1356 for seed 1 (docs/recipe.md).
    c.train.update(
        steps=720, batch_size=16, learning_rate=2e-3, warmup_steps=40, weight_decay=0.05, optimizer="muon",
        log_every=20, eval_every=120, eval_batches=5, checkpoint_every=120,
    )
    return c
