"""Small: the CPU demo. About 5-6 minutes on 2 free CPU cores (~4,900 tokens/s, 1.5 M
training tokens, ~4 passes over the demo corpus); validation ends near 1.5 nats/event."""

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
    c.train.update(
        steps=360, batch_size=16, learning_rate=2e-3, warmup_steps=40, weight_decay=0.05,
        log_every=20, eval_every=120, eval_batches=5, checkpoint_every=120,
    )
    return c
