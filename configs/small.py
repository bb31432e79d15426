"""Small: the CPU demo. About 6-7 minutes on 2 CPU cores, then it plays recognisable music."""

from configs import common


def get_config():
    c = common.base()
    c.data.seq_len = 256
    c.model.update(num_layers=4, num_heads=4, d_model=192, mlp_dim=512, max_len=256)
    c.train.update(
        steps=400, batch_size=16, learning_rate=2e-3, warmup_steps=40, weight_decay=0.05,
        log_every=20, eval_every=100, eval_batches=4, checkpoint_every=100,
    )
    return c
