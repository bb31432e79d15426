"""orbax checkpoints of a training run: `WORKDIR/checkpoints/<step>/{params, train_state, data, config, vocab}`.

- params: the model weights alone, so inference and warm starts read only them;
- train_state: optimizer state, step and rng;
- data: this host's grain iterator state (one JSON file per process);
- config, vocab: the run's config and vocabulary as JSON, so a checkpoint is self-describing.

Paths may be local or gs:// (orbax and etils handle both).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("params", "train_state", "data", "config", "vocab")


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

    def save(self, step: int, state: dict, data_iter, config: dict, vocab: dict) -> None:
        """Starts a save of `state` ({'params', 'opt_state', 'step', 'rng'}); returns before it is written."""
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
        process, so a run resumed on a different number of hosts keeps its state but
        starts a fresh pass over the data.
        """
        import grain

        abstract_rest = {k: v for k, v in abstract_state.items() if k != "params"}
        items = {
            "params": ocp.args.StandardRestore(abstract_state["params"]),
            "train_state": ocp.args.StandardRestore(abstract_rest),
        }
        pi, pc = jax.process_index(), jax.process_count()
        has_data = (self.directory / str(step) / "data" / f"process_{pi}-of-{pc}.json").exists()
        if has_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {"params": out["params"], **out["train_state"]}, has_data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def read_json_item(root: str | epath.PathLike, step: int, item: str) -> Any:
    return json.loads((epath.Path(root) / str(step) / item / "metadata").read_text())


def locate(path: str | epath.PathLike, step: int | None = None) -> tuple[epath.Path, int]:
    """(checkpoints dir, step) for a workdir / checkpoints dir / step dir; the latest step by default."""
    root, step_in_path = _step_dir(path)
    step = step if step is not None else step_in_path
    if step is None:
        steps = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit() and (p / "params").exists())
        if not steps:
            raise FileNotFoundError(f"{path}: no checkpoints found")
        step = steps[-1]
    if not (root / str(step) / "params").exists():
        raise FileNotFoundError(f"{path}: no checkpoint for step {step}")
    return root, step


def restore_params(path: str | epath.PathLike, step: int | None, abstract_params) -> tuple[Any, int]:
    """Only the weights of a checkpoint, placed by abstract_params' shardings. Returns (params, step)."""
    root, step = locate(path, step)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(root / str(step) / "params", abstract_params)
    return params, step


def abstract_with_shardings(abstract_tree, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )
