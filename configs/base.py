"""Base: ~100M parameters, for one GPU or a small TPU slice (v4-8 / v5e-8).

Data parallel (parameters replicated). Blocks are scanned and rematerialised except for
their matmul outputs (remat='dots'), and each step accumulates 2 microbatches: XLA's
attention holds rows x heads x 2048 x 2048 scores per layer, which is what has to fit
(`python -m mgpt.aot` gives the figures; see tpu/README.md). remat='full' needs about
half the memory and does 17% more FLOPs.
"""

from configs import common


def get_config():
    c = common.base()
    c.data.seq_len = 2048
    c.data.num_packing_bins = 256
    c.data.read_threads = 4
    c.data.prefetch = 4
    c.model.update(
        num_layers=12, num_heads=12, d_model=768, mlp_dim=2560, max_len=2048, dtype="bfloat16",
        remat="dots", scan_layers=True,
    )
    c.train.update(
        steps=50_000, batch_size=128, grad_accum=2, learning_rate=6e-4, warmup_steps=2000, z_loss=1e-4,
        log_every=50, eval_every=1000, eval_batches=16, checkpoint_every=1000,
    )
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
