"""Train a music GPT: `python -m mgpt.train --config=configs/tiny.py --workdir=W [--config.train.steps=100]`.

The same command runs on a laptop CPU, a GPU, or every host of a TPU pod slice, and
re-running it resumes from the latest checkpoint in `W/checkpoints`. A resumed run's
losses are bitwise identical to an uninterrupted one (same data order, same state).

One jitted train step: AdamW (warmup + cosine, global-norm clip), optional in-step
gradient accumulation, in/out shardings derived with `jax.eval_shape` over init and
the logical-axis rule table `config.mesh.rules`, donated state.

Inference code loads a trained model with `mgpt.train.checkpoint.restore_model(workdir)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from flax import nnx

from mgpt.train import checkpoint as ckpt_lib
from mgpt.train import config as config_lib
from mgpt.train import mesh as mesh_lib
from mgpt.model import kinds as models
from mgpt.train import monitor
from mgpt.errors import (ExitOnInterrupt, UserError, is_disk_full, not_disk_full, quiet_after_disk_full,
                         quiet_dead_event_loop, reported)
from mgpt.train.workdir_lock import WorkdirLock


class NonFiniteLoss(RuntimeError):
    """The run diverged: a failure of the run, not of its inputs (exit code 1, one line)."""


class DataWorkerDied(RuntimeError):
    """A grain worker process died (killed, out of memory): one line, exit code 1."""


def _worker_died_line(e: BaseException, workers: int, step: int, saved_step, directory) -> str:
    import re

    code = re.search(r"exit code (-?\d+)", str(e))
    how = ""
    if code:
        n = int(code.group(1))
        how = f" (killed by signal {-n}{', perhaps by the out-of-memory killer' if n == -9 else ''})" if n < 0 \
            else f" (exit code {n})"
    where = f"checkpoint {directory}/{saved_step}" if saved_step is not None else "no checkpoint yet"
    return (f"step {step}: a data worker process (one of config.data.workers={workers} per shard) died{how}; "
            f"the run stopped, its last {where}; re-run the same command to resume")


# ----------------------------------------------------------------------------- optimizer + step


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.learning_rate,
        warmup_steps=t.warmup_steps,
        decay_steps=t.steps,
        end_value=t.learning_rate * t.min_lr_ratio,
    )


# Muon's view of each hidden matrix, by the last two names of its path, axes counted from the end so
# a scanned model's leading layers axis is a batch axis: (reduction axes, output axes). q, k and v,
# the MLP's gate and input halves, and an LSTM's four gates are orthogonalized separately (their
# middle axes are batch axes). Embeddings, readouts and norm scales are not listed: AdamW takes them.
_MUON_AXES = {
    ("attn", "qkv"): (-4, (-2, -1)), ("attn", "out"): ((-3, -2), -1),
    ("mlp", "wi"): (-3, -1), ("mlp", "wo"): (-2, -1),
    ("*", "w_x"): (-3, -1), ("*", "w_h"): (-3, -1),  # mgpt.model.lstm.LSTMLayer
}


def _muon_dims(params):
    def dims(path, x):
        names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if names and names[-1] == "value":  # an nnx Variable's array
            names = names[:-1]
        axes = _MUON_AXES.get(tuple(names[-2:])) or _MUON_AXES.get(("*", names[-1]) if names else None)
        if axes is None:
            return None
        return optax.contrib.MuonDimensionNumbers(reduction_axis=axes[0], output_axis=axes[1])

    return jax.tree_util.tree_map_with_path(dims, params)


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    # Decay matrices only: norm scales (and other vectors) are left alone.
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
    kind = t.get("optimizer", "adamw")
    if kind == "muon":
        # The blocks' matrices take Nesterov momentum (beta 0.95) orthogonalized by Newton-Schulz,
        # scaled to AdamW's update size (consistent_rms=0.2) so one learning rate serves both, and
        # decayed. The rest (embeddings, readout, norm scales) takes optax.contrib.muon's Adam half:
        # Nesterov Adam with train.b1/b2, not decayed. That is the optimizer measured in docs/recipe.md.
        opt = optax.contrib.muon(
            learning_rate_schedule(t), beta=0.95, weight_decay=t.weight_decay, weight_decay_mask=decay_mask,
            adam_b1=t.b1, adam_b2=t.b2, eps=t.eps, adam_weight_decay=0.0,
            muon_weight_dimension_numbers=_muon_dims, consistent_rms=0.2,
        )
    else:
        opt = optax.adamw(
            learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask
        )
    if t.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(t.clip_norm), opt)
    return opt


def activation_sharding(batch_sharding):
    """Sharding of BxLxD activations: rows where the batch's rows are, D whole on each device."""
    if batch_sharding is None:
        return None
    spec = jax.sharding.PartitionSpec(*batch_sharding.spec, *[None] * (2 - len(batch_sharding.spec)), None)
    return jax.sharding.NamedSharding(batch_sharding.mesh, spec)


def _loss_sums(graphdef, params, batch, z_loss: float, batch_sharding=None, dropout_key=None):
    """(sum of masked cross-entropy, sum of masked log(Z)^2) in nats, fp32. `dropout_key`
    (training only) turns on the model's dropout."""
    model = nnx.merge(graphdef, params)
    # Packed rows (mgpt.train.data) carry positions and segment ids; a batch without them is one piece per row.
    extra = {} if dropout_key is None else {"dropout_key": dropout_key}
    logits_BxLxV = model(batch["inputs"], batch.get("positions"), batch.get("segment_ids"),
                         activation_sharding=activation_sharding(batch_sharding), **extra).astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BxL = batch["mask"]
    ce = jnp.sum((log_z_BxL - target_logit_BxL) * mask_BxL)
    z = jnp.sum(jnp.square(log_z_BxL) * mask_BxL) if z_loss else jnp.zeros((), jnp.float32)
    return ce, z


def make_train_step(graphdef, tx, t: ml_collections.ConfigDict, batch_sharding, dropout_seed: int | None = None):
    """state, batch -> state, metrics. Pure; jit it with shardings (see `compile_train_step`).

    With `dropout_seed` (a model with dropout > 0), step s draws its dropout masks from
    fold_in(key(dropout_seed), s), so a resumed run draws the same masks. The key is XLA's
    RngBitGenerator ('rbg'), not threefry: on a CPU it draws dropout's masks in about half the time."""
    schedule = learning_rate_schedule(t)
    accum, z_loss = t.grad_accum, t.z_loss

    def train_step(state, batch):
        params = state["params"]
        # Normalise by the whole batch's target count, so accumulation changes nothing but memory.
        count = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
        step_key = None
        if dropout_seed is not None:
            step_key = jax.random.fold_in(jax.random.key(dropout_seed, impl="rbg"), state["step"])

        def objective(p, microbatch, key=None):
            ce, z = _loss_sums(graphdef, p, microbatch, z_loss, batch_sharding, key)
            return (ce + z_loss * z) / count, ce

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if accum == 1:
            (loss, ce), grads = grad_fn(params, batch, step_key)
        else:
            # Row r goes to microbatch r % accum: every microbatch stays spread over the batch shards.
            def split(x_BxL):
                b = x_BxL.shape[0]
                x = x_BxL.reshape(b // accum, accum, *x_BxL.shape[1:]).swapaxes(0, 1)
                spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
                return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(batch_sharding.mesh, spec))

            micro = jax.tree.map(split, batch)

            def body(carry, xs):
                microbatch, i = xs
                key = None if step_key is None else jax.random.fold_in(step_key, i)
                (loss_i, ce_i), g_i = grad_fn(params, microbatch, key)
                g, loss, ce = carry
                return (jax.tree.map(jnp.add, g, g_i), loss + loss_i, ce + ce_i), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss, ce), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, jnp.arange(accum)))

        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {
            "loss": loss,
            "nats_per_event": ce / count,
            "events": jnp.sum(batch["mask"]),
            "grad_norm": grad_norm,
            # Finite loss and gradients can still give an overflowing update; this norm catches
            # that, so a checkpoint is only written of a state that is finite.
            "param_norm": optax.global_norm(new_params),
            "lr": schedule(state["step"]),
        }
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, batch_sharding=None):
    def eval_step(params, batch):
        ce, _ = _loss_sums(graphdef, params, batch, 0.0, batch_sharding)
        return {"nats": ce, "events": jnp.sum(batch["mask"])}

    return eval_step


@dataclasses.dataclass
class Setup:
    """Everything derived from a config before any parameter exists (all abstract)."""

    mesh: jax.sharding.Mesh
    table: dict
    graphdef: Any
    abstract_state: dict
    state_shardings: dict
    batch_sharding: jax.sharding.NamedSharding
    tx: optax.GradientTransformation
    init_fn: Any
    model_config: Any  # config.model as its kind's dataclass (models.KINDS)
    num_params: int
    microbatch: int  # rows per forward pass, over all hosts (batch_size / grad_accum)


def setup(config, vocab_size: int, mesh, table) -> Setup:
    """Abstract train state and its shardings, via jax.eval_shape over init."""
    tx = make_optimizer(config.train)
    abstract_model = models.abstract_model(config.model, vocab_size)
    if jax.tree.leaves(nnx.state(abstract_model, nnx.Not(nnx.Param))):
        raise NotImplementedError("models with non-parameter state are not supported by the trainer")
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    model_config = models.model_config(config.model, vocab_size)

    def init_fn(seed):
        key = jax.random.PRNGKey(seed)
        with nnx.use_eager_sharding(False):
            model = models.build_model(config.model, vocab_size, nnx.Rngs(params=key))
        params = nnx.state(model, nnx.Param)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    abstract_state = jax.eval_shape(init_fn, 0)
    state_shardings = mesh_lib.tree_shardings(abstract_state, mesh, table)
    micro = config_lib.microbatch_size(config.train)
    return Setup(
        mesh=mesh,
        table=table,
        graphdef=graphdef,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        batch_sharding=mesh_lib.batch_sharding(mesh, table, micro),
        tx=tx,
        init_fn=init_fn,
        model_config=model_config,
        num_params=model_config.num_params(),
        microbatch=micro,
    )


def compile_train_step(s: Setup, config):
    replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    # Dropout masks get their own stream, derived from the run's seed.
    dropout_seed = config.seed + 1 if getattr(s.model_config, "dropout", 0) > 0 else None
    step = make_train_step(s.graphdef, s.tx, config.train, s.batch_sharding, dropout_seed)
    return jax.jit(
        step,
        # One sharding for the whole batch dict (a pytree prefix): every [batch, length] array alike.
        in_shardings=(s.state_shardings, s.batch_sharding),
        out_shardings=(s.state_shardings, replicated),
        donate_argnums=0,
        compiler_options=mesh_lib.compiler_options(mesh_lib.mesh_platform(s.mesh)),
    )


def compile_eval_step(s: Setup):
    replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        make_eval_step(s.graphdef, s.batch_sharding),
        in_shardings=(s.state_shardings["params"], s.batch_sharding),
        out_shardings=replicated,
        compiler_options=mesh_lib.compiler_options(mesh_lib.mesh_platform(s.mesh)),
    )


def abstract_batch(rows: int, seq_len: int, sharding) -> dict:
    """The batch the train and eval steps take (mgpt.train.data), as shapes: for compiling ahead of time."""
    from mgpt.train import data as data_lib

    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in data_lib.batch_shapes(rows, seq_len).items()}


def activation_bytes_per_row(s: Setup, seq_len: int) -> int:
    """Bytes the backward pass keeps per batch row of `seq_len` events: jax's residuals of the
    loss (what remat leaves saved, the logits included), traced abstractly. Taken as the
    difference between two rows and one, so the weights the residuals also hold cancel out.
    A lower bound of the step's activation memory: XLA's temporaries come on top."""
    def kept(rows: int) -> int:
        batch = abstract_batch(rows, seq_len, None)

        def residuals(params, batch):
            return jax.vjp(lambda p: _loss_sums(s.graphdef, p, batch, 0.0)[0], params)[1]

        leaves = jax.tree.leaves(jax.eval_shape(residuals, s.abstract_state["params"], batch))
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)

    return max(kept(2) - kept(1), 0)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_memory(s: Setup, config, seq_len: int) -> None:
    """Refuses, before anything is allocated, a model or batch that cannot fit one device.

    Weights and optimizer state alone, then a train step's lower bound (those, the gradients
    and the activations kept for the backward pass), against the device's memory limit
    (host RAM on a CPU). Without the check such a run sits for minutes initialising, or
    grows until the machine runs out of memory."""
    limit, what = mesh_lib.memory_limit()
    if limit is None:
        return
    state = mesh_lib.bytes_per_device(s.abstract_state, s.state_shardings)
    if state > limit:
        raise UserError(
            f"config.model: {s.num_params:,} parameters need {_size(state)} per device for weights and optimizer "
            f"state, more than the {_size(limit)} of {what}; use a smaller model (d_model, num_layers, mlp_dim) "
            "or shard it over more devices (config.mesh.fsdp)")
    grads = mesh_lib.bytes_per_device(s.abstract_state["params"], s.state_shardings["params"])
    rows = s.batch_sharding.shard_shape((s.microbatch, seq_len))[0]
    per_row = activation_bytes_per_row(s, seq_len)
    need = state + grads + rows * per_row
    if need > limit:
        t = config.train
        raise UserError(
            f"config.train.batch_size={t.batch_size}: a train step needs at least {_size(need)} per device "
            f"({rows:,} rows x {_size(per_row)} of activations kept for the backward pass, plus "
            f"{_size(state + grads)} of weights, gradients and optimizer state), more than the {_size(limit)} of "
            f"{what}; lower config.train.batch_size, raise config.train.grad_accum or set config.model.remat=full")


def global_batch(local: dict, sharding) -> dict:
    """This host's rows -> global arrays laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# ----------------------------------------------------------------------------- loop


def _print0(*args) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the run described by `config` in `workdir`.

    Returns {'step', 'losses': {step: loss}, 'events': {step: predicted tokens}, 'eval': {step: nats/event},
    'stopped_by'}; `events` fingerprints the data each step saw.
    Raises WorkdirInUse at once when another live trainer holds `workdir`.
    """
    with contextlib.ExitStack() as held:  # the workdir lock, released however the run ends
        return _train(config, workdir, held)


def _train(config: ml_collections.ConfigDict, workdir: str, held: contextlib.ExitStack) -> dict:
    config_lib.validate(config)
    mesh_lib.maybe_initialize_distributed(**config.distributed)
    mesh, table = config_lib.validate_devices(config, jax.device_count(), jax.process_count())
    workdir = epath.Path(workdir)
    # Creates the workdir and locks it, before anything in it is read or written.
    held.enter_context(WorkdirLock(workdir))
    config_lib.check_same_model(workdir, config)
    mesh_lib.use_compilation_cache(config.train.compilation_cache, workdir)

    # The input pipeline (grain) is imported here, not with the module: the model and the
    # train step import without it (benchmarks/gpu_check.py feeds synthetic rows).
    from mgpt.train import data as data_lib

    t, d = config.train, config.data
    dataset_path = data_lib.resolve_dataset(d.dataset_dir)
    vocab = data_lib.choose_vocab(dataset_path, workdir, config.init_from)
    if d.get("fim_rate", 0.0) and not vocab.fim:  # FIM rows need their marker tokens (appended: ids unchanged)
        if (workdir / "vocab.json").exists() or config.init_from:
            raise UserError("config.data.fim_rate: the resumed or warm-started model's vocabulary has no FIM "
                            "tokens; start a new run (or set data.fim_rate=0)")
        vocab = vocab.with_fim()
    vocab = data_lib.with_controls(vocab, dataset_path, d, resumed=(workdir / "vocab.json").exists() or config.init_from,
                                   log=_print0)
    heard = config.model.get("sounding_pitches", 0)
    if heard and heard != vocab.note_off_offset - vocab.note_on_offset:
        raise UserError(f"config.model.sounding_pitches={heard}, but the dataset's vocabulary has "
                        f"{vocab.note_off_offset - vocab.note_on_offset} pitches: set it to that, or 0")
    s = setup(config, vocab.size, mesh, table)
    seq_len = d.seq_len
    check_memory(s, config, seq_len)
    fpt = s.model_config.flops_per_token(seq_len)
    state_bytes = mesh_lib.bytes_per_device(s.abstract_state, s.state_shardings)
    _print0(
        f"model: {config.model.kind}, {s.num_params:,} parameters, {fpt / 1e6:.1f} MFLOPs/token (train), "
        f"vocab {vocab.size}, context {seq_len}"
    )
    _print0(
        f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es); params+optimizer {state_bytes / 2**20:,.1f} MiB/device"
    )

    # Measured before the input pipeline exists, so nothing of ours shares the cores with
    # it. A low peak inflates MFU: one demo run measured 84 GFLOP/s on cores that reach
    # ~150 and printed 68% for a step that bench_train puts at 39%.
    peak, peak_source = monitor.peak_flops(config.model.get("dtype", "float32"))

    pi, pc = jax.process_index(), jax.process_count()
    val_source = data_lib.validation_source(dataset_path, d.dataset_dir, pc, log=_print0)
    eval_data = None  # built on first use

    ckpts = ckpt_lib.Checkpoints(workdir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpoints)
    config_json = json.loads(json.dumps(config.to_dict()))
    # A resumed run keeps the data shards it started with, whatever the host count now.
    saved_shards = ckpts.data_shards()
    num_shards = saved_shards or d.shards or pc
    try:
        train_ds = data_lib.train_dataset(
            data_lib.open_source(dataset_path, "train", training_only=True),
            vocab,
            seq_len=seq_len,
            batch_size=t.batch_size // pc,
            seed=config.seed,
            transpose=d.transpose,
            style_dropout=float(d.get("style_dropout", 0.0)),
            fim_rate=float(d.get("fim_rate", 0.0)),
            control_dropout=float(d.get("control_dropout", 0.5)),
            num_packing_bins=d.num_packing_bins,
            read_threads=d.read_threads,
            prefetch=d.prefetch,
            workers=d.workers,
            num_shards=num_shards,
            process_index=pi,
            process_count=pc,
        )
    except ValueError as e:
        if isinstance(e, UserError):  # a damaged shard: its own line
            raise
        fixed = " (fixed by the run's first start)" if saved_shards else ""
        raise UserError(f"config.data.shards={num_shards}{fixed}, dataset {d.dataset_dir}: {e}") from None
    train_iter = iter(train_ds)
    abstract = ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
    restored = ckpts.restore_newest(abstract, train_iter, warn=_print0)  # a damaged newest step falls back
    latest = restored[2] if restored is not None else None
    if restored is not None:
        state, data_restored, _ = restored
        _print0(f"resumed from {ckpts.directory}/{latest}")
        if not data_restored:
            _print0(f"note: no data position usable by {pc} process(es) in that checkpoint; the data order starts afresh")
    else:
        state = jax.jit(s.init_fn, static_argnums=0, out_shardings=s.state_shardings)(config.seed)
        if config.init_from:
            config_lib.check_warm_start(config, vocab.size, s.abstract_state["params"])
            params, from_step = ckpt_lib.restore_params(config.init_from, None, abstract["params"])
            state["params"] = params
            _print0(f"warm start: weights from {config.init_from} (step {from_step})")
        ckpt_lib.write_json(workdir / "config.json", config_json)
        ckpt_lib.write_json(workdir / "vocab.json", vocab.to_json())
        ckpt_lib.write_json(workdir / "versions.json", ckpt_lib.versions())

    train_step = compile_train_step(s, config)
    eval_step = compile_eval_step(s)
    _print0(f"MFU is against {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    writer = monitor.MetricWriter(str(workdir / "tb"))

    step = int(jax.device_get(state["step"]))
    start_step = step
    stop_at = t.steps if not t.max_steps_per_run else min(t.steps, step + t.max_steps_per_run)
    tokens_per_step = t.batch_size * seq_len
    result = {"step": step, "losses": {}, "events": {}, "eval": {}, "stopped_by": None, "num_params": s.num_params,
              "flops_per_token": fpt}
    saved_step = latest

    def save(at_step):
        nonlocal saved_step
        if saved_step != at_step:
            ckpts.save(at_step, state, train_iter, config_json, vocab.to_json())
            saved_step = at_step

    def evaluate(at_step):
        nonlocal eval_data
        if val_source is None:
            return
        if eval_data is None:
            eval_data = [
                global_batch(b, s.batch_sharding)
                for b in data_lib.eval_batches(
                    val_source, vocab, seq_len=seq_len, batch_size=s.microbatch // pc,
                    num_batches=t.eval_batches, num_packing_bins=d.num_packing_bins, process_index=pi,
                    process_count=pc,
                )
            ]
        sums = [eval_step(state["params"], b) for b in eval_data]
        sums = jax.device_get(sums)
        nats = float(sum(x["nats"] for x in sums))
        events = float(sum(x["events"] for x in sums))
        if events == 0:
            _print0(f"eval  step {at_step:>6}: the validation split is empty")
            return
        npe = nats / events
        result["eval"][at_step] = npe
        writer.write(
            at_step, "eval", {"nats_per_event": npe, "perplexity": math.exp(npe)},
            f"eval  step {at_step:>6} | validation nats/event {npe:.4f} | perplexity {math.exp(npe):.2f} "
            f"| {int(events):,} events",
        )

    log = monitor.TrainLog(writer, total_steps=t.steps, log_every=t.log_every, tokens_per_step=tokens_per_step,
                           flops_per_token=fpt, peak_flops=peak, peak_measured=peak_source.startswith("measured"))

    def consume(at_step, metrics):
        """Host side of step `at_step`: the finite check, then logging."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "param_norm")):
            ckpts.wait()
            good = ckpts.latest_step()
            where = f"step {good} in {ckpts.directory}" if good is not None else "none (no checkpoint yet)"
            raise NonFiniteLoss(
                f"step {at_step}: non-finite training (loss {m['loss']}, gradient norm {m['grad_norm']}, "
                f"parameter norm {m['param_norm']}); stopped without saving. Last good checkpoint: {where}. "
                "Lower config.train.learning_rate or raise warmup_steps, then re-run to resume from it."
            )
        result["losses"][at_step] = m["loss"]
        result["events"][at_step] = m["events"]
        log.add(at_step, m, force=at_step == stop_at)

    pending = None
    # Over the final wait too: a first Ctrl-C while the last checkpoint is written lets it finish.
    with ckpt_lib.StopSignal(multi_process=pc > 1, abort_line=lambda: _interrupted_line(workdir)) as stop:
        try:
            while step < stop_at:
                try:
                    local_batch = next(train_iter)
                except RuntimeError as e:
                    if "Worker process was terminated" not in str(e):
                        raise
                    if pending is not None:
                        consume(*pending)
                        pending = None
                    try:  # the steps trained since the last checkpoint are kept when the state still saves
                        save(step)
                        ckpts.wait()
                    except Exception:  # noqa: BLE001 - then the last complete checkpoint is the one to name
                        saved_step = ckpts.latest_step()
                    raise DataWorkerDied(_worker_died_line(e, d.workers, step, saved_step, ckpts.directory)) from None
                batch = global_batch(local_batch, s.batch_sharding)
                state, metrics = train_step(state, batch)  # dispatched; runs while we log
                if pending is not None:
                    consume(*pending)
                step += 1
                pending = (step, metrics)
                stopped_by = ckpt_lib.stop_requested(stop, step, t.log_every)
                stop_now = stopped_by is not None
                checkpoint_due = step % t.checkpoint_every == 0 or step == stop_at or stop_now
                eval_due = (t.eval_every and step % t.eval_every == 0) or step == t.steps
                if checkpoint_due or eval_due:
                    consume(*pending)  # only a state whose step was finite is saved or evaluated
                    pending = None
                if eval_due:
                    try:
                        evaluate(step)
                    except Exception as e:
                        save(step)  # the steps trained so far are not lost to a failed evaluation
                        ckpts.wait()
                        e.add_note(f"evaluation at step {step} failed; checkpoint {ckpts.directory}/{step} was "
                                   "saved first: re-run to resume from it")
                        raise
                if checkpoint_due:
                    save(step)
                if eval_due or checkpoint_due:  # tokens/s measures training, not these pauses
                    log.pause(step)
                if stop_now:
                    result["stopped_by"] = stopped_by
                    break
            if pending is not None:
                consume(*pending)
        finally:
            # Each one closes even when another fails (a full disk fails several).
            with contextlib.ExitStack() as closing:
                closing.callback(train_iter.close)
                closing.callback(writer.close)
                ckpts.wait()
                ckpts.close()  # not after a failed save: closing orbax then only adds its dying writers' tracebacks

    result["step"] = step
    if result["stopped_by"]:
        _print0(f"received {result['stopped_by']}: saved checkpoint {ckpts.directory}/{step}; exiting")
    elif step < t.steps:
        _print0(f"stopped after {step - start_step} steps this run (train.max_steps_per_run); "
                f"saved {ckpts.directory}/{step}; re-run to continue")
    else:
        _print0(f"done: step {step}, checkpoint {ckpts.directory}/{step}")
    return result


# ----------------------------------------------------------------------------- command line


def main(argv, config, workdir) -> None:
    from absl import app, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config is None or not workdir:
        raise UserError("usage: python -m mgpt.train --config=configs/tiny.py --workdir=DIR [--config.FIELD=VALUE]")
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every file they touch at INFO
    # A full disk is reported once, below, not by every orbax thread and asyncio task.
    logging.get_absl_handler().addFilter(not_disk_full)
    quiet_dead_event_loop()
    try:
        # Before and after the loop, whose StopSignal saves a checkpoint first, a Ctrl-C ends the
        # command at once with its one line: raised as KeyboardInterrupt inside jax's compilation
        # at start-up, it printed that line and then crashed (SIGSEGV) or hung on the way out.
        with ExitOnInterrupt(lambda: _interrupted_line(workdir)):
            train(config, workdir)
    except (NonFiniteLoss, DataWorkerDied) as e:
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:  # a safety net: the Ctrl-C handlers above end the process themselves
        import signal

        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a further Ctrl-C ends the process at once
        raise SystemExit(_interrupted_line(workdir)) from None
    except Exception as e:
        if not is_disk_full(e):
            raise
        quiet_after_disk_full()
        steps = ckpt_lib.finalized_steps(ckpt_lib.checkpoint_dir(workdir))
        last = f"step {steps[-1]}" if steps else "none yet"
        raise SystemExit(f"disk full writing {workdir}: nothing complete was lost (last complete checkpoint: {last}); "
                         "free some space and re-run to resume") from None


def _interrupted_line(workdir: str) -> str:
    """What a Ctrl-C that stops the run before (or instead of) its stop checkpoint leaves."""
    try:
        steps = ckpt_lib.finalized_steps(ckpt_lib.checkpoint_dir(workdir))
    except (OSError, ValueError):
        steps = []
    if not steps:
        return f"interrupted: nothing was trained in {workdir} (no checkpoint yet)"
    return (f"interrupted: the steps since the last checkpoint were not saved; {ckpt_lib.checkpoint_dir(workdir)}/"
            f"{steps[-1]} is complete: re-run to resume from it")
