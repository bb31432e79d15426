"""orbax checkpoints of a training run: `WORKDIR/checkpoints/<step>/{params, train_state, data, config, vocab}`.

- params: the model weights alone, so inference and warm starts read only them;
- train_state: optimizer state and step;
- data: this host's grain iterator state (one JSON file per process);
- config, vocab: the run's config and vocabulary as JSON, so a checkpoint is self-describing.

Paths may be local or gs:// (orbax and etils handle both). Only steps orbax has
finalized are ever read (on gs:// it writes into the step directory and marks completion
separately). A step that cannot be restored (a truncated file, a step deleted by a live
run's rotation while we read it) is named in one line and the next newest one is used.

`StopSignal` turns SIGTERM/SIGINT (a preemption, Ctrl-C) into a checkpoint at the next
step; `restore_model` loads a run's weights for inference.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mgpt.errors import MissingInput, exit_with_line

ITEMS = ("params", "train_state", "data", "config", "vocab")
T = TypeVar("T")


class CheckpointError(MissingInput):
    """No checkpoint can be used (printed as one line, as every UserError)."""


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _reason(e: BaseException, limit: int = 160) -> str:
    """An exception as a short phrase for a one-line message (orbax's are often many lines)."""
    if getattr(e, "reason", None):  # a CheckpointError of a nested load_newest: its cause, not its wording
        return e.reason
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    noise = first.find(_TENSORSTORE_NOISE)
    if noise >= 0:
        # tensorstore's "See full TensorStore details: <bound method pybind11…" is its spec, not a
        # reason; the error it wraps says what is wrong (a byte range past a truncated file's end).
        cause = e.__cause__ or e.__context__
        if cause is not None and str(cause).strip():
            return _reason(cause, limit=320)
        first = first[:noise].strip()
    return f"{type(e).__name__}: {first[:limit]}"


_TENSORSTORE_NOISE = "See full TensorStore details"


def finalized_steps(root: str | epath.PathLike) -> list[int]:
    """The steps under a checkpoints dir that orbax has finished writing, oldest first."""
    root = epath.Path(root)
    return sorted(s for s in ocp.utils.checkpoint_steps(root) if (root / str(s) / "params").exists())


_warned: set[str] = set()

def _from_orbax(filename: str) -> bool:
    return f"{os.sep}orbax{os.sep}" in filename or f"{os.sep}tensorstore{os.sep}" in filename


class _AbandonedReadsFilter(logging.Filter):
    """asyncio's "... exception was never retrieved" for a future whose error came from orbax."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exception was never retrieved" not in message:
            return True
        if "OCDBT database" in message or "TensorStore" in message:  # raised by tensorstore itself
            return False
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            if _from_orbax(tb.tb_frame.f_code.co_filename):
                return False
            tb = tb.tb_next
        return True


def _quiet_abandoned_reads() -> None:
    """From now on, drops what Python would print for the reads orbax abandons.

    A damaged step fails on its first bad array, and orbax's other array reads (coroutines and
    futures on its own event-loop thread) are dropped unfinished, each holding its own error.
    Python prints each one when it is collected: "Exception ignored in: <coroutine ...>",
    asyncio's "Future exception was never retrieved", and tensorstore's late callbacks into the
    closed loop, "Event loop is closed"; a read not yet started warns that it "was never
    awaited". That is 60 to 800 lines, some before the one-line
    fallback notice and some long after it, at exit included. So from the first restore attempt
    on, the process's unraisable hook drops coroutines whose code is orbax's or tensorstore's
    and those late callbacks, the asyncio logger drops never-retrieved errors raised in their
    code, and warnings drop orbax's never-awaited reads. Anything else goes on as before.
    """
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadsFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedReadsFilter())
        # A read orbax had created but not yet started when the step failed.
        warnings.filterwarnings("ignore", message=r"coroutine '_read_[a-z_]*' was never awaited",
                                category=RuntimeWarning)
    previous = sys.unraisablehook
    if getattr(previous, "_mgpt_abandoned_reads", False):
        return

    def hook(unraisable):
        if _from_orbax(getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "") or ""):
            return
        # tensorstore finishing an abandoned read calls back into orbax's event loop after orbax
        # closed it, from its own threads: "Event loop is closed" from call_soon_threadsafe.
        tb = unraisable.exc_traceback
        if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"):
            return
        previous(unraisable)

    hook._mgpt_abandoned_reads = True
    sys.unraisablehook = hook


def _attempt(fn: Callable[[], T]) -> tuple[T | None, str | None]:
    """(fn(), None), or (None, the reason in one line) when it raises: a step that fails to restore.

    orbax, tensorstore and json raise many types for a damaged step. The reads orbax abandons
    when one fails are silenced (`_quiet_abandoned_reads`: some are reported while the attempt
    is still failing), and after a failure what is already collectable is collected."""
    _quiet_abandoned_reads()
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - see above
        reason = _reason(e)
    gc.collect()
    return None, reason


def _fallback_message(root, bad: list[tuple[int, str]], used: int) -> str:
    steps = ", ".join(str(s) for s, _ in bad)
    newest = "the newest that restores" if used < bad[0][0] else "saved since"
    return f"checkpoint step {steps} in {root} cannot be restored ({bad[0][1]}); using step {used}, {newest}"


def absolute(path: str | epath.PathLike) -> epath.Path:
    """orbax refuses relative paths (`--workdir=runs/demo`); URLs such as gs://… are kept as they are."""
    path = epath.Path(path)
    return path if "://" in os.fspath(path) else epath.Path(os.path.abspath(os.fspath(path)))


def checkpoint_dir(path: str | epath.PathLike) -> epath.Path:
    """A workdir, its checkpoints/ dir, or one step dir -> the directory holding step dirs."""
    path = absolute(path)
    if (path / "checkpoints").exists():
        return path / "checkpoints"
    return path


def _step_dir(path: str | epath.PathLike) -> tuple[epath.Path, int | None]:
    """Accepts a step directory (…/checkpoints/1200) as well: returns (root, step)."""
    path = absolute(path)
    if (path / "params").exists() and path.name.isdigit():
        return path.parent, int(path.name)
    return checkpoint_dir(path), None


class Checkpoints:
    """The CheckpointManager of one run: async saves, the last `keep` kept."""

    def __init__(self, directory: str | epath.PathLike, *, keep: int = 3, async_save: bool = True, read_only=False):
        self.directory = absolute(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_newest(self, abstract_state: dict, data_iter, warn: Callable[[str], None] = _warn):
        """`restore` of the newest step that restores: (state, data restored?, step), or None if no steps.

        Newer steps that failed are named in one line by `warn` and renamed `<step>.unreadable`
        (kept for inspection, and out of orbax's way so that the run can save those steps
        again). When no step restores nothing is renamed: that is more likely a changed
        config than damage to every step.
        """
        bad = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            restored, failure = _attempt(lambda: self.restore(step, abstract_state, data_iter))
            if not _all_processes_ok(failure is None):
                failure = failure or "another process could not restore it"
            if failure is None:
                if bad:
                    warn(_fallback_message(self.directory, bad, step))
                    for bad_step, _ in bad:
                        self._set_aside(bad_step)
                state, has_data = restored
                return state, has_data, step
            bad.append((step, failure))
        if bad:
            raise CheckpointError(
                f"{self.directory}: no checkpoint step restores (step {bad[0][0]}: {bad[0][1]}); "
                "resume with the config that wrote them, or use a new --workdir"
            )
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            folder = self.directory / str(step)
            aside = self.directory / f"{step}.unreadable"
            n = 1
            while aside.exists():
                n += 1
                aside = self.directory / f"{step}.unreadable{n}"
            folder.rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"mgpt: checkpoint {step} set aside")
        self.manager.reload()

    def save(self, step: int, state: dict, data_iter, config: dict, vocab: dict) -> None:
        """Starts a save of `state` ({'params', 'opt_state', 'step'}); returns before it is written."""
        import grain  # here, so that the trainer imports without grain (benchmarks/gpu_check.py)

        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train_state=ocp.args.StandardSave({k: v for k, v in state.items() if k != "params"}),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config),
            vocab=ocp.args.JsonSave(vocab),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: dict, data_iter) -> tuple[dict, bool]:
        """(the full training state at `step`, whether the data position was restored).

        Arrays are placed by abstract_state's shardings (orbax reshards if the mesh changed);
        the iterator is moved to where that step left it. The data position is saved per
        process; on a different number of processes each one is given the union of the
        saved positions (mgpt.train.data's per-shard state), from which it takes its own shards.
        """
        import grain

        abstract_rest = {k: v for k, v in abstract_state.items() if k != "params"}
        if _has_unused_rng(self.directory / str(step) / "train_state"):
            # Saved by an older mgpt, whose train state carried an rng it never read. orbax
            # restores whole trees: it is read with the rest, then dropped.
            abstract_rest["rng"] = jax.ShapeDtypeStruct((2,), np.uint32, sharding=abstract_rest["step"].sharding)
        items = {
            "params": ocp.args.StandardRestore(abstract_state["params"]),
            "train_state": ocp.args.StandardRestore(abstract_rest),
        }
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        # Read here rather than through grain's handler, which reads only this process's own
        # file: the same code then serves any process count, and a position saved in another
        # layout (an older mgpt) starts the data afresh instead of failing.
        has_data = _restore_data(self.data_states(step), data_iter)
        train_state = {k: v for k, v in out["train_state"].items() if k != "rng"}
        return {"params": out["params"], **train_state}, has_data

    def data_states(self, step: int) -> list[dict]:
        """Every process's saved data-iterator state at `step` (any process count)."""
        files = sorted((self.directory / str(step) / "data").glob("process_*-of-*.json"))
        return [json.loads(f.read_text()) for f in files]

    def data_shards(self) -> int | None:
        """The number of data shards the run's saved data positions are for (fixed for a run), from
        the newest step whose position reads; None when none does (no step, or an older mgpt's)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                states = self.data_states(step)
            except (OSError, ValueError):  # a damaged step: restore_newest sets it aside
                continue
            if states and isinstance(states[0], dict) and states[0].get("num_shards"):
                return int(states[0]["num_shards"])
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _has_unused_rng(item_dir: epath.Path) -> bool:
    """Whether a train_state item holds the `rng` key of older mgpt runs (in orbax's tree metadata)."""
    try:
        return "('rng',)" in json.loads((item_dir / "_METADATA").read_text())["tree_metadata"]
    except (OSError, ValueError, KeyError):
        return False


def _restore_data(states: list[dict], data_iter) -> bool:
    """Sets `data_iter` from the union of the per-shard states every process saved."""
    if not states or not all(isinstance(x, dict) and "shards" in x for x in states):
        return False
    merged = {"num_shards": states[0]["num_shards"], "shards": {}}
    for state in states:
        merged["shards"].update(state["shards"])
    try:
        data_iter.set_state(merged)
    except ValueError:  # saved for another shard layout: the caller starts the data afresh
        return False
    if hasattr(data_iter, "start_prefetch"):
        data_iter.start_prefetch()
    return True


def _all_processes_ok(ok: bool) -> bool:
    """Whether every process succeeded: a file damaged in one host's shard fails only that host."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([ok], np.int32))))


def write_json(path: epath.Path, obj) -> None:
    """Written whole, then renamed into place: a crash mid-write never leaves a truncated file
    that the next run (which reads config.json and vocab.json) would stumble on."""
    if jax.process_index() == 0:
        temporary = path.parent / f".{path.name}.tmp"
        temporary.write_text(json.dumps(obj, indent=1))
        temporary.replace(path)


def versions() -> dict:
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


def read_json_item(root: str | epath.PathLike, step: int, item: str) -> Any:
    return json.loads((epath.Path(root) / str(step) / item / "metadata").read_text())


def locate(path: str | epath.PathLike, step: int | None = None) -> tuple[epath.Path, int]:
    """(checkpoints dir, step) for a workdir / checkpoints dir / step dir; the latest finalized step by default."""
    root, step_in_path = _step_dir(path)
    step = step if step is not None else step_in_path
    if step is None:
        steps = finalized_steps(root)
        if not steps:
            raise MissingInput(f"{path}: no checkpoints found")
        step = steps[-1]
    folder = root / str(step)
    if not (folder / "params").exists() or not ocp.utils.is_checkpoint_finalized(folder):
        raise MissingInput(f"{path}: no complete checkpoint for step {step}")
    return root, step


MAX_TRIES = 16  # steps load_newest tries before it gives up (a live run may keep saving new ones)


def load_newest(path: str | epath.PathLike, step: int | None, load: Callable[[epath.Path, int], T],
                warn: Callable[[str], None] = _warn) -> tuple[T, int]:
    """(load(root, step), step) for a workdir / checkpoints dir / step dir.

    With no step given (neither here nor in the path), the newest finalized step that
    loads: one that fails (damaged, or deleted by a live run's rotation since it was
    listed) is named in one line by `warn` and the newest step not yet tried is, listed
    again each time: when rotation deleted the step because a newer one was saved, that
    newer one is used. At most MAX_TRIES steps are tried. A step that was
    asked for is never swapped for another. CheckpointError when nothing loads.
    """
    root, chosen = locate(path, step)
    if step is not None or _step_dir(path)[1] is not None:
        out, reason = _attempt(lambda: load(root, chosen))
        if reason is None:
            return out, chosen
        error = CheckpointError(f"{root}/{chosen}: cannot be restored ({reason}); pick another step")
        error.reason = reason
        raise error
    bad, tried, candidate = [], set(), chosen
    while candidate is not None and len(tried) < MAX_TRIES:
        tried.add(candidate)
        out, failure = _attempt(lambda: load(root, candidate))
        if failure is not None:
            bad.append((candidate, failure))
            # Listed again: a live run may have saved a newer step while rotation deleted this one.
            try:
                rest = [s for s in finalized_steps(root) if s not in tried]
            except (OSError, ValueError):  # the checkpoints folder itself went away
                rest = []
            candidate = rest[-1] if rest else None
            continue
        message = _fallback_message(root, bad, candidate) if bad else None
        if message and message not in _warned:  # generate looks twice (flags, then weights): say it once
            _warned.add(message)
            warn(message)
        return out, candidate
    more = "" if candidate is None else f"; gave up after {MAX_TRIES} steps, older ones untried"
    raise CheckpointError(f"{root}: no checkpoint step restores (step {bad[0][0]}: {bad[0][1]}){more}")


def restore_params(path: str | epath.PathLike, step: int | None, abstract_params) -> tuple[Any, int]:
    """Only the weights of a checkpoint (the newest that restores by default), placed by
    abstract_params' shardings. Returns (params, step)."""
    return load_newest(path, step, lambda root, s: _restore_params_at(root, s, abstract_params))


def restore_model(workdir: str, step: int | None = None):
    """(model, vocab, config, step) from a run's checkpoint (the newest that restores by
    default): weights only, for inference.

    `workdir` may also be its checkpoints/ directory or one step directory. The weights
    land on the first local device.
    """
    import ml_collections
    from flax import nnx

    from data_prep.vocab import Vocabulary
    from mgpt.model import kinds as models

    def load(root, at_step):
        config = ml_collections.ConfigDict(read_json_item(root, at_step, "config"))
        vocab = Vocabulary.from_json(read_json_item(root, at_step, "vocab"), origin=f"{root}/{at_step}/vocab")
        graphdef, abstract_params, rest = nnx.split(models.abstract_model(config.model, vocab.size), nnx.Param, ...)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params)
        params = _restore_params_at(root, at_step, target)
        return nnx.merge(graphdef, params, rest), vocab, config

    # The newest step that restores: a damaged one, or one a live run's rotation deletes
    # while we read it, is named in one line and the next newest is used.
    (model, vocab, config), step = load_newest(workdir, step, load)
    return model, vocab, config, step


def _restore_params_at(root: epath.Path, step: int, abstract_params):
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(root / str(step) / "params", abstract_params)


def abstract_with_shardings(abstract_tree, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves and exits at the next step. A second Ctrl-C aborts.

    In a multi-process run SIGTERM is left to jax's preemption service, which agrees on
    one step at which every process saves (`reached_preemption_sync_point`).
    """

    def __init__(self, multi_process: bool, abort_line: Callable[[], str] | None = None):
        self.name: str | None = None
        self._signals = (signal.SIGINT,) if multi_process else (signal.SIGTERM, signal.SIGINT)
        self._previous = {}
        # With abort_line, a second Ctrl-C prints it and ends the process at once (exit 1): raised
        # as KeyboardInterrupt it landed anywhere in orbax's save (its event loops, thread pools,
        # tensorstore callbacks) and printed a different traceback each time, or hung. A save
        # cut short is never finalized, so the last complete checkpoint is what abort_line names.
        self._abort_line = abort_line

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.name is not None and signum == signal.SIGINT:
            if self._abort_line is not None:
                exit_with_line(self._abort_line, "interrupted: the save in progress was abandoned")
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stop_requested(stop: StopSignal, step: int, log_every: int) -> str | None:
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
