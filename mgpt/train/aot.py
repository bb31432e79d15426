"""Will this config run on that TPU slice? Ask XLA:TPU, on this machine, without a TPU.

    python -m mgpt.aot --config=configs/large.py --topology=v5e-256 [--config.FIELD=VALUE ...]

libtpu (`pip install -e '.[tpu]'`) describes the devices of a real slice on any host
(`jax.experimental.topologies`). The trainer's own train and eval steps, with its own
shardings, are then lowered and compiled for them, so the figures come from the TPU
compiler itself: per-chip HBM against the chip's capacity, FLOPs per step, and the
collectives in the program. Nothing is allocated and no data is read.

Exit 0: it fits. Exit 1: it does not (one line: the chip, the bytes, what to change).
Exit 2: a user error (topology name, config, no libtpu), in one line.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
import time

import jax
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from data_prep.vocab import Vocabulary
from mgpt.train import checkpoint as ckpt_lib
from mgpt.train import collectives as collectives_lib
from mgpt.train import config as config_lib
from mgpt.train import loop as train_lib  # this command compiles the trainer's own steps
from mgpt.errors import UserError, reported

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation, by public specs. FLOP/s are bf16 dense peaks per chip."""

    kind: str  # what the slice name starts with: 'v5e' in 'v5e-256'
    hbm_bytes: int  # per chip: what XLA:TPU lets one program use (a little under the nominal 16/32/95 GB)
    peak_flops: float
    torus_dims: int  # 2 (v5e, v6e) or 3 (v4, v5p)
    cores_in_name: int  # 'v4-32' counts TensorCores: 2 per chip; 'v5e-256' counts chips
    chip_config: str  # 'megacore': one jax device per chip (its two TensorCores together)
    tpu_type: str  # the accelerator type libtpu knows the slice by ('v5litepod-256')
    ici_bytes_per_s: float  # inter-chip interconnect bandwidth of one chip, all its links together


# HBM: the "available HBM" of XLA:TPU's RESOURCE_EXHAUSTED messages (libtpu 0.0.42.1).
# ICI: Google's per-chip "interchip interconnect bandwidth" on each generation's Cloud TPU page
# (cloud.google.com/tpu/docs/v5e, /v5p, /v6e): 1,600, 4,800 and 3,584 Gbit/s. The v4 page gives
# no per-chip figure; it gives "all-reduce bandwidth per Pod 1.1 PB/s" for 4,096 chips
# (cloud.google.com/tpu/docs/v4), which is 269 GB/s (2,150 Gbit/s) per chip, used here.
CHIPS = {
    "v4": Chip("v4", int(30.75 * GiB), 275e12, 3, 2, "megacore", "v4", 1.1e15 / 4096),
    "v5e": Chip("v5e", int(15.75 * GiB), 197e12, 2, 1, "default", "v5litepod", 1600e9 / 8),
    "v5p": Chip("v5p", int(95.74 * GiB), 459e12, 3, 2, "megacore", "v5p", 4800e9 / 8),
    "v6e": Chip("v6e", int(31.25 * GiB), 918e12, 2, 1, "default", "v6e", 3584e9 / 8),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as the user typed it
    chip: Chip
    chips: int
    shape: tuple[int, ...]  # chips along each torus axis

    @property
    def topology_name(self) -> str:
        """libtpu's name: 'v5e:16x16'."""
        return f"{self.chip.kind}:{'x'.join(map(str, self.shape))}"


def _default_shape(chip: Chip, chips: int) -> tuple[int, ...]:
    """The shape Cloud TPU gives a slice of `chips` chips: 2D 1x1, 2x2, 2x4, 4x4, ... 16x16;
    3D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (double the last of the smallest axes)."""
    shape = [1, 1] if chip.torus_dims == 2 else [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, n in enumerate(shape) if n == smallest)
        shape[last] *= 2
    return tuple(shape)


def parse_topology(name: str) -> Slice:
    """'v5e-256' (what `gcloud --accelerator-type` takes) or 'v5e:16x16' (chips per axis) -> Slice."""
    known = ", ".join(CHIPS)
    m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    if not m or m.group(1) not in CHIPS:
        raise UserError(f"--topology={name}: expected GENERATION-SIZE such as v5e-256, v4-32, v5p-32, v6e-8, "
                       f"or GENERATION:AxB[xC] such as v5e:2x2 (generations: {known})")
    chip = CHIPS[m.group(1)]
    if m.group(3):
        shape = tuple(int(n) for n in m.group(3).split("x"))
        if len(shape) != chip.torus_dims or min(shape) < 1:
            raise UserError(f"--topology={name}: {chip.kind} slices have {chip.torus_dims} axes, e.g. "
                           f"{chip.kind}:{'x'.join(['2'] * chip.torus_dims)}")
        return Slice(name, chip, math.prod(shape), shape)
    size = int(m.group(2))
    chips, rest = divmod(size, chip.cores_in_name)
    smallest = math.prod(_default_shape(chip, 1))
    if rest or chips < smallest or chips & (chips - 1):
        unit = "TensorCores (2 per chip)" if chip.cores_in_name == 2 else "chips"
        raise UserError(f"--topology={name}: the size counts {unit} and must be a power of two >= "
                       f"{smallest * chip.cores_in_name}, e.g. {chip.kind}-8")
    return Slice(name, chip, chips, _default_shape(chip, chips))


def topology_devices(slice_: Slice) -> list:
    """The jax devices of `slice_`, from libtpu, with no TPU attached."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError("mgpt.aot needs libtpu to compile for TPUs: pip install -e '.[tpu]'")
    # libtpu otherwise asks the GCE metadata server which TPU this VM has, and warns at length
    # when there is none. A real TPU VM's own settings are kept.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{slice_.chip.tpu_type}-{slice_.chips * slice_.chip.cores_in_name}")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes a machine-wide lock for the TPU it drives; a deviceless compile drives
    # none, so two of them (or one beside a test) may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=slice_.topology_name, chip_config_name=slice_.chip.chip_config
        )
    except Exception as e:  # libtpu's own words for a shape it does not make
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--topology={slice_.name}: libtpu cannot describe {slice_.topology_name} ({first})") from None
    devices = list(topology.devices)
    if len(devices) != slice_.chips:
        raise UserError(f"--topology={slice_.name}: libtpu gave {len(devices)} devices for {slice_.chips} chips")
    return devices


# ----------------------------------------------------------------------------- what the compiler says


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-chip HBM of one compiled program, in bytes."""

    arguments: int
    temporaries: int
    outputs: int  # outputs that do not reuse a donated argument's buffer
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.temporaries + self.outputs + self.code


def memory_of(compiled) -> Memory:
    m = compiled.memory_analysis()
    outputs = max(int(m.output_size_in_bytes) - int(m.alias_size_in_bytes), 0)
    return Memory(int(m.argument_size_in_bytes), int(m.temp_size_in_bytes), outputs,
                  int(m.generated_code_size_in_bytes))


def flops_of(compiled) -> float:
    """FLOPs of one execution on one chip (the partitioned program), from XLA's cost analysis.

    XLA counts the body of a loop once, whatever its trip count: for scanned layers or
    gradient accumulation see `matmul_flops`."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def matmul_flops(closed_jaxpr) -> float:
    """FLOPs of every matmul (dot_general) a jaxpr runs, a scan's body once per iteration.

    Counted on the traced step (before partitioning: divide by the chips), so the layers
    of a scan and the microbatches of gradient accumulation count as often as they run,
    and the forward recomputed by remat counts too."""

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (contracting, _), _ = eqn.params["dimension_numbers"]
                lhs_shape = eqn.invars[0].aval.shape
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[i] for i in contracting)
            times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            if eqn.primitive.name == "shard_map":
                # Its body is one chip's share: every chip of the manual axes runs it.
                mesh, manual = eqn.params["mesh"], eqn.params.get("manual_axes", None)
                names = manual if manual else mesh.axis_names
                times = math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in names)
            if eqn.primitive.name == "pallas_call":
                # A kernel (splash attention) runs its body once per grid point. A block the
                # mask skips sits under a cond and counts as computed: dense work, an upper bound.
                times = math.prod(eqn.params["grid_mapping"].grid)
            inner = [count(j) for j in _subjaxprs(eqn.params)]
            # A cond runs one of its branches: count the dearest.
            total += times * (max(inner, default=0.0) if eqn.primitive.name == "cond" else sum(inner))
        return total

    return count(closed_jaxpr.jaxpr)


def _subjaxprs(params) -> list:
    found = []
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns"):
                found.append(v)
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                found.append(v.jaxpr)
    return found


def collectives_of(hlo_text: str, num_devices: int) -> list[collectives_lib.Collective]:
    """The collectives of one run of a compiled program, counted as they run (mgpt.train.collectives)."""
    return collectives_lib.collectives_of(hlo_text, num_devices)


# ----------------------------------------------------------------------------- the report


@dataclasses.dataclass
class Report:
    slice: Slice
    mesh_shape: dict
    num_params: int
    tokens_per_step: int
    train: Memory
    eval: Memory
    flops_per_chip: float  # one train step: its matmuls, loops counted per iteration (matmul_flops)
    xla_flops_per_chip: float  # one train step, XLA's cost analysis (a loop body once)
    estimate_per_chip: float  # one train step, 6 N_matmul + attention (ModelConfig.flops_per_token)
    six_n_per_chip: float  # one train step, 6 x parameters x tokens
    collectives: list  # of the train step: [mgpt.train.collectives.Collective]
    compile_seconds: dict  # {'train', 'eval'}: wall-clock seconds
    compile_cpu_seconds: dict  # the same, in CPU seconds of this process (steadier on a shared machine)

    has_loops: bool = False  # the step scans (layers, microbatches)
    grad_accum: int = 1
    weight_bytes: int = 2  # bytes per weight as the matmuls read it (the compute dtype)

    @property
    def moved_bytes(self) -> float:
        """Bytes each chip sends over ICI per train step (ring formula, mgpt.train.collectives)."""
        return collectives_lib.moved_bytes(self.collectives)

    @property
    def ideal_fsdp_bytes(self) -> float:
        """What ZeRO-3 sharding must move per chip per step, the floor to judge `moved_bytes` by:
        per microbatch the weights (in the compute dtype) gathered for the forward, gathered
        again for the backward, and their gradients reduce-scattered, each (f-1)/f of the
        weights over f fsdp chips; plus, over d data replicas, the all-reduce of each chip's
        gradient shard, 2(d-1)/d of it, once per step. Tensor parallelism's activation
        traffic is not in it."""
        f, d = self.mesh_shape.get("fsdp", 1), self.mesh_shape.get("data", 1)
        weights = self.num_params * self.weight_bytes
        fsdp = self.grad_accum * 3 * (f - 1) / f * weights
        data = 2 * (d - 1) / d * weights / (f * self.mesh_shape.get("tensor", 1))
        return fsdp + data

    def model(self) -> "StepModel":
        return step_model(self)

    @property
    def capacity(self) -> int:
        return self.slice.chip.hbm_bytes

    @property
    def peak(self) -> int:
        return max(self.train.total, self.eval.total)

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    def step_seconds(self, fraction_of_peak: float) -> float:
        return self.flops_per_chip / (self.slice.chip.peak_flops * fraction_of_peak)

    def tokens_per_second_per_chip(self, fraction_of_peak: float) -> float:
        return self.tokens_per_step / self.slice.chips / self.step_seconds(fraction_of_peak)


def _gib(n: float) -> str:
    """Bytes in the unit that keeps 3 significant figures readable."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _seconds(t: float) -> str:
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms" if t >= 1e-3 else f"{t * 1e6:.3g} µs"


def _flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} FLOP"


def format_report(r: Report, config_name: str) -> str:
    s, chip = r.slice, r.slice.chip
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh_shape.items())
    lines = [
        f"{config_name}: {r.num_params / 1e6:,.1f} M parameters, {r.tokens_per_step:,} tokens per step",
        f"slice {s.name}: {s.chips} chips of TPU {chip.kind} ({s.topology_name}), mesh {mesh}",
        f"compile: train step {r.compile_seconds['train']:.1f} s ({r.compile_cpu_seconds['train']:.1f} s of CPU), "
        f"eval step {r.compile_seconds['eval']:.1f} s ({r.compile_cpu_seconds['eval']:.1f} s of CPU)",
        "",
        f"{'HBM per chip':<24}{'train step':>12} {'eval step':>12}",
    ]
    for field in ("arguments", "temporaries", "outputs", "code"):
        label = {"outputs": "outputs (not donated)", "code": "program code"}.get(field, field)
        lines.append(f"  {label:<22}{_gib(getattr(r.train, field)):>12} {_gib(getattr(r.eval, field)):>12}")
    lines.append(f"  {'total':<22}{_gib(r.train.total):>12} {_gib(r.eval.total):>12}"
                 f"   of {_gib(r.capacity)} per chip ({100 * r.peak / r.capacity:.0f} %)")
    lines += [
        "",
        f"FLOPs per train step per chip: {_flops(r.flops_per_chip)} in matmuls (remat's recomputation included; "
        f"matmuls / estimate = {r.flops_per_chip / r.estimate_per_chip:.2f})",
        f"  estimate 6N + attention {_flops(r.estimate_per_chip)}; 6N alone {_flops(r.six_n_per_chip)}; XLA:TPU "
        f"cost analysis {_flops(r.xla_flops_per_chip)} (XLA / estimate = {r.xla_flops_per_chip / r.estimate_per_chip:.2f}"
        f"{'; it counts a loop body once' if r.has_loops else ''})",
    ]
    for fraction in (1.0, 0.5):
        lines.append(
            f"at {fraction:.0%} of {chip.peak_flops / 1e12:.0f} TFLOP/s: {_seconds(r.step_seconds(fraction))} per step, "
            f"{r.tokens_per_second_per_chip(fraction):,.0f} tokens/s per chip"
        )
    lines.append("")
    totals = collectives_lib.summarize(r.collectives)
    if totals:
        lines.append("collectives per train step per chip (a loop body per iteration, an async chain once):")
        lines.append(f"  {'':<20}{'count':>6} {'arrays':>11} {'sent (ring)':>12}")
        for kind, t in totals.items():
            note = f"   ({t.as_all_reduce} of them all-reduces into zeros)" if t.as_all_reduce else ""
            lines.append(f"  {kind:<20}{t.count:>6} {_gib(t.nbytes):>11} {_gib(t.moved):>12}{note}")
        ideal = r.ideal_fsdp_bytes
        versus = f" ({r.moved_bytes / ideal:.2f}x)" if ideal else ""
        lines.append(f"  sent in all {_gib(r.moved_bytes)}; ideal FSDP {_gib(ideal)}{versus}; by asynchronous "
                     f"collectives (which may overlap compute) "
                     f"{_gib(collectives_lib.moved_bytes(r.collectives, asynchronous=True))}")
    else:
        lines.append("collectives per train step: none")
    lines += format_model(r.model(), chip)
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class StepModel:
    """A train step's time on paper: its matmuls at the chip's peak, its collectives' bytes at
    the chip's ICI bandwidth, either one after the other or fully overlapped. It ignores
    everything else a step does (memory-bound work, latency, imperfect rings), so its MFU
    figures are upper bounds for the program as compiled. A model, not a measurement."""

    compute_s: float  # matmul FLOPs per chip (remat included) at peak
    comm_s: float  # bytes sent per chip at ICI bandwidth
    blocking_s: float  # of comm_s, the collectives XLA scheduled synchronously (no overlap possible)
    useful_s: float  # the model's FLOPs (6N + attention) at peak: what MFU counts
    tokens_per_chip: float  # per step

    @property
    def serial_s(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def overlapped_s(self) -> float:
        return max(self.compute_s, self.comm_s)

    @property
    def scheduled_s(self) -> float:
        """The blocking collectives after compute, the asynchronous ones hidden behind it where they fit."""
        return self.blocking_s + max(self.compute_s, self.comm_s - self.blocking_s)

    @property
    def mfu_serial(self) -> float:
        return self.useful_s / self.serial_s

    @property
    def mfu_overlapped(self) -> float:
        return self.useful_s / self.overlapped_s


def step_model(r: Report) -> StepModel:
    # mgpt.aot compiles one slice, whose collectives all run over ICI; multi-slice (DCN) is not modelled.
    chip = r.slice.chip
    blocking = collectives_lib.moved_bytes(r.collectives, asynchronous=False)
    return StepModel(compute_s=r.flops_per_chip / chip.peak_flops, comm_s=r.moved_bytes / chip.ici_bytes_per_s,
                     blocking_s=blocking / chip.ici_bytes_per_s,
                     useful_s=r.estimate_per_chip / chip.peak_flops, tokens_per_chip=r.tokens_per_step / r.slice.chips)


def format_model(m: StepModel, chip: Chip) -> list[str]:
    return [
        # Scripts read this line: keep its form.
        f"step-time model: MFU {100 * m.mfu_serial:.1f} % without overlap, {100 * m.mfu_overlapped:.1f} % with full "
        f"overlap (a model, not a measurement)",
        f"  compute {_seconds(m.compute_s)} (matmuls at {chip.peak_flops / 1e12:.0f} TFLOP/s), communication "
        f"{_seconds(m.comm_s)} (at {chip.ici_bytes_per_s / 1e9:.0f} GB/s ICI per chip); tokens/s per chip "
        f"{m.tokens_per_chip / m.serial_s:,.0f} without overlap, {m.tokens_per_chip / m.overlapped_s:,.0f} with",
        f"  as scheduled (asynchronous collectives overlapped, blocking ones not): MFU "
        f"{100 * m.useful_s / m.scheduled_s:.1f} %, {_seconds(m.blocking_s)} of communication blocking",
    ]


def _what_to_change(config) -> str:
    options = []
    if config.model.get("remat", "none") != "full":
        options.append("--config.model.remat=full")
    options.append(f"--config.train.grad_accum={config.train.grad_accum * 2}")
    if config.mesh.fsdp != -1:
        options.append("--config.mesh.fsdp=-1 --config.mesh.data=1")
    options.append("a larger slice")
    return ", ".join(options)


def _does_not_fit_line(s: Slice, config, needed: float | None, capacity: float, what: str) -> str:
    needed_text = f"{needed / GiB:.2f} GiB" if needed is not None else "more than that"
    return (f"does not fit: {what} need {needed_text} of HBM per chip on {s.name}, whose TPU {s.chip.kind} "
            f"chips have {capacity / GiB:.2f} GiB; try {_what_to_change(config)}")


def _exhausted_bytes(message: str) -> tuple[float | None, float | None]:
    """(bytes needed, bytes available) from XLA:TPU's RESOURCE_EXHAUSTED text, e.g. 'the total
    memory required for HLO temporaries (119.21G) exceeds available HBM (30.75G)'."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    m = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)", message) or re.search(
        r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", message)
    if m:
        return float(m.group(1)) * units[m.group(2)], float(m.group(3)) * units[m.group(4)]
    return None, None


class DoesNotFit(Exception):
    """The config needs more HBM than the chip has: one line, exit 1."""


def compile_for(config, slice_: Slice, programs: tuple[str, ...] = ("train", "eval"),
                hlo_texts: list | None = None) -> Report:
    """Compiles the trainer's train and eval steps of `config` for `slice_`; raises DoesNotFit.

    `programs` may name one of them (the planner compiles its candidates' train steps, then
    the winner's eval step); the figures of the other are then zeros."""
    devices = topology_devices(slice_)
    config_lib.validate(config)
    mesh, table = config_lib.validate_devices(config, len(devices), 1, devices=devices)
    vocab_size = _vocab_size(config)
    s = train_lib.setup(config, vocab_size, mesh, table)
    t, seq_len = config.train, config.data.seq_len
    abstract_state = ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
    batch = train_lib.abstract_batch(t.batch_size, seq_len, s.batch_sharding)
    eval_batch = train_lib.abstract_batch(s.microbatch, seq_len, s.batch_sharding)

    seconds, cpu_seconds, compiled = {}, {}, {}
    train_step = train_lib.compile_train_step(s, config)
    step_jaxpr = jax.make_jaxpr(train_step)(abstract_state, batch)
    steps = {"train": (train_step, (abstract_state, batch)),
             "eval": (train_lib.compile_eval_step(s), (abstract_state["params"], eval_batch))}
    for name in programs:
        fn, args = steps[name]
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            compiled[name] = fn.lower(*args).compile()
        except Exception as e:  # XLA's own error type differs by jax version
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            used, capacity = _exhausted_bytes(str(e))
            raise DoesNotFit(_does_not_fit_line(slice_, config, used, capacity or slice_.chip.hbm_bytes,
                                                f"the {name} step's temporaries")) from None
        seconds[name] = time.perf_counter() - start
        cpu_seconds[name] = time.process_time() - start_cpu

    tokens = t.batch_size * seq_len
    fpt = s.model_config.flops_per_token(seq_len)
    train_text = compiled["train"].as_text() if "train" in compiled else None
    if hlo_texts is not None and train_text is not None:  # the planner keeps it, to count again later
        hlo_texts.append(train_text)
    return Report(
        slice=slice_,
        mesh_shape=dict(mesh.shape),
        num_params=s.num_params,
        tokens_per_step=tokens,
        train=memory_of(compiled["train"]) if "train" in compiled else Memory(0, 0, 0, 0),
        eval=memory_of(compiled["eval"]) if "eval" in compiled else Memory(0, 0, 0, 0),
        flops_per_chip=matmul_flops(step_jaxpr) / slice_.chips,
        xla_flops_per_chip=flops_of(compiled["train"]) if "train" in compiled else 0.0,
        estimate_per_chip=fpt * tokens / slice_.chips,
        six_n_per_chip=6.0 * s.num_params * tokens / slice_.chips,
        collectives=collectives_of(train_text, slice_.chips) if train_text is not None else [],
        compile_seconds={"train": 0.0, "eval": 0.0, **seconds},
        compile_cpu_seconds={"train": 0.0, "eval": 0.0, **cpu_seconds},
        has_loops=bool(config.model.get("scan_layers", False)) or t.grad_accum > 1,
        grad_accum=t.grad_accum,
        weight_bytes=2 if config.model.get("dtype", "float32") in ("bfloat16", "float16") else 4,
    )


def _vocab_size(config) -> int:
    """The dataset's vocabulary size when its vocab.json is here, else the default vocabulary's.

    Compiling needs no data; the vocabulary only sizes the embedding."""
    from mgpt.train import data as data_lib

    path = epath.Path(config.data.dataset_dir)
    found = [path] if (path / "vocab.json").exists() else data_lib.datasets_below(path) if path.is_dir() else []
    if len(found) == 1:
        return Vocabulary.load(found[0]).size
    return Vocabulary().size


# ----------------------------------------------------------------------------- command line

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/large.py.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice(s), comma-separated: v5e-256, v4-32, v5p-32, v6e-8, or v5e:2x2.")
_PLAN = flags.DEFINE_bool("plan", False, "Search remat, grad_accum, rows per chip and mesh for each slice "
                          "(mgpt.train.plan), print what was tried, and write the winner's overrides.")
_PLAN_MAX_COMPILES = flags.DEFINE_integer("plan_max_compiles", 6, "--plan: compile at most this many candidates "
                                          "per slice, the best on paper first.")
_PLAN_HEADROOM = flags.DEFINE_float("plan_headroom", 0.1, "--plan: share of each chip's HBM left free.")
_PLAN_ROWS = flags.DEFINE_list("plan_rows_per_chip", None, "--plan: rows per chip to try (default: the config's "
                               "batch over the chips, and twice that).")
_PLAN_OUT = flags.DEFINE_string("plan_out", None, "--plan: write the winning overrides to this file (one "
                                "snippet per slice, appended).")


def _plan_one(config, config_name: str, topology: str, command: str) -> bool:
    """Plans one slice: prints the table, the winner's report and snippet; True if one fits."""
    from mgpt.train import plan as plan_lib

    slice_ = parse_topology(topology)
    try:
        rows_per_chip = tuple(float(v) for v in _PLAN_ROWS.value) if _PLAN_ROWS.value else None
    except ValueError:
        raise UserError(f"--plan_rows_per_chip={','.join(_PLAN_ROWS.value)}: expected numbers, e.g. 2,4") from None
    if not 0 <= _PLAN_HEADROOM.value < 1:
        raise UserError(f"--plan_headroom={_PLAN_HEADROOM.value}: expected a share in [0, 1)")
    if _PLAN_MAX_COMPILES.value < 1:
        raise UserError(f"--plan_max_compiles={_PLAN_MAX_COMPILES.value}: expected at least 1")
    rows, winner = plan_lib.plan(config, slice_, sys.modules[__name__], max_compiles=_PLAN_MAX_COMPILES.value,
                                 headroom=_PLAN_HEADROOM.value, rows_per_chip=rows_per_chip, log=print)
    print(f"plan for {config_name} on {slice_.name} ({slice_.chips} chips of TPU {slice_.chip.kind}): "
          f"{len(rows)} candidates, {sum(r.status.startswith('pruned') for r in rows)} pruned by the memory "
          f"estimate, {sum(r.report is not None for r in rows)} compiled")
    print(plan_lib.format_table(rows, slice_, winner))
    if winner is None:
        print(f"does not fit: no candidate's train and eval steps fit {slice_.name} with "
              f"{_PLAN_HEADROOM.value:.0%} of HBM to spare; try a larger slice", file=sys.stderr)
        return False
    print()
    print(format_report(winner.report, f"{config_name} as planned"))
    text = plan_lib.snippet(winner, slice_, config_name, command)
    print()
    print(text)
    if _PLAN_OUT.value:
        with open(_PLAN_OUT.value, "a") as f:
            f.write(text + "\n")
    return True


def _one(config, config_name: str, topology: str) -> tuple[bool, str]:
    """Compiles for one slice and prints its report: (fits, a markdown row for the summary)."""
    slice_ = parse_topology(topology)
    try:
        report = compile_for(config, slice_)
    except UserError as e:  # the config itself does not suit this slice (e.g. the batch does not divide)
        print(e, file=sys.stderr)
        return False, f"| {config_name} | {slice_.name} | {slice_.chips} | {e} | {_gib(slice_.chip.hbm_bytes)} | no |"
    except DoesNotFit as e:
        print(e, file=sys.stderr)
        needed = re.search(r"need ([\d.]+ GiB)", str(e))
        return False, (f"| {config_name} | {slice_.name} | {slice_.chips} | > capacity "
                       f"({needed.group(1) if needed else '?'} of temporaries) | {_gib(slice_.chip.hbm_bytes)} | no |")
    versions = f"jax {jax.__version__}, libtpu {importlib.metadata.version('libtpu')}"
    print(format_report(report, f"{config_name} ({versions})"))
    row = (f"| {config_name} | {slice_.name} | {slice_.chips} | {_gib(report.peak)} | {_gib(report.capacity)} | "
           f"{'yes' if report.fits else 'no'} |")
    if not report.fits:
        program = "train" if report.train.total >= report.eval.total else "eval"
        print(_does_not_fit_line(slice_, config, report.peak, report.capacity,
                                 f"the {program} step's arguments, temporaries and outputs"), file=sys.stderr)
        return False, row
    print(f"fits: {_gib(report.peak)} of {_gib(report.capacity)} HBM per chip on {slice_.name}")
    return True, row


@reported
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, topologies = _CONFIG.value, [t for t in (_TOPOLOGY.value or "").split(",") if t]
    if config is None or not topologies:
        raise UserError("usage: python -m mgpt.aot --config=configs/large.py --topology=v5e-256[,v4-32,...] "
                        "[--config.FIELD=VALUE]")
    if importlib.util.find_spec("libtpu") is None:  # once, before any slice: exit 2, a user's setup
        raise UserError("mgpt.aot needs libtpu to compile for TPUs: pip install -e '.[tpu]'")
    # The host compiles; the TPU is only described. Without this jax would also try to
    # open the (absent) TPU as its default backend.
    jax.config.update("jax_platforms", "cpu")
    name = os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))
    if _PLAN.value:
        command = "python -m mgpt.aot " + " ".join(sys.argv[1:])
        all_fit = True
        for i, topology in enumerate(topologies):
            if i:
                print()
            all_fit &= _plan_one(config, name, topology, command)
        if not all_fit:
            sys.exit(1)
        return
    rows, all_fit = [], True
    for i, topology in enumerate(topologies):
        if i:
            print()
        fits, row = _one(config, name, topology)
        all_fit &= fits
        rows.append(row)
    if len(rows) > 1:  # the summary, as the README's table
        print("\n| config | slice | chips | HBM per chip (peak of train, eval) | usable | fits |\n|---|---|---|---|---|---|")
        print("\n".join(rows))
    if not all_fit:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
