"""Checks of a training config (configs/*.py plus --config.FIELD overrides), before any work.

Each check raises a one-line UserError naming the field: `validate` for the config alone,
`validate_devices` against the devices, `check_same_model` against the run already in
the workdir and `check_warm_start` against config.init_from's weights.
`parse_flags` names the closest field for a misspelled --config.FIELD.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
from etils import epath
from flax import nnx

from mgpt.train import checkpoint as ckpt_lib
from mgpt.train import mesh as mesh_lib
from mgpt.model import kinds as models
from mgpt.errors import UserError


def _check(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise UserError(f"config.{field}: {why}")


def microbatch_size(train_cfg: ml_collections.ConfigDict) -> int:
    """Rows in one forward pass over all hosts: config.train.batch_size / grad_accum."""
    return train_cfg.batch_size // train_cfg.grad_accum


def validate(config: ml_collections.ConfigDict) -> None:
    """Static checks, before any data or device work."""
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
    seconds = d.get("control_seconds", 0.0)
    _check(isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds <= 600,
           "data.control_seconds", f"must be seconds in [0, 600] (0 = no controls), got {seconds!r}")
    levels = d.get("control_levels", 8)
    _check(isinstance(levels, int) and not isinstance(levels, bool) and 2 <= levels <= 32,
           "data.control_levels", f"must be an integer in 2..32, got {levels!r}")
    control_dropout = d.get("control_dropout", 0.5)
    _check(isinstance(control_dropout, (int, float)) and not isinstance(control_dropout, bool)
           and 0 <= control_dropout <= 1, "data.control_dropout", f"must be a share in [0, 1], got {control_dropout!r}")

    cfg = models.model_config(config.model, vocab_size=1)
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
    optimizer = t.get("optimizer", "adamw")
    _check(optimizer in ("adamw", "muon"), "train.optimizer", f"must be 'adamw' or 'muon', got {optimizer!r}")
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
        raise UserError(str(e) if str(e).startswith("config.") else f"config.mesh.rules: {e}") from None


def validate_devices(config, mesh_devices: int, process_count: int, devices=None):
    """Mesh and batch against the devices: returns (mesh, rule table).

    `devices` (default jax.devices()) may be another target's, e.g. a TPU topology's for mgpt.aot."""
    table = mesh_lib.rule_table(config.mesh.rules)
    try:
        mesh_lib.mesh_shape(config.mesh, mesh_devices)
        mesh = mesh_lib.make_mesh(config.mesh, devices)
        field = "config.train.batch_size" if config.train.grad_accum == 1 else "config.train.batch_size / grad_accum"
        mesh_lib.check_batch(mesh, table, microbatch_size(config.train), process_count, field)
    except ValueError as e:
        raise UserError(str(e)) from None
    return mesh, table


def check_same_model(workdir: epath.Path, config) -> None:
    """A resumed run's config.model and optimizer must be the ones in its workdir's config.json."""
    path = workdir / "config.json"
    if not path.exists():
        return
    # A field added since the run was written (e.g. scan_layers) had its default then.
    fields = dataclasses.fields(type(models.model_config(config.model, vocab_size=1)))
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    try:
        saved_config = json.loads(path.read_text())
        saved_model = saved_config.get("model", {})
        if not isinstance(saved_model, dict):
            raise ValueError(f"its 'model' is a {type(saved_model).__name__}")
    except (ValueError, AttributeError) as e:  # truncated, empty or hand-edited
        raise UserError(f"{path}: not a run config ({e}); every checkpoint keeps a copy of it "
                        f"(checkpoints/STEP/config/metadata): copy the newest over it, or use a new --workdir") from None
    saved = {**defaults, **saved_model}
    now = {**defaults, **json.loads(json.dumps(config.model.to_dict()))}
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise UserError(
            f"config.model.{diff[0]}: {now.get(diff[0])!r} differs from the run in {workdir} "
            f"({saved.get(diff[0])!r}); resume it with --config.model.{diff[0]}={saved.get(diff[0])!r}, "
            f"or use a new --workdir"
        )
    # The optimizer's state is checkpointed in its own layout: a run resumes with the optimizer it
    # was started with (runs written before the field existed used AdamW).
    saved_train = saved_config.get("train") if isinstance(saved_config.get("train"), dict) else {}
    before, now_opt = saved_train.get("optimizer", "adamw"), config.train.get("optimizer", "adamw")
    if before != now_opt:
        raise UserError(
            f"config.train.optimizer: {now_opt!r} differs from the run in {workdir} ({before!r}); resume it "
            f"with --config.train.optimizer={before}, or use a new --workdir"
        )


def check_warm_start(config, vocab_size: int, abstract_params) -> None:
    """One line naming the model fields that differ when init_from's weights don't fit config.model."""
    root, step = ckpt_lib.locate(config.init_from)
    try:
        source = ml_collections.ConfigDict(ckpt_lib.read_json_item(root, step, "config")).model
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"config.init_from={config.init_from}: checkpoint step {step} has no readable config item "
                        f"({type(e).__name__}: {e}); give a complete run's workdir") from None
    source_params = nnx.state(models.abstract_model(source, vocab_size), nnx.Param)
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
    same_tree = jax.tree.structure(source_params) == jax.tree.structure(abstract_params)
    if same_tree and shapes(source_params) == shapes(abstract_params):
        return
    fields = sorted(k for k in set(source) | set(config.model) if source.get(k) != config.model.get(k))
    differ = ", ".join(f"{k}={source.get(k)!r} there, {config.model.get(k)!r} here" for k in fields)
    raise UserError(f"config.init_from={config.init_from}: its weights do not fit config.model ({differ})")


def parse_flags(argv):
    """absl's parse of the command line; an override naming no config field is one line naming the closest one."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.IllegalFlagValueError as e:  # --config.train.steps=abc: the field's type is the config's
        text = str(e)
        if text.startswith("flag "):
            flag, _, why = text[len("flag "):].partition(": ")
            kind = "an integer" if "int()" in why else "a number" if "float" in why else None
            text = f"{flag}: must be {kind}" if kind else f"{flag}: {why}"
        raise UserError(text) from None
    except (AttributeError, KeyError):  # how ml_collections reports --config.a.b for a missing field
        try:
            message = unknown_override(argv)
        except Exception:  # noqa: BLE001 - the config file itself fails: ml_collections' own error says more
            message = None
        if message is None:
            raise
        raise UserError(message) from None


def unknown_override(argv) -> str | None:
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
