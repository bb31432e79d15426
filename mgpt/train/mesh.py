"""The device mesh and the logical-axis rule table that places every array on it.

Parameters carry logical axis names ('vocab', 'embed', 'mlp', 'heads', 'kv', 'norm');
batches use 'batch'. `config.mesh.rules` maps each name to a mesh axis ('data',
'fsdp', 'tensor'), a tuple of them, or None (replicated). A mesh axis that does not
divide a dimension is left out for that array (e.g. a 246-token vocabulary on a
4-way tensor axis stays replicated), so any rule table gives valid shardings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXIS = "batch"

# XLA:CPU (jaxlib 0.10) hands matmuls and the fusions around them to YNNPACK by default.
# For our CPU-sized models the plain XLA:CPU kernels are faster: about 20 % per train
# step on `small` (benchmarks/bench_train.py). An empty list turns YNNPACK fusion off.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(platform: str | None = None) -> dict[str, Any]:
    """Per-compilation XLA options for `jax.jit(..., compiler_options=)` on `platform`.

    `platform` is the one the program is compiled for ('cpu', 'gpu', 'tpu'); by default the
    process's backend. An ahead-of-time compile for a TPU slice on a CPU host must name
    'tpu': XLA:TPU rejects the CPU-only options. Given per jit rather than through
    XLA_FLAGS, so a user's own flags stay as they are."""
    platform = jax.default_backend() if platform is None else platform
    return dict(_CPU_COMPILER_OPTIONS) if platform == "cpu" else {}


def mesh_platform(mesh: Mesh) -> str:
    """The platform of a mesh's devices ('cpu', 'gpu', 'tpu'): what its programs compile for."""
    return mesh.devices.flat[0].platform


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); one of them may be -1 = whatever is left."""
    sizes = [int(mesh_config[a]) for a in AXES]
    for axis, size in zip(AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"config.mesh.{axis}={size}: must be a positive size or -1 (fill)")
    free = [a for a, s in zip(AXES, sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {', '.join(free)}")
    shape = " x ".join(f"{a}={s}" for a, s in zip(AXES, sizes))
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh: {shape} does not divide the {num_devices} devices")
        sizes[AXES.index(free[0])] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh: {shape} needs {math.prod(sizes)} devices, but there are {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all of this process's job's)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    # Auto axes: we give in/out shardings and XLA's SPMD partitioner propagates the rest.
    axis_types = (AxisType.Auto,) * len(AXES)
    try:
        return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # A 3-D torus (v4, v5p: 4x4x4 chips and up) has no physical axis of 2 for fsdp=2: jax
        # refuses to split one unless asked. Splitting keeps each fsdp pair on neighbouring chips.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, AXES, axis_types=axis_types)


def rule_table(rules) -> dict[str, tuple[str, ...]]:
    """config.mesh.rules (pairs of logical name, mesh axis | tuple | None) -> dict."""
    table = {}
    for pair in rules:
        if len(pair) != 2:
            raise ValueError(f"config.mesh.rules: each rule is (logical_name, mesh_axes), got {pair!r}")
        name, target = pair
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for axis in axes:
            if axis not in AXES:
                raise ValueError(f"config.mesh.rules: {name!r} maps to unknown mesh axis {axis!r} (use {AXES})")
        table[str(name)] = axes
    return table


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, table: Mapping[str, tuple[str, ...]]
) -> PartitionSpec:
    """PartitionSpec for one array whose dimensions have logical `names`."""
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(names, shape):
        chosen = []
        for axis in table.get(name, ()) if name is not None else ():
            size = mesh.shape[axis]
            # Skip trivial axes, axes already used by another dimension, and ones that don't divide.
            if size == 1 or axis in used or dim % (math.prod(mesh.shape[a] for a in chosen) * size):
                continue
            chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def _logical_names(variable: nnx.Variable) -> tuple | None:
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def tree_shardings(abstract_tree, mesh: Mesh, table: Mapping[str, tuple[str, ...]]):
    """NamedShardings for every array of a pytree that may hold nnx Variables.

    Arrays inside a Variable follow its logical names (this covers params and the
    optimizer moments, which optax builds with the params' structure); every other
    array (step counters, rng keys) is replicated.
    """

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            if not hasattr(value, "shape"):  # optax's MaskedNode: a partitioned optimizer's absent moment
                return leaf
            names = _logical_names(leaf)
            spec = PartitionSpec() if names is None else logical_to_spec(names, value.shape, mesh, table)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, table: Mapping[str, tuple[str, ...]], global_batch: int) -> NamedSharding:
    """Sharding of a [batch, length] array: batch over the axes the 'batch' rule names."""
    return NamedSharding(mesh, logical_to_spec((BATCH_AXIS, None), (global_batch, 1), mesh, table))


def check_batch(mesh: Mesh, table, global_batch: int, process_count: int, field: str) -> None:
    """Raise a one-line ValueError unless `global_batch` splits evenly over the mesh and hosts."""
    axes = [a for a in table.get(BATCH_AXIS, ()) if mesh.shape[a] > 1]
    ways = math.prod(mesh.shape[a] for a in axes)
    if global_batch % ways:
        over = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
        raise ValueError(f"{field}={global_batch} is not divisible by the batch-sharded mesh axes ({over} = {ways})")
    if global_batch % process_count:
        raise ValueError(f"{field}={global_batch} is not divisible by the {process_count} processes")
    if process_count > 1 and ways % process_count:
        raise ValueError(
            f"config.mesh: the batch axes ({ways}-way) must span all {process_count} processes, "
            "so that each host feeds its own slice of the batch"
        )


def bytes_per_device(abstract_tree, shardings) -> int:
    """Largest per-device footprint (bytes) of a pytree under `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


def memory_limit(device: jax.Device | None = None) -> tuple[int | None, str]:
    """(bytes one device can hold, what that limit is), or (None, why not known).

    An accelerator reports its own allocator's limit. CPU devices share the host's RAM
    (the container's cgroup limit when lower), split evenly between this process's devices.
    """
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend implements it
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    if device.platform != "cpu":
        return None, f"{device.device_kind} reports no memory limit"
    try:
        ram, what = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host RAM"
    except (ValueError, OSError, AttributeError):
        return None, "host RAM unknown"
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            text = f.read().strip()
        if text.isdigit() and int(text) < ram:
            ram, what = int(text), "the container's memory limit"
    except OSError:
        pass
    count = jax.local_device_count()
    return ram // count, what if count == 1 else f"{what} shared by {count} CPU devices"


def maybe_initialize_distributed(initialize: str = "auto", coordinator_address: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> None:
    """jax.distributed for multi-process runs: auto-detected on TPU pods / SLURM, or explicit.

    `initialize` is 'auto' (when a cluster is detected), 'yes' or 'no'; the others are
    config.distributed's fields (0 and -1: let jax find them)."""
    from mgpt.errors import UserError

    if initialize == "no" or jax.distributed.is_initialized():
        return
    if coordinator_address:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes or None,
            process_id=process_id if process_id >= 0 else None,
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
            raise UserError(
                f"config.distributed.initialize={initialize!r}: a {cluster} cluster was detected but "
                f"jax.distributed.initialize() failed ({first_line}); fix the cluster setup, or pass "
                "--config.distributed.initialize=no to train this process alone"
            ) from None
        if initialize == "yes":
            raise UserError(f"config.distributed: jax.distributed.initialize() failed ({first_line})") from None
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


def use_compilation_cache(directory: str, workdir: os.PathLike) -> str | None:
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
        if "://" not in path:
            drop_unreadable_cache_entries(path)
        compilation_cache.set_cache_dir(path)
        compilation_cache.reset_cache()  # jax opens its cache once per process, at the first compile
    return path


def drop_unreadable_cache_entries(path: str) -> int:
    """Deletes the entries of a local compilation cache that cannot be read back; returns how many.

    jax writes an entry in place, not through a rename, and never writes a key again once its file
    exists. An entry cut short (a full disk, a process killed mid-write) was therefore read, warned
    about and compiled again at every later start, for good. Each entry is checked as jax reads it
    (decompressed); that takes milliseconds for the few MB a run keeps."""
    try:
        from jax._src.compilation_cache import decompress_executable
    except ImportError:  # another jax: leave its cache to it
        return 0
    dropped = 0
    try:
        names = os.listdir(path)
    except OSError:
        return 0
    for name in names:
        if not name.endswith("-cache"):
            continue
        entry = os.path.join(path, name)
        try:
            with open(entry, "rb") as f:
                decompress_executable(f.read())
        except OSError:
            continue
        except Exception:  # noqa: BLE001 - whatever the decompressor raises for a cut stream
            for stale in (entry, entry[: -len("-cache")] + "-atime"):
                try:
                    os.remove(stale)
                except OSError:
                    pass
            dropped += 1
    if dropped:
        print(f"compilation cache {path}: dropped {dropped} unreadable entr{'y' if dropped == 1 else 'ies'} "
              "(a write cut short); what they held is compiled again", flush=True)
    return dropped
