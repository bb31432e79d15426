"""The planner behind `python -m mgpt.aot --config=... --topology=... --plan`.

It searches how a config runs on one TPU slice: the remat policy (full, dots, none),
gradient accumulation, rows per chip (the global batch over the chips) and the mesh
(data x fsdp x tensor). Every candidate first gets a memory estimate and a time estimate
on paper (below); those the estimate says do not fit are pruned, the rest are ranked by
the paper estimate, and the best `max_compiles` of them are compiled for the slice by
libtpu (`mgpt.aot.compile_for`, train step only). The winner is the compiled candidate
with the highest no-overlap MFU of mgpt.aot's step-time model whose train step fits HBM
with `headroom` to spare; its eval step is then compiled too, and must fit as well.

Compiles are cached on disk (one JSON per candidate, keyed by the config, the slice, jax,
libtpu and the source of the modules that shape the program), so a second plan of the
same slice compiles nothing.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import gzip
import hashlib
import importlib.metadata
import json
import math
import os
import sys
from pathlib import Path

from mgpt.train import collectives as collectives_lib
from mgpt.errors import UserError

REMATS = ("full", "dots", "none")
ACCUMS = (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class Candidate:
    remat: str
    grad_accum: int
    rows_per_chip: float  # global batch / chips (rows of seq_len per optimizer step)
    data: int
    fsdp: int
    tensor: int

    def batch_size(self, chips: int) -> int:
        return round(self.rows_per_chip * chips)

    def overrides(self, chips: int) -> dict:
        return {"model.remat": self.remat, "train.grad_accum": self.grad_accum,
                "train.batch_size": self.batch_size(chips), "mesh.data": self.data, "mesh.fsdp": self.fsdp,
                "mesh.tensor": self.tensor}

    @property
    def mesh(self) -> str:
        return f"{self.data}x{self.fsdp}x{self.tensor}"


def apply(config, overrides: dict):
    """A copy of `config` with `{'section.field': value}` set."""
    c = copy.deepcopy(config)
    with c.unlocked() if hasattr(c, "unlocked") else _nothing():
        for path, value in overrides.items():
            section, field = path.split(".")
            c[section][field] = value
    return c


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def candidates(config, chips: int, rows_per_chip: tuple[float, ...] | None = None) -> list[Candidate]:
    """Every combination the planner considers, that the batch and the heads can be split into."""
    t, m = config.train, config.model
    base_rows = t.batch_size / chips
    rows_options = rows_per_chip or tuple(sorted({base_rows, 2 * base_rows}))
    heads = m.get("num_heads", 1)
    out = []
    for tensor in (1, 2, 4):
        if chips % tensor or heads % tensor or tensor > chips:
            continue
        for data in (2**i for i in range(int(math.log2(chips // tensor)) + 1)):
            fsdp = chips // tensor // data
            for rows in rows_options:
                batch = rows * chips
                if batch < 1 or abs(batch - round(batch)) > 1e-9:
                    continue
                for accum in ACCUMS:
                    micro = round(batch) / accum
                    if micro != int(micro) or int(micro) % (data * fsdp):
                        continue
                    for remat in REMATS:
                        out.append(Candidate(remat, accum, rows, data, fsdp, tensor))
    return out


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A candidate on paper, before any compile."""

    hbm_bytes: float
    mfu_serial: float  # 6N + attention at peak over (matmuls with remat at peak + ideal traffic at ICI)


def estimate(config, cand: Candidate, chips: int, chip, num_params: int, vocab_size: int) -> Estimate:
    """Paper figures for pruning and ranking (the compiles decide). HBM per chip: fp32 weights,
    AdamW's two moments and the fp32 gradient, sharded over fsdp x tensor; the activations
    that remat keeps for each layer; one layer's attention scores and the logits, live
    during the backward. Time: the model's matmuls (remat's recomputation added) at peak,
    and the ideal FSDP traffic (data-parallel reductions per microbatch, as XLA places them)
    plus tensor parallelism's activation all-reduces at ICI."""
    m, L = config.model, config.data.seq_len
    d, f, n, layers = m.d_model, m.mlp_dim, m.num_heads, m.num_layers
    act = 2 if m.get("dtype", "float32") in ("bfloat16", "float16") else 4
    shards = cand.fsdp * cand.tensor
    state = num_params * (4 + 8 + 4) / shards
    rows = cand.batch_size(chips) / cand.grad_accum / (cand.data * cand.fsdp)  # per chip per microbatch
    tokens = rows * L
    per_layer_token = {"full": d, "dots": d + (5 * d + 2 * f) / cand.tensor,
                       "none": d + (8 * d + 4 * f) / cand.tensor}[cand.remat] * act
    if cand.remat == "none":  # scores, probabilities and the mask of every layer stay
        per_layer_token += n / cand.tensor * L * (4 + act + 1)
    saved = layers * tokens * per_layer_token
    working = rows * n / cand.tensor * L * L * (4 + 4 + act) + tokens * vocab_size / cand.tensor * 4 * 3
    hbm = state + saved + working

    blocks_fwd = 2 * layers * (4 * d * d + 3 * d * f) + 4 * layers * d * L  # per token
    useful = 6 * (layers * (4 * d * d + 3 * d * f) + d * vocab_size) + 12 * layers * d * L
    recompute = {"full": blocks_fwd, "dots": 4 * layers * d * L, "none": 0.0}[cand.remat]
    tokens_per_chip = cand.batch_size(chips) * L / chips
    compute_s = (useful + recompute) * tokens_per_chip / chip.peak_flops
    weights = num_params * act
    f_, d_, t_ = cand.fsdp, cand.data, cand.tensor
    # XLA reduces the gradients inside the accumulation loop: the data-parallel all-reduce too.
    comm = cand.grad_accum * (3 * (f_ - 1) / f_ * weights / t_ + 2 * (d_ - 1) / d_ * weights / (f_ * t_))
    if t_ > 1:  # two all-reduces of the residual stream per layer forward, two backward
        comm += cand.grad_accum * layers * 4 * 2 * (t_ - 1) / t_ * tokens * d * act
    comm_s = comm / chip.ici_bytes_per_s
    return Estimate(hbm, useful * tokens_per_chip / chip.peak_flops / (compute_s + comm_s))


# ----------------------------------------------------------------------------- the compile cache


def _cache_dir() -> Path:
    root = os.environ.get("MGPT_AOT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mgpt", "aot")
    return Path(root)


def _program_sources() -> str:
    """The modules whose code shapes the compiled step: a change to them is a new program. (The
    count of its collectives is redone from the stored HLO on every load.) Read once, as this
    process imported them."""
    global _SOURCES
    if _SOURCES is None:
        here = Path(__file__).resolve().parent
        _SOURCES = "".join((here / f).read_text() for f in ("model.py", "train.py", "mesh.py", "config.py")
                           if (here / f).exists())
    return _SOURCES


_SOURCES = None


def cache_key(config, topology: str) -> str:
    versions = [importlib.metadata.version(p) for p in ("jax", "libtpu")]
    blob = json.dumps([config.to_dict(), topology, versions], sort_keys=True, default=str) + _program_sources()
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _report_to_json(r, hlo_text: str | None = None) -> dict:
    out = {k: getattr(r, k) for k in ("mesh_shape", "num_params", "tokens_per_step", "flops_per_chip",
                                      "xla_flops_per_chip", "estimate_per_chip", "six_n_per_chip",
                                      "compile_seconds", "compile_cpu_seconds", "has_loops", "grad_accum",
                                      "weight_bytes")}
    out["train"], out["eval"] = dataclasses.asdict(r.train), dataclasses.asdict(r.eval)
    out["collectives"] = [dataclasses.asdict(c) for c in r.collectives]
    if hlo_text is not None:
        out["hlo_gz"] = base64.b64encode(gzip.compress(hlo_text.encode(), 6)).decode()
    return out


def _report_from_json(data: dict, slice_, aot):
    data = dict(data)
    data["train"], data["eval"] = aot.Memory(**data["train"]), aot.Memory(**data["eval"])
    hlo = data.pop("hlo_gz", None)
    if hlo is not None:  # counted by this version of mgpt.train.collectives
        data["collectives"] = collectives_lib.collectives_of(gzip.decompress(base64.b64decode(hlo)).decode(),
                                                             slice_.chips)
    else:
        data["collectives"] = [collectives_lib.Collective(**c) for c in data["collectives"]]
    return aot.Report(slice=slice_, **data)


def compile_cached(config, slice_, program: str, aot):
    """`aot.compile_for` of one program ('train' or 'eval'), answered from the cache when it
    was compiled before. Returns (report, cached?). A DoesNotFit is cached too (its line).
    `aot` is the mgpt.aot module (passed in: it may be running as __main__)."""
    path = _cache_dir() / f"{cache_key(config, slice_.name)}-{program}.json"
    if path.exists():
        data = json.loads(path.read_text())
        if "does_not_fit" in data:
            raise aot.DoesNotFit(data["does_not_fit"])
        return _report_from_json(data, slice_, aot), True
    try:
        texts = []
        report = aot.compile_for(config, slice_, programs=(program,), hlo_texts=texts)
        data = _report_to_json(report, texts[0] if texts else None)
    except aot.DoesNotFit as e:
        report, data = e, {"does_not_fit": str(e)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # atomically: a killed plan leaves no half-written entry
    if isinstance(report, Exception):
        raise report
    return report, False


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Row:
    cand: Candidate
    est: Estimate
    status: str = "not compiled"  # 'pruned: memory', 'not compiled', 'compiled', 'cached', 'does not fit', 'error'
    report: object = None  # aot.Report of the train step


def plan(config, slice_, aot, *, max_compiles: int = 6, headroom: float = 0.1, rows_per_chip=None,
         log=print) -> tuple[list[Row], Row | None]:
    """Searches, compiles and picks (see the module doc); `aot` is the mgpt.aot module.
    Returns (every row, the winner or None)."""
    from mgpt.model import kinds as models
    from mgpt.train import config as config_lib

    vocab_size = aot._vocab_size(config)
    num_params = models.model_config(config.model, vocab_size).num_params()
    chip = slice_.chip
    rows = []
    for cand in candidates(config, slice_.chips, rows_per_chip):
        rows.append(Row(cand, estimate(config, cand, slice_.chips, chip, num_params, vocab_size)))
    if not rows:
        raise UserError(f"--plan: no mesh of {slice_.chips} chips divides config.train.batch_size="
                        f"{config.train.batch_size}; set a batch that is a multiple of the chips")
    usable = chip.hbm_bytes * (1 - headroom)
    for row in rows:
        if row.est.hbm_bytes > usable:
            row.status = "pruned: memory"
    admitted = _compile_order([r for r in rows if r.status != "pruned: memory"])
    # The estimate misses XLA's own temporaries; each compile tells by how much, per remat
    # policy, and the candidates the corrected estimate rules out are not compiled.
    scale: dict[str, float] = {}
    compiled = 0
    for row in admitted:
        if compiled == max_compiles:
            break
        if row.est.hbm_bytes * scale.get(row.cand.remat, 1.0) > usable:
            row.status = "pruned: memory (corrected)"
            continue
        compiled += 1
        i = compiled - 1
        c = apply(config, row.cand.overrides(slice_.chips))
        try:
            config_lib.validate(c)
            row.report, cached = compile_cached(c, slice_, "train", aot)
            row.status = "cached" if cached else "compiled"
        except aot.DoesNotFit:
            row.status = "does not fit"
        except UserError as e:
            row.status = f"error: {e}"
        if row.report is not None:
            scale[row.cand.remat] = max(scale.get(row.cand.remat, 0.0), row.report.train.total / row.est.hbm_bytes)
        log(f"[{i + 1}/{max_compiles}] {_describe(row.cand)}: {row.status}"
            + (f", MFU {100 * row.report.model().mfu_serial:.1f} % without overlap" if row.report else ""),
            file=sys.stderr)
    fitting = [r for r in rows if r.report is not None and r.report.train.total <= usable]
    for row in sorted(fitting, key=lambda r: -r.report.model().mfu_serial):
        c = apply(config, row.cand.overrides(slice_.chips))
        try:  # the eval step must fit too
            evaluated, _ = compile_cached(c, slice_, "eval", aot)
        except aot.DoesNotFit:
            row.status = "eval does not fit"
            continue
        row.report = dataclasses.replace(row.report, eval=evaluated.eval, compile_seconds={
            **row.report.compile_seconds, "eval": evaluated.compile_seconds["eval"]}, compile_cpu_seconds={
            **row.report.compile_cpu_seconds, "eval": evaluated.compile_cpu_seconds["eval"]})
        if row.report.peak <= usable:
            return rows, row
        row.status = "eval does not fit"
    return rows, None


def _compile_order(rows: list[Row]) -> list[Row]:
    """Best on paper first, but one of each (remat, grad_accum, rows per chip) before a second
    mesh of any: meshes that differ only in how data and fsdp split the chips score alike on
    paper, and compiling six of them would leave the other choices untried."""
    groups: dict[tuple, list[Row]] = {}
    for r in sorted(rows, key=lambda r: -r.est.mfu_serial):
        groups.setdefault((r.cand.remat, r.cand.grad_accum, r.cand.rows_per_chip), []).append(r)
    for members in groups.values():
        # Within 2 % on paper, the mesh with more HBM to spare first: the paper figures are not
        # finer than that, and the compiled program always needs more than estimated.
        members.sort(key=lambda r: (-math.floor(50 * r.est.mfu_serial), r.est.hbm_bytes))
    order = []
    while any(groups.values()):
        for key in list(groups):
            if groups[key]:
                order.append(groups[key].pop(0))
    return order


def _describe(c: Candidate) -> str:
    return (f"remat={c.remat} grad_accum={c.grad_accum} rows/chip={c.rows_per_chip:g} "
            f"mesh(data x fsdp x tensor)={c.mesh}")


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _gib(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_table(rows: list[Row], slice_, winner: Row | None, shown_on_paper: int = 6) -> str:
    """What was tried: compiled rows with the compiler's figures, then the rest on paper."""

    head = ("| remat | accum | rows/chip | mesh d×f×t | HBM est. | HBM compiled | MFU no overlap | MFU overlap | "
            "tokens/s/chip (no overlap) | sent / ideal FSDP | remat overhead | status |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    compiled = [r for r in rows if r.report is not None]
    rest = sorted((r for r in rows if r.report is None), key=lambda r: (r.status.startswith("pruned"),
                                                                          -r.est.mfu_serial))
    on_paper = [r for r in rest if not r.status.startswith("pruned")]
    corrected_shown = [r for r in rest if r.status == "pruned: memory (corrected)"][:3]
    pruned = [r for r in rest if r.status == "pruned: memory"]
    corrected = [r for r in rest if r.status == "pruned: memory (corrected)"]
    shown = (sorted(compiled, key=lambda r: -r.report.model().mfu_serial) + on_paper[:shown_on_paper]
             + corrected_shown)
    for r in shown:
        c = r.cand
        cells = [c.remat, str(c.grad_accum), f"{c.rows_per_chip:g}", c.mesh, _gib(r.est.hbm_bytes)]
        if r.report is not None:
            m, rep = r.report.model(), r.report
            ideal = rep.ideal_fsdp_bytes
            cells += [_gib(rep.peak), _pct(m.mfu_serial), _pct(m.mfu_overlapped),
                      f"{m.tokens_per_chip / m.serial_s:,.0f}",
                      f"{_gib(rep.moved_bytes)} / {_gib(ideal)} = {rep.moved_bytes / ideal:.2f}" if ideal else "-",
                      _pct(rep.flops_per_chip / rep.estimate_per_chip - 1)]
        else:
            cells += ["-", f"({_pct(r.est.mfu_serial)} est.)", "-", "-", "-", "-"]
        status = r.status + (" **winner**" if r is winner else "")
        lines.append("| " + " | ".join(cells + [status]) + " |")
    more = len(on_paper) - min(len(on_paper), shown_on_paper)
    lines.append(f"({more} more admitted by the memory estimate and not compiled; {len(corrected)} ruled out by "
                 f"it once corrected by the compiles; {len(pruned)} pruned by it"
                 + (f", the smallest estimate {_gib(min(r.est.hbm_bytes for r in pruned))} per chip" if pruned else "")
                 + ")")
    return "\n".join(lines)


def snippet(winner: Row, slice_, config_name: str, command: str) -> str:
    """The winning overrides, as lines to paste into a configs/*.py get_config and as flags."""
    m, c = winner.report.model(), winner.cand
    o = c.overrides(slice_.chips)
    flags = " ".join(f"--config.{k}={v}" for k, v in o.items())
    return "\n".join([
        f"# Planned by: {command}",
        f"# jax {importlib.metadata.version('jax')}, libtpu {importlib.metadata.version('libtpu')}; {slice_.name}: "
        f"HBM {winner.report.peak / 2**30:.2f} of {slice_.chip.hbm_bytes / 2**30:.2f} GiB per chip; step-time model "
        f"MFU {100 * m.mfu_serial:.1f} % without overlap, {100 * m.mfu_overlapped:.1f} % with full overlap "
        "(a model, not a measurement)",
        f"# As flags: {flags}",
        f'c.model.remat = "{c.remat}"',
        f"c.train.update(batch_size={c.batch_size(slice_.chips)}, grad_accum={c.grad_accum})",
        f"c.mesh.update(data={c.data}, fsdp={c.fsdp}, tensor={c.tensor})",
        "",
    ])
