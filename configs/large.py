"""Large: ~820M parameters, for TPU pod slices (v4-32, v5p-32, v5e-64 and up) or multi-GPU hosts.

Not v5e-16: its 16 GiB chips are 0.6 GiB short (`python -m mgpt.aot`; tpu/README.md).

Parameters and optimizer state are sharded over all devices (fsdp=-1). Blocks are
scanned (compile time independent of depth) and fully rematerialised, and each step
accumulates 2 microbatches, so that 2048-event contexts fit a v4-32; on bigger slices
`--config.model.remat=dots` is faster where it fits (`python -m mgpt.aot` tells;
tpu/README.md has the table).
"""

from configs import common


def get_config():
    c = common.base()
    c.data.seq_len = 2048
    c.data.num_packing_bins = 512
    c.data.read_threads = 8
    c.data.prefetch = 4
    c.model.update(
        num_layers=16, num_heads=16, d_model=2048, mlp_dim=5632, max_len=2048, dtype="bfloat16",
        remat="full", scan_layers=True,
    )
    c.train.update(
        steps=100_000, batch_size=512, grad_accum=2, learning_rate=3e-4, warmup_steps=2000, z_loss=1e-4,
        log_every=50, eval_every=2000, eval_batches=8, checkpoint_every=1000,
    )
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
