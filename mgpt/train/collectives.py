"""The collectives of a compiled XLA program, counted as they run: read from its HLO text.

`collectives_of(compiled.as_text(), num_devices)` lists every collective of one execution
on one chip, with the bytes each moves over the interconnect. Three things make the naive
count (one per HLO instruction, sized by its result) wrong on TPU, and are undone here:

- Loops. An op inside a while loop runs once per iteration (XLA's `known_trip_count`, else
  the condition's `i < N`): a per-layer gather under a scan over 16 layers runs 16 times.
- Chains. XLA:TPU (v5e) splits one all-gather into a chain of async fusions (a start, a few
  matmul fusions that each move a window, a done) whose instructions share a `chain_id`
  frontend attribute, and each piece shows the full result shape. A chain is one gather.
- Gathers lowered as all-reduce. A weight gather may be written as "each chip puts its
  shard into a zero buffer (dynamic-update-slice into a broadcast 0), then all-reduce":
  it is a gather, and is reported as one, though it moves an all-reduce's bytes.

Bytes moved per chip follow the bandwidth-optimal (ring) algorithm for a group of n chips
and an array of S bytes (the gathered or reduced array, not one shard): all-gather,
reduce-scatter and all-to-all move (n-1)/n x S, all-reduce 2(n-1)/n x S (a reduce-scatter
then an all-gather), a collective-permute sends its S once.
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the program, on one chip."""

    kind: str  # what it does: one of KINDS
    op: str  # the HLO op that does it ('all-reduce' for a gather into zeros)
    group: int  # chips that take part together (its replica group)
    nbytes: int  # the whole array: gathered result, reduced array, reduce-scatter input, permuted buffer
    times: int  # executions per run of the program (loop trips)
    asynchronous: bool = False  # started and awaited apart (a -start op or an async fusion): may overlap compute

    @property
    def moved(self) -> float:
        """Bytes this chip sends per run of the program, by the ring formula of the op it runs as."""
        n = self.group
        if self.op == "collective-permute":
            share = 1.0
        elif n <= 1:
            share = 0.0
        elif self.op == "all-reduce":
            share = 2.0 * (n - 1) / n
        else:
            share = (n - 1) / n
        return self.times * share * self.nbytes


@dataclasses.dataclass(frozen=True)
class _Instr:
    name: str
    result: str
    op: str
    rest: str  # operands and attributes

    @property
    def operands(self) -> list[str]:
        head = self.rest.split("),", 1)[0]
        return re.findall(r"%([\w.\-]+)", head)


def shape_bytes(text: str) -> list[int]:
    """Bytes of each array shape written in `text` ('(bf16[8,2]{1,0}, f32[])' -> [32, 4])."""
    return [_ITEM_BYTES.get(t, 4) * math.prod(int(n) for n in dims.split(",") if n) for t, dims in _SHAPE.findall(text)]


def parse_computations(hlo_text: str) -> tuple[dict[str, dict[str, _Instr]], str | None]:
    """{computation: {instruction name: _Instr}} in order, and the entry computation's name."""
    computations: dict[str, dict[str, _Instr]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = {}
            entry = current if header.group(1) else entry
        elif current is not None:
            m = _INSTRUCTION.match(line)
            if m:
                name, result, op, rest = m.groups()
                computations[current][name] = _Instr(name, result, op, rest)
                if line.lstrip().startswith("ROOT"):
                    computations[current]["__root__"] = computations[current][name]
    return computations, entry


def group_size(rest: str, num_devices: int) -> int:
    """Chips per replica group, from any of the forms XLA writes: {{0,1},{2,3}}; [2,2]<=[4]
    (iota: groups x size); mesh['a'=4,'b'=2] {'a'} (the named axes' sizes); {} (all)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", rest)  # may name device_ids=(...) between
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", rest)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,\s]*)\}", rest)
    if m:
        return len([g for g in m.group(1).split(",") if g.strip()])
    m = re.search(r"source_target_pairs=", rest)
    return 2 if m else num_devices


def _trip_count(condition: dict[str, _Instr]) -> int:
    """Iterations of a scan-shaped loop from its condition `i < N` (the counter starts at 0),
    where XLA:TPU gives no known_trip_count; 1 when the condition has another shape."""
    root = condition.get("__root__")
    if root is None or root.op != "compare" or "direction=LT" not in root.rest:
        return 1
    constants = [int(c) for i in condition.values() if i.op == "constant" and i is not root
                 for c in re.findall(r"^(\d+)\)", i.rest)]
    return constants[0] if len(set(constants)) == 1 else 1


def _is_zero(name: str, comp: dict[str, _Instr]) -> bool:
    instr = comp.get(name)
    if instr is None:
        return False
    if instr.op == "constant":
        return re.match(r"^-?0(\.0*)?\)", instr.rest) is not None
    if instr.op in ("broadcast", "copy", "bitcast", "reshape"):
        return bool(instr.operands) and _is_zero(instr.operands[0], comp)
    return False


def _is_zero_padded_shard(name: str, comp: dict[str, _Instr], computations, depth: int = 0) -> bool:
    """Whether `name` is a buffer of zeros with one shard written in: what an all-reduce turns
    into a gather. Follows copies and bitcasts, and into the fusion that computes it."""
    instr = comp.get(name)
    if instr is None or depth > 8:
        return False
    if instr.op in ("copy", "copy-done", "bitcast", "copy-start") and instr.operands:
        return _is_zero_padded_shard(instr.operands[0], comp, computations, depth + 1)
    if instr.op == "dynamic-update-slice" and instr.operands:
        return _is_zero(instr.operands[0], comp)
    if instr.op == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", instr.rest)
        inner = computations.get(called.group(1), {}) if called else {}
        root = inner.get("__root__")
        while root is not None and root.op in ("bitcast", "copy") and root.operands:
            root = inner.get(root.operands[0])
        if root is None or root.op != "dynamic-update-slice" or not root.operands:
            return False
        base = inner.get(root.operands[0])
        if base is not None and base.op == "parameter":  # the zeros come from the caller
            index = int(re.match(r"^(\d+)\)", base.rest).group(1))
            outer = instr.operands
            return index < len(outer) and _is_zero(outer[index], comp)
        return _is_zero(root.operands[0], inner)
    return False


def collectives_of(hlo_text: str, num_devices: int) -> list[Collective]:
    """Every collective of one run of an optimized HLO module, on one chip (see the module doc)."""
    computations, entry = parse_computations(hlo_text)
    found: list[Collective] = []
    chains: dict[tuple[str, int], Collective] = {}  # (chain_id, times) -> the chain, counted once

    def add(c: Collective, chain: str | None):
        if chain is None:
            found.append(c)
            return
        key = (chain, c.times)
        seen = chains.get(key)
        if seen is None or c.nbytes > seen.nbytes:  # each piece shows the whole result
            chains[key] = c

    def visit(name: str, times: int, depth: int = 0):
        comp = computations.get(name)
        if comp is None or depth > 50:
            return
        for key, instr in comp.items():
            if key == "__root__":
                continue
            op = instr.op
            kind = op.removesuffix("-start")
            if kind in KINDS and not op.endswith("-done"):
                chain = re.search(r'chain_id="(\d+)"', instr.rest)
                asynchronous = op.endswith("-start") or chain is not None or "async_collective_fusion" in instr.rest
                group = group_size(instr.rest, num_devices)
                sizes = shape_bytes(instr.result)
                if op.endswith("-start") and kind != "all-reduce":
                    # An async gather's (or permute's) tuple holds its operands, then its
                    # results, then (permutes) scalars of context: the results are the array.
                    sizes = shape_bytes(instr.result.replace("u32[]", ""))
                    sizes = sizes[len(sizes) // 2:]
                if kind == "reduce-scatter":  # its result is one shard: the array is n of them
                    sizes = [s * group for s in sizes]
                if kind == "all-reduce":
                    operands = instr.operands
                    gathers = [i for i, o in enumerate(operands) if _is_zero_padded_shard(o, comp, computations)]
                    if len(sizes) == len(operands) and gathers:
                        gathered = sum(sizes[i] for i in gathers)
                        add(Collective("all-gather", "all-reduce", group, gathered, times, asynchronous), None)
                        sizes = [s for i, s in enumerate(sizes) if i not in gathers]
                        if not sizes:
                            continue
                add(Collective(kind, kind, group, sum(sizes), times, asynchronous), chain.group(1) if chain else None)
            trips = 1
            if op == "while":
                n = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.rest)
                cond = re.search(r"condition=%?([\w.\-]+)", instr.rest)
                trips = int(n.group(1)) if n else _trip_count(computations.get(cond.group(1), {}) if cond else {})
            for callee in re.findall(r"\b(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)",
                                     instr.rest):
                visit(callee, times * trips, depth + 1)
            for callees in re.findall(r"branch_computations=\{([^}]*)\}", instr.rest):
                for c in callees.split(","):
                    visit(c.strip().lstrip("%"), times, depth + 1)

    if entry is not None:
        visit(entry, 1)
    return found + list(chains.values())


@dataclasses.dataclass(frozen=True)
class Totals:
    """The collectives of one kind, per run of the program, on one chip."""

    count: int
    nbytes: int  # sum of the arrays (see Collective.nbytes)
    moved: float  # bytes sent, ring formula
    as_all_reduce: int = 0  # of `count`, gathers lowered as all-reduce into zeros


def summarize(collectives: list[Collective]) -> dict[str, Totals]:
    """{kind: Totals}, in KINDS order."""
    out = {}
    for kind in KINDS:
        mine = [c for c in collectives if c.kind == kind]
        if mine:
            out[kind] = Totals(sum(c.times for c in mine), sum(c.times * c.nbytes for c in mine),
                               sum(c.moved for c in mine), sum(c.times for c in mine if c.op != kind))
    return out


def moved_bytes(collectives: list[Collective], asynchronous: bool | None = None) -> float:
    """Bytes sent per chip by all of them, or only by the asynchronous (True) or blocking (False) ones."""
    return sum(c.moved for c in collectives if asynchronous is None or c.asynchronous == asynchronous)
