"""Tiny: trains in seconds on a CPU. For tests and CI, not for music."""

from configs import common


def get_config():
    c = common.base()
    c.data.seq_len = 64
    c.data.num_packing_bins = 16
    c.model.update(num_layers=2, num_heads=2, d_model=64, mlp_dim=128, max_len=64)
    c.train.update(
        steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=5, log_every=5, eval_every=20,
        eval_batches=2, checkpoint_every=20,
    )
    return c
