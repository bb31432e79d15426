"""Train a music GPT: `python -m mgpt.train --config=configs/tiny.py --workdir=W [--config.train.steps=100]`.

The same command runs on a laptop CPU, a GPU, or every host of a TPU pod slice, and
re-running it resumes from the latest checkpoint in `W/checkpoints`. A resumed run's
losses are bitwise identical to an uninterrupted one (same data order, same state).

One jitted train step: AdamW (warmup + cosine, global-norm clip), optional in-step
gradient accumulation, in/out shardings derived with `jax.eval_shape` over init and
the logical-axis rule table `config.mesh.rules`, donated state.

Inference code loads a trained model with `restore_model(workdir)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from etils import epath
from flax import nnx
from ml_collections import config_flags

from data_prep.vocab import Vocabulary
from mgpt import checkpoint as ckpt_lib
from mgpt import mesh as mesh_lib
from mgpt import monitor
from mgpt.workdir_lock import WorkdirInUse, WorkdirLock

DEMO_DATASET_DIR = "data/music21_demo"


class ConfigError(ValueError):
    """A user mistake in the config or its inputs; printed as one line."""


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- model


def _model_module(kind: str):
    if kind == "gpt":
        from mgpt import model as module
    elif kind == "lstm":
        from mgpt import lstm as module
    else:
        raise ConfigError(f"config.model.kind: must be 'gpt' or 'lstm', got {kind!r}")
    return module


def model_config(model_config: ml_collections.ConfigDict, vocab_size: int):
    """config.model -> the dataclass config of its kind (ModelConfig or LSTMConfig)."""
    module = _model_module(model_config.kind)
    cls = module.ModelConfig if model_config.kind == "gpt" else module.LSTMConfig
    try:
        return cls.from_config(model_config, vocab_size)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.{e}" if str(e).startswith("model.") else f"config.model: {e}") from None


def build_model(model_cfg: ml_collections.ConfigDict, vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
    """The model config.model describes; called as `model(tokens_BxL) -> logits_BxLxV`."""
    cfg = model_config(model_cfg, vocab_size)
    if model_cfg.kind == "lstm":
        from mgpt.lstm import LSTMLM

        return LSTMLM(cfg, rngs=rngs)
    from mgpt.model import GPT

    return GPT(cfg, rngs=rngs)


def _abstract_model(model_cfg, vocab_size: int):
    # Sharding is ours to place: build without eager sharding so no mesh is needed here.
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: build_model(model_cfg, vocab_size, nnx.Rngs(0)))


def param_count(abstract_params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))


def flops_per_token(model_cfg, vocab_size: int, seq_len: int, num_params: int) -> float:
    """Training FLOPs per token: the model module's own count, else 6N."""
    module = _model_module(model_cfg.kind)
    if hasattr(module, "flops_per_token"):
        return float(module.flops_per_token(model_config(model_cfg, vocab_size), seq_len))
    return 6.0 * num_params


# ----------------------------------------------------------------------------- config


def _check(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {why}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Static checks, before any data or device work: one-line ConfigError naming the field."""
    d, t = config.data, config.train

    def integer(path: str, minimum: int = 1):
        section, name = path.split(".")
        v = config[section][name]
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, path,
               f"must be an integer >= {minimum}, got {v!r}")

    _check(isinstance(config.seed, int) and 0 <= config.seed < 2**31, "seed", f"must be in [0, 2^31), got {config.seed!r}")
    _check(isinstance(d.dataset_dir, str) and d.dataset_dir != "", "data.dataset_dir", "must be a directory path")
    integer("data.seq_len", 2)
    _check(isinstance(d.transpose, int) and 0 <= d.transpose <= 12, "data.transpose",
           f"must be an integer number of semitones in 0..12, got {d.transpose!r}")
    for path in ("data.num_packing_bins", "data.read_threads"):
        integer(path)
    integer("data.prefetch", 0)
    integer("data.workers", 0)
    integer("data.shards", 0)
    dropout = d.get("style_dropout", 0.0)
    _check(isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1,
           "data.style_dropout", f"must be a share in [0, 1), got {dropout!r}")
    fim_rate = d.get("fim_rate", 0.0)
    _check(isinstance(fim_rate, (int, float)) and not isinstance(fim_rate, bool) and 0 <= fim_rate <= 1,
           "data.fim_rate", f"must be a share in [0, 1], got {fim_rate!r}")

    cfg = model_config(config.model, vocab_size=1)
    if hasattr(cfg, "max_len"):
        _check(cfg.max_len >= d.seq_len, "model.max_len", f"{cfg.max_len} is shorter than data.seq_len={d.seq_len}")

    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "checkpoint_every",
                 "keep_checkpoints"):
        integer(f"train.{name}")
    for name in ("warmup_steps", "eval_every", "max_steps_per_run"):
        integer(f"train.{name}", 0)
    _check(t.warmup_steps < t.steps, "train.warmup_steps", f"{t.warmup_steps} must be less than train.steps={t.steps}")
    _check(t.batch_size % t.grad_accum == 0, "train.grad_accum",
           f"batch_size={t.batch_size} is not divisible by grad_accum={t.grad_accum}")
    _check(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate!r}")
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio!r}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay!r}")
    _check(0 <= t.b1 < 1, "train.b1", f"must be in [0, 1), got {t.b1!r}")
    _check(0 <= t.b2 < 1, "train.b2", f"must be in [0, 1), got {t.b2!r}")
    _check(t.eps > 0, "train.eps", f"must be > 0, got {t.eps!r}")
    _check(t.clip_norm >= 0, "train.clip_norm", f"must be >= 0 (0 disables), got {t.clip_norm!r}")
    _check(t.z_loss >= 0, "train.z_loss", f"must be >= 0, got {t.z_loss!r}")
    _check(isinstance(t.compilation_cache, str), "train.compilation_cache",
           f"must be a directory ('' = jax's own setting), got {t.compilation_cache!r}")
    _check(config.distributed.initialize in ("auto", "yes", "no"), "distributed.initialize",
           f"must be 'auto', 'yes' or 'no', got {config.distributed.initialize!r}")
    try:
        mesh_lib.rule_table(config.mesh.rules)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e) if str(e).startswith("config.") else f"config.mesh.rules: {e}") from None


def validate_devices(config, mesh_devices: int, process_count: int, devices=None):
    """Mesh and batch against the devices: returns (mesh, rule table).

    `devices` (default jax.devices()) may be another target's, e.g. a TPU topology's for mgpt.aot."""
    table = mesh_lib.rule_table(config.mesh.rules)
    try:
        mesh_lib.mesh_shape(config.mesh, mesh_devices)
        mesh = mesh_lib.make_mesh(config.mesh, devices)
        micro = config.train.batch_size // config.train.grad_accum
        field = "config.train.batch_size" if config.train.grad_accum == 1 else "config.train.batch_size / grad_accum"
        mesh_lib.check_batch(mesh, table, micro, process_count, field)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return mesh, table


def maybe_initialize_distributed(dist: ml_collections.ConfigDict) -> None:
    """jax.distributed for multi-process runs: auto-detected on TPU pods / SLURM, or explicit flags."""
    if dist.initialize == "no" or jax.distributed.is_initialized():
        return
    if dist.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=dist.coordinator_address,
            num_processes=dist.num_processes or None,
            process_id=dist.process_id if dist.process_id >= 0 else None,
        )
        return
    cluster = cluster_environment()
    try:
        jax.distributed.initialize()
    except Exception as e:  # noqa: BLE001 - coordinator failures are JaxRuntimeError, others ValueError
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if cluster is not None:
            # Falling back here would make every process of the job train alone, with the same
            # seed, into the same workdir.
            raise ConfigError(
                f"config.distributed.initialize={dist.initialize!r}: a {cluster} cluster was detected but "
                f"jax.distributed.initialize() failed ({first_line}); fix the cluster setup, or pass "
                "--config.distributed.initialize=no to train this process alone"
            ) from None
        if dist.initialize == "yes":
            raise ConfigError(f"config.distributed: jax.distributed.initialize() failed ({first_line})") from None
        # 'auto' on a machine with no cluster environment: a single-process run.


def cluster_environment() -> str | None:
    """The cluster jax.distributed would detect here ('SlurmCluster', 'OmpiCluster', a Cloud TPU), or None.

    Asked of jax's own detectors, so that we and `jax.distributed.initialize()` agree on
    what counts as a cluster."""
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__
    return None


def use_compilation_cache(directory: str, workdir: epath.Path) -> str | None:
    """Points jax's persistent compilation cache at `directory` (relative to the workdir).

    A restarted run (preemption, max_steps_per_run) then loads its compiled steps instead
    of compiling them again. '' leaves jax's own setting alone. Returns the path used."""
    if not directory:
        return None
    from jax.experimental.compilation_cache import compilation_cache

    path = directory if "://" in directory or directory.startswith("/") else os.fspath(workdir / directory)
    # jax keeps the path for the process: a relative one would move with the working directory.
    path = path if "://" in path else os.path.abspath(path)
    if jax.config.jax_compilation_cache_dir != path:
        compilation_cache.set_cache_dir(path)
        compilation_cache.reset_cache()  # jax opens its cache once per process, at the first compile
    return path


# ----------------------------------------------------------------------------- data + vocab


def resolve_dataset(dataset_dir: str) -> epath.Path:
    """config.data.dataset_dir -> the TFDS dataset directory (building the demo on first use)."""
    path = epath.Path(dataset_dir)
    if (path / "vocab.json").exists():
        return path
    if dataset_dir.rstrip("/") == DEMO_DATASET_DIR or path.resolve() == epath.Path(DEMO_DATASET_DIR).resolve():
        from data_prep.build import ensure_dataset, is_complete, dataset_path

        if jax.process_index() == 0 and not is_complete(dataset_path(dataset_dir)):
            print(f"building the demo dataset in {dataset_dir} (first use, a few minutes)", flush=True)
        return epath.Path(ensure_dataset(dataset_dir))
    found = _datasets_below(path) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ConfigError(f"config.data.dataset_dir={dataset_dir}: holds {len(found)} datasets "
                          f"({', '.join(map(str, found))}); give one of them")
    raise ConfigError(
        f"config.data.dataset_dir={dataset_dir}: no dataset there (build one with python -m data_prep.build)"
    )


def _datasets_below(path: epath.Path) -> list[epath.Path]:
    """Datasets one or two folders below `path`: a build's output dir holds mgpt_events/1.0.0.

    Listed level by level (etils cannot glob `**` on every filesystem); a build's hidden
    work folders and a dataset being swapped out (*.replaced) are not datasets.
    """
    def subdirs(folder):
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and not p.name.endswith(".replaced"))

    def is_dataset(folder):
        return (folder / "vocab.json").exists() and (folder / "dataset_info.json").exists()

    found = []
    for child in subdirs(path):
        if is_dataset(child):
            found.append(child)
        else:
            found.extend(grandchild for grandchild in subdirs(child) if is_dataset(grandchild))
    return found


def choose_vocab(dataset_path: epath.Path, workdir: epath.Path, init_from: str) -> Vocabulary:
    """The run's vocabulary: the resumed run's, else the warm start's, else the dataset's.

    A warm start keeps its own vocabulary (so its embedding rows keep their meaning);
    the dataset's event layout must match it, while its style labels may differ
    (labels the checkpoint doesn't know are conditioned on STYLE:unknown).
    """
    run_vocab_path = workdir / "vocab.json"
    try:  # a damaged or hand-edited vocab.json is a one-line error naming the file
        dataset_vocab = Vocabulary.load(dataset_path)
        run_vocab = None
        if run_vocab_path.exists():
            text = run_vocab_path.read_text()
            try:
                data = json.loads(text)
            except ValueError as e:
                raise ValueError(f"{run_vocab_path}: not valid JSON ({e})") from None
            run_vocab = Vocabulary.from_json(data, origin=str(run_vocab_path))
    except ValueError as e:
        raise ConfigError(f"{e}; rebuild it or restore the original") from None
    if run_vocab is not None:
        return _same_events(run_vocab, dataset_vocab, dataset_path, f"the run in {workdir}")
    if init_from:
        try:
            root, step = ckpt_lib.locate(init_from)
        except FileNotFoundError:
            raise ConfigError(f"config.init_from={init_from}: no checkpoints there (give a run's workdir)") from None
        vocab = Vocabulary.from_json(ckpt_lib.read_json_item(root, step, "vocab"), origin=f"{init_from} vocab")
        return _same_events(vocab, dataset_vocab, dataset_path, f"config.init_from={init_from}")
    return dataset_vocab


def _same_events(vocab: Vocabulary, dataset_vocab: Vocabulary, dataset_path, owner: str) -> Vocabulary:
    """`vocab` if every event id means the same in the dataset; style labels may differ."""
    settings = lambda v: {k: x for k, x in v.to_json().items() if k != "tokens"}
    ours, theirs = settings(vocab), settings(dataset_vocab)
    differ = [f"{k}={theirs.get(k)!r} there, {ours.get(k)!r} in {owner}" for k in sorted(set(ours) | set(theirs))
              if ours.get(k) != theirs.get(k)]
    if not differ and vocab.tokens[:vocab.style_offset] != dataset_vocab.tokens[:dataset_vocab.style_offset]:
        differ = ["its event tokens differ"]
    if differ:
        raise ConfigError(
            f"config.data.dataset_dir={dataset_path}: its event vocabulary differs ({'; '.join(differ)}); "
            "use a dataset built with the same settings"
        )
    return vocab


# ----------------------------------------------------------------------------- optimizer + step


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.learning_rate,
        warmup_steps=t.warmup_steps,
        decay_steps=t.steps,
        end_value=t.learning_rate * t.min_lr_ratio,
    )


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    # Decay matrices only: norm scales (and other vectors) are left alone.
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
    adamw = optax.adamw(
        learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask
    )
    if t.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(t.clip_norm), adamw)
    return adamw


def activation_sharding(batch_sharding):
    """Sharding of BxLxD activations: rows where the batch's rows are, D whole on each device."""
    if batch_sharding is None:
        return None
    spec = jax.sharding.PartitionSpec(*batch_sharding.spec, *[None] * (2 - len(batch_sharding.spec)), None)
    return jax.sharding.NamedSharding(batch_sharding.mesh, spec)


def _loss_sums(graphdef, params, rest, batch, z_loss: float, batch_sharding=None):
    """(sum of masked cross-entropy, sum of masked log(Z)^2) in nats, fp32."""
    model = nnx.merge(graphdef, params, rest)
    # Packed rows (mgpt.data) carry positions and segment ids; a batch without them is one piece per row.
    logits_BxLxV = model(batch["inputs"], batch.get("positions"), batch.get("segment_ids"),
                         activation_sharding=activation_sharding(batch_sharding)).astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BxL = batch["mask"]
    ce = jnp.sum((log_z_BxL - target_logit_BxL) * mask_BxL)
    z = jnp.sum(jnp.square(log_z_BxL) * mask_BxL) if z_loss else jnp.zeros((), jnp.float32)
    return ce, z


def make_train_step(graphdef, tx, t: ml_collections.ConfigDict, batch_sharding):
    """state, batch -> state, metrics. Pure; jit it with shardings (see `compile_train_step`)."""
    schedule = learning_rate_schedule(t)
    accum, z_loss = t.grad_accum, t.z_loss

    def train_step(state, rest, batch):
        params = state["params"]
        # Normalise by the whole batch's target count, so accumulation changes nothing but memory.
        count = jnp.maximum(jnp.sum(batch["mask"]), 1.0)

        def objective(p, microbatch):
            ce, z = _loss_sums(graphdef, p, rest, microbatch, z_loss, batch_sharding)
            return (ce + z_loss * z) / count, ce

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if accum == 1:
            (loss, ce), grads = grad_fn(params, batch)
        else:
            # Row r goes to microbatch r % accum: every microbatch stays spread over the batch shards.
            def split(x_BxL):
                b = x_BxL.shape[0]
                x = x_BxL.reshape(b // accum, accum, *x_BxL.shape[1:]).swapaxes(0, 1)
                spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
                return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(batch_sharding.mesh, spec))

            micro = jax.tree.map(split, batch)

            def body(carry, microbatch):
                (loss_i, ce_i), g_i = grad_fn(params, microbatch)
                g, loss, ce = carry
                return (jax.tree.map(jnp.add, g, g_i), loss + loss_i, ce + ce_i), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss, ce), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)

        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
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
    def eval_step(params, rest, batch):
        ce, _ = _loss_sums(graphdef, params, rest, batch, 0.0, batch_sharding)
        return {"nats": ce, "events": jnp.sum(batch["mask"])}

    return eval_step


@dataclasses.dataclass
class Setup:
    """Everything derived from a config before any parameter exists (all abstract)."""

    mesh: jax.sharding.Mesh
    table: dict
    graphdef: Any
    rest: Any
    abstract_state: dict
    state_shardings: dict
    batch_sharding: jax.sharding.NamedSharding
    tx: optax.GradientTransformation
    init_fn: Any
    num_params: int


def setup(config, vocab_size: int, mesh, table) -> Setup:
    """Abstract train state and its shardings, via jax.eval_shape over init."""
    tx = make_optimizer(config.train)
    abstract_model = _abstract_model(config.model, vocab_size)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(abstract_rest):
        raise NotImplementedError("models with non-parameter state are not supported by the trainer")
    rest = abstract_rest  # empty: passed to the step as an argument, never a baked-in constant

    def init_fn(seed):
        key = jax.random.PRNGKey(seed)
        with nnx.use_eager_sharding(False):
            model = build_model(config.model, vocab_size, nnx.Rngs(params=key))
        params = nnx.state(model, nnx.Param)
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.fold_in(key, 1),
        }

    abstract_state = jax.eval_shape(init_fn, 0)
    state_shardings = mesh_lib.tree_shardings(abstract_state, mesh, table)
    micro = config.train.batch_size // config.train.grad_accum
    return Setup(
        mesh=mesh,
        table=table,
        graphdef=graphdef,
        rest=rest,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        batch_sharding=mesh_lib.batch_sharding(mesh, table, micro),
        tx=tx,
        init_fn=init_fn,
        num_params=param_count(abstract_params),
    )


def compile_train_step(s: Setup, config):
    replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    step = make_train_step(s.graphdef, s.tx, config.train, s.batch_sharding)
    return jax.jit(
        step,
        # One sharding for the whole batch dict (a pytree prefix): every [batch, length] array alike.
        in_shardings=(s.state_shardings, replicated, s.batch_sharding),
        out_shardings=(s.state_shardings, replicated),
        donate_argnums=0,
        compiler_options=mesh_lib.compiler_options(mesh_lib.mesh_platform(s.mesh)),
    )


def compile_eval_step(s: Setup):
    replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        make_eval_step(s.graphdef, s.batch_sharding),
        in_shardings=(s.state_shardings["params"], replicated, s.batch_sharding),
        out_shardings=replicated,
        compiler_options=mesh_lib.compiler_options(mesh_lib.mesh_platform(s.mesh)),
    )


def abstract_batch(rows: int, seq_len: int, sharding) -> dict:
    """The batch the train and eval steps take (mgpt.data), as shapes: for compiling ahead of time."""
    from mgpt import data as data_lib

    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in data_lib.batch_shapes(rows, seq_len).items()}


def global_batch(local: dict, sharding) -> dict:
    """This host's rows -> global arrays laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# ----------------------------------------------------------------------------- stopping


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves and exits at the next step. A second Ctrl-C aborts.

    In a multi-process run SIGTERM is left to jax's preemption service, which agrees on
    one step at which every process saves (`reached_preemption_sync_point`).
    """

    def __init__(self, multi_process: bool):
        self.name: str | None = None
        self._signals = (signal.SIGINT,) if multi_process else (signal.SIGTERM, signal.SIGINT)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stop_requested(stop: _StopSignal, step: int, log_every: int) -> str | None:
    """The signal every process stops for at this step, or None. Same answer on all processes."""
    if jax.process_count() == 1:
        return stop.name
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(step):
        return "SIGTERM"
    # Ctrl-C reaches one process: share it at log steps, a schedule every process keeps.
    if step % log_every == 0:
        flags_ = multihost_utils.process_allgather(np.asarray([stop.name is not None], np.int32))
        if np.any(flags_):
            return stop.name or "SIGINT (on another process)"
    return None


# ----------------------------------------------------------------------------- loop


def _print0(*args) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def _write_json(path: epath.Path, obj) -> None:
    """Written whole, then renamed into place: a crash mid-write never leaves a truncated file
    that the next run (which reads config.json and vocab.json) would stumble on."""
    if jax.process_index() == 0:
        temporary = path.parent / f".{path.name}.tmp"
        temporary.write_text(json.dumps(obj, indent=1))
        temporary.replace(path)


def _versions() -> dict:
    """Library versions and devices of the run, stored beside its checkpoints."""
    import importlib.metadata
    import platform

    packages = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets", "numpy")
    out = {"python": platform.python_version(), "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
           "processes": jax.process_count()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _check_warm_start(config, vocab_size: int, abstract_params) -> None:
    """One line naming the model fields that differ when init_from's weights don't fit config.model."""
    root, step = ckpt_lib.locate(config.init_from)
    source = ml_collections.ConfigDict(ckpt_lib.read_json_item(root, step, "config")).model
    source_params = nnx.state(_abstract_model(source, vocab_size), nnx.Param)
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
    same_tree = jax.tree.structure(source_params) == jax.tree.structure(abstract_params)
    if same_tree and shapes(source_params) == shapes(abstract_params):
        return
    fields = sorted(k for k in set(source) | set(config.model) if source.get(k) != config.model.get(k))
    differ = ", ".join(f"{k}={source.get(k)!r} there, {config.model.get(k)!r} here" for k in fields)
    raise ConfigError(f"config.init_from={config.init_from}: its weights do not fit config.model ({differ})")


def _check_same_model(workdir: epath.Path, config) -> None:
    path = workdir / "config.json"
    if not path.exists():
        return
    # A field added since the run was written (e.g. scan_layers) had its default then.
    fields = dataclasses.fields(type(model_config(config.model, vocab_size=1)))
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    saved = {**defaults, **json.loads(path.read_text()).get("model", {})}
    now = {**defaults, **json.loads(json.dumps(config.model.to_dict()))}
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise ConfigError(
            f"config.model.{diff[0]}: {now.get(diff[0])!r} differs from the run in {workdir} "
            f"({saved.get(diff[0])!r}); use a new --workdir"
        )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the run described by `config` in `workdir`.

    Returns {'step', 'losses': {step: loss}, 'events': {step: predicted tokens}, 'eval': {step: nats/event},
    'stopped_by'}; `events` fingerprints the data each step saw.
    Raises WorkdirInUse at once when another live trainer holds `workdir`.
    """
    with contextlib.ExitStack() as held:  # the workdir lock, released however the run ends
        return _train(config, workdir, held)


def _train(config: ml_collections.ConfigDict, workdir: str, held: contextlib.ExitStack) -> dict:
    validate(config)
    maybe_initialize_distributed(config.distributed)
    mesh, table = validate_devices(config, jax.device_count(), jax.process_count())
    workdir = epath.Path(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    held.enter_context(WorkdirLock(workdir))  # before anything in the workdir is read or written
    _check_same_model(workdir, config)
    use_compilation_cache(config.train.compilation_cache, workdir)

    # The input pipeline (grain) is imported here, not with the module: the model and the
    # train step import without it (benchmarks/gpu_check.py feeds synthetic rows).
    from mgpt import data as data_lib

    t, d = config.train, config.data
    dataset_path = resolve_dataset(d.dataset_dir)
    vocab = choose_vocab(dataset_path, workdir, config.init_from)
    if d.get("fim_rate", 0.0) and not vocab.fim:  # FIM rows need their marker tokens (appended: ids unchanged)
        if (workdir / "vocab.json").exists() or config.init_from:
            raise ConfigError("config.data.fim_rate: the resumed or warm-started model's vocabulary has no FIM "
                              "tokens; start a new run (or set data.fim_rate=0)")
        vocab = vocab.with_fim()
    s = setup(config, vocab.size, mesh, table)
    seq_len = d.seq_len
    fpt = flops_per_token(config.model, vocab.size, seq_len, s.num_params)
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
    try:
        val_source = data_lib.open_source(dataset_path, "validation", training_only=True)
    except FileNotFoundError as e:
        val_source = None
        _print0(f"{e}: training without validation")
    if val_source is not None and len(val_source) < pc:  # found now, not at the first eval hours in
        raise ConfigError(
            f"config.data.dataset_dir={d.dataset_dir}: the validation split has {len(val_source)} pieces, fewer "
            f"than the {pc} hosts, and each host evaluates its own pieces; rebuild the dataset with a larger "
            "validation share (python -m data_prep.build --splits=TRAIN,VALIDATION,TEST)"
        )
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
            num_packing_bins=d.num_packing_bins,
            read_threads=d.read_threads,
            prefetch=d.prefetch,
            workers=d.workers,
            num_shards=num_shards,
            process_index=pi,
            process_count=pc,
        )
    except ValueError as e:
        fixed = " (fixed by the run's first start)" if saved_shards else ""
        raise ConfigError(f"config.data.shards={num_shards}{fixed}, dataset {d.dataset_dir}: {e}") from None
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
            _check_warm_start(config, vocab.size, s.abstract_state["params"])
            params, from_step = ckpt_lib.restore_params(config.init_from, None, abstract["params"])
            state["params"] = params
            _print0(f"warm start: weights from {config.init_from} (step {from_step})")
        _write_json(workdir / "config.json", config_json)
        _write_json(workdir / "vocab.json", vocab.to_json())
        _write_json(workdir / "versions.json", _versions())

    train_step = compile_train_step(s, config)
    eval_step = compile_eval_step(s)
    _print0(f"MFU is against {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    writer = monitor.MetricWriter(str(workdir / "tb"))

    step = int(jax.device_get(state["step"]))
    start_step = step
    stop_at = t.steps if not t.max_steps_per_run else min(t.steps, step + t.max_steps_per_run)
    tokens_per_step = t.batch_size * seq_len
    result = {"step": step, "losses": {}, "events": {}, "eval": {}, "stopped_by": None}
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
                    val_source, vocab, seq_len=seq_len, batch_size=t.batch_size // t.grad_accum // pc,
                    num_batches=t.eval_batches, num_packing_bins=d.num_packing_bins, process_index=pi,
                    process_count=pc,
                )
            ]
        sums = [eval_step(state["params"], s.rest, b) for b in eval_data]
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
                           flops_per_token=fpt, peak_flops=peak)

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
    try:
        with _StopSignal(multi_process=pc > 1) as stop:
            while step < stop_at:
                batch = global_batch(next(train_iter), s.batch_sharding)
                state, metrics = train_step(state, s.rest, batch)  # dispatched; runs while we log
                if pending is not None:
                    consume(*pending)
                step += 1
                pending = (step, metrics)
                stopped_by = _stop_requested(stop, step, t.log_every)
                stop_now = stopped_by is not None
                checkpoint_due = step % t.checkpoint_every == 0 or step == stop_at or stop_now
                eval_due = (t.eval_every and step % t.eval_every == 0) or step == t.steps
                if checkpoint_due or eval_due:
                    consume(*pending)  # only a state whose step was finite is saved or evaluated
                    pending = None
                if eval_due:
                    evaluate(step)
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
        with contextlib.ExitStack() as closing:  # each one closes even when another fails (a full disk fails several)
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


# ----------------------------------------------------------------------------- inference


def restore_model(workdir: str, step: int | None = None) -> tuple[nnx.Module, Vocabulary, ml_collections.ConfigDict, int]:
    """(model, vocab, config, step) from a run's checkpoint (latest by default). Weights only.

    `workdir` may also be its checkpoints/ directory or one step directory. The weights
    land on the first local device.
    """

    def load(root, at_step):
        config = ml_collections.ConfigDict(ckpt_lib.read_json_item(root, at_step, "config"))
        vocab = Vocabulary.from_json(ckpt_lib.read_json_item(root, at_step, "vocab"), origin=f"{root}/{at_step}/vocab")
        graphdef, abstract_params, rest = nnx.split(_abstract_model(config.model, vocab.size), nnx.Param, ...)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params)
        params, _ = ckpt_lib.restore_params(root, at_step, target)
        return nnx.merge(graphdef, params, rest), vocab, config

    # The newest step that restores: a damaged one, or one a live run's rotation deletes
    # while we read it, is named in one line and the next newest is used.
    (model, vocab, config), step = ckpt_lib.load_newest(workdir, step, load)
    return model, vocab, config, step


# ----------------------------------------------------------------------------- command line

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/tiny.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, config.json, vocab.json and TensorBoard logs go.")


def _parse_flags(argv):
    """absl's parse; an override naming no config field becomes one line naming the closest one."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError):  # how ml_collections reports --config.a.b for a missing field
        try:
            message = _unknown_override(argv)
        except Exception:  # noqa: BLE001 - the config file itself fails: ml_collections' own error says more
            message = None
        if message is None:
            raise
        raise SystemExit(message) from None


def _unknown_override(argv) -> str | None:
    """'--config.train.stepz: configs/tiny.py has no field train.stepz; did you mean --config.train.steps?', or None."""
    import difflib
    import importlib.util

    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_mgpt_config", path)
    if module_spec is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # the config file is Python by design (big_vision style)
    config = module.get_config(arg) if arg else module.get_config()
    for a in argv:
        if not a.startswith("--config.") or a.startswith("--config="):
            continue
        field = a[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for name in field.split("."):
            if not isinstance(node, ml_collections.ConfigDict):
                break
            if name not in node:
                closest = difflib.get_close_matches(name, list(node.keys()), n=1, cutoff=0.0)
                where = ".".join(walked + closest)
                return (f"--config.{field}: {path} has no field {'.'.join(walked + [name])}"
                        + (f"; did you mean --config.{where}?" if closest else ""))
            node, walked = node[name], walked + [name]
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise SystemExit("usage: python -m mgpt.train --config=configs/tiny.py --workdir=DIR [--config.FIELD=VALUE]")
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every file they touch at INFO
    # A full disk is reported once, below, not by every orbax thread and asyncio task.
    logging.get_absl_handler().addFilter(_not_disk_full)
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, NonFiniteLoss, WorkdirInUse) as e:
        raise SystemExit(str(e)) from None
    except Exception as e:
        if not _is_disk_full(e):
            raise
        _disk_full_reported.set()
        # tensorboardX's exit-time flush and its thread fail on the same full disk.
        sys.unraisablehook = threading.excepthook = lambda *_: None
        steps = ckpt_lib.finalized_steps(ckpt_lib.checkpoint_dir(_WORKDIR.value))
        last = f"step {steps[-1]}" if steps else "none yet"
        raise SystemExit(f"disk full writing {_WORKDIR.value}: nothing complete was lost (last complete checkpoint: "
                         f"{last}); free some space and re-run to resume") from None


_NO_SPACE = "No space left on device"
# Once the full disk is reported, orbax's threads keep failing as the process exits
# ("cannot schedule new futures after shutdown"): nothing they say adds to that line.
_disk_full_reported = threading.Event()


def _is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain: orbax reports it as tensorstore's ValueError text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or _NO_SPACE in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _not_disk_full(record) -> bool:
    if _disk_full_reported.is_set():
        return False
    return _NO_SPACE not in record.getMessage() and not (record.exc_info and _is_disk_full(record.exc_info[1]))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
