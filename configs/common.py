"""Defaults shared by every config; each configs/<name>.py starts from `base()`.

Every field is documented here once, the model's in mgpt.model.ModelConfig. Lengths are
in events (tokens); steps are optimizer updates; a batch is the global batch over all
hosts and devices.
"""

import dataclasses

import ml_collections

from data_prep.build import DEMO_DIR
from mgpt.model.gpt import ModelConfig

# Logical axis -> mesh axes. 'batch' shards the data; the others place parameters
# (and the optimizer moments, which follow their parameter).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),  # the stacked blocks' axis (model.scan_layers): each device holds every layer's shard
)


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, data order, crops and transpositions
    c.init_from = ""  # warm start: a workdir (or its checkpoints/ or one step dir) to take weights from

    c.data = ml_collections.ConfigDict()
    c.data.dataset_dir = DEMO_DIR  # TFDS dir; the default is built on first use
    c.data.seq_len = 512  # events per training row (the model sees seq_len, predicts seq_len)
    c.data.transpose = 5  # train-time random transposition in [-transpose, +transpose] semitones
    c.data.style_dropout = 0.0  # share of training segments conditioned on STYLE:unknown (for --guidance)
    c.data.fim_rate = 0.0  # share of training segments rearranged for fill-in-the-middle (for --infill)
    # Control tokens (data_prep/controls.py, for --controls and --mood): each piece is cut into segments of
    # this many seconds, each marked with its note density, polyphony, register, loudness and mode. 0 = off.
    c.data.control_seconds = 0.0
    c.data.control_levels = 8  # quantile bins of the training split per binned control
    c.data.control_dropout = 0.5  # chance each control token is left out of a training row (any subset can be given)
    c.data.num_packing_bins = 64  # rows packed at once: more bins, less padding
    c.data.read_threads = 1  # grain reader threads per host
    c.data.prefetch = 2  # batches prepared ahead of the device
    c.data.workers = 0  # grain worker processes per data shard (0: all in the training process)
    c.data.shards = 0  # independent data streams of the run (0: one per process); fixed at the first start,
    # so a resume on another host count (one dividing it) replays and skips nothing

    # `kind` picks the model ('gpt': mgpt.model.GPT, 'lstm': the mgpt.model.lstm baseline; mgpt.model.kinds.KINDS).
    # The other fields and their defaults are mgpt.model.ModelConfig's, documented there;
    # an LSTM reads those it has (num_layers, d_model, dtype, param_dtype).
    c.model = ml_collections.ConfigDict({"kind": "gpt", **{f.name: f.default for f in dataclasses.fields(ModelConfig)
                                                           if f.name != "vocab_size"}})
    c.model.max_len = c.data.seq_len  # context length; must be >= data.seq_len

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # total optimizer steps; the learning-rate schedule ends here
    c.train.max_steps_per_run = 0  # stop (and checkpoint) after this many steps in one invocation; 0 = no limit
    c.train.batch_size = 32  # global batch (rows of seq_len); split over hosts and the batch mesh axes
    c.train.grad_accum = 1  # microbatches per step (batch_size must divide by it)
    c.train.learning_rate = 1e-3  # peak, after warmup
    c.train.warmup_steps = 100
    c.train.min_lr_ratio = 0.1  # the cosine decays to learning_rate * min_lr_ratio at `steps`
    c.train.weight_decay = 0.1  # AdamW, on matrices only (not norm scales)
    # "adamw", or "muon": the blocks' matrices take orthogonalized momentum (beta 0.95, fixed), the
    # rest Nesterov Adam with b1/b2 below and no weight decay (mgpt/train/loop.py make_optimizer).
    c.train.optimizer = "adamw"
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.clip_norm = 1.0  # global gradient norm clip; 0 disables
    c.train.z_loss = 0.0  # weight of log(Z)^2 added to the loss (stabilises bf16 logits)
    c.train.log_every = 10  # steps between log lines / TensorBoard points
    c.train.eval_every = 200  # steps between validation passes; 0 = only at the end
    c.train.eval_batches = 8  # validation batches per pass (per host, batch_size / hosts rows each)
    c.train.checkpoint_every = 200  # steps between checkpoints (and one at the end)
    c.train.keep_checkpoints = 3  # the last K are kept
    c.train.async_checkpoints = True  # write checkpoints in the background
    # XLA's persistent compilation cache, so a restarted run loads its compiled steps instead
    # of compiling again: relative to the workdir, or an absolute / gs:// path; '' = jax's own setting.
    c.train.compilation_cache = "compilation_cache"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel replicas; -1 = all devices not used by the other axes
    c.mesh.fsdp = 1  # parameter/optimizer sharding (ZeRO-3 style)
    c.mesh.tensor = 1  # tensor parallelism over heads / mlp
    c.mesh.rules = DEFAULT_RULES

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"  # 'auto': jax.distributed when a cluster is detected | 'yes' | 'no'
    c.distributed.coordinator_address = ""  # 'host:port' for GPU clusters without auto-detection
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c
