"""Large: ~820M parameters, for TPU pod slices; planned for v5e-256.

The defaults are what `python -m mgpt.aot --config=configs/large.py --topology=v5e-256 --plan`
found best at this config's batch (512 rows of 2048 events, 2 per chip): blocks scanned and
rematerialised except for their matmul outputs (remat='dots', 4.7 % more matmul FLOPs than
6N + attention, against 27 % for 'full'), no gradient accumulation, and the chips split 128-way
data parallel x 2-way fsdp (data=-1, fsdp=2). On paper that step is 79.8 % MFU without overlap,
sending 4.59 GiB per chip per step, at 13.65 GiB of HBM per chip (docs/tpu_plan.md; a model,
not a measurement). The plan's overall winner doubles the batch (82.9 %).

The same defaults compile on v5p-128 (92.0 % without overlap, 33 % of HBM) and v6e-64 (86.7 %,
but 91 % of HBM: take --config.train.grad_accum=2 there or plan the slice). Smaller slices
(v4-32, v5p-32, v5e-64) hold 8 to 32 rows per chip and need all chips in fsdp and more
microbatches: on v4-32 `--config.train.grad_accum=4 --config.mesh.data=1 --config.mesh.fsdp=-1`
fits (76 % of HBM, 86.4 % without overlap), where remat='full' with grad_accum=2 gave 75.9 %
(or run the planner for the slice). Not v5e-16: its 16 GiB chips are too small either way.
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
        remat="dots", scan_layers=True,
    )
    c.train.update(
        steps=100_000, batch_size=512, grad_accum=1, learning_rate=3e-4, warmup_steps=2000, z_loss=1e-4,
        log_every=50, eval_every=2000, eval_batches=8, checkpoint_every=1000,
    )
    c.mesh.update(data=-1, fsdp=2, tensor=1)
    return c
