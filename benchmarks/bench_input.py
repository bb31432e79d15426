"""Input pipeline throughput: training tokens/s one host's grain pipeline delivers, against the demand.

    python benchmarks/bench_input.py                                  # a generated piano dataset, base shapes
    python benchmarks/bench_input.py --dataset_dir=data/maestro/mgpt_events/1.0.0 --workers=0,1,2,4,8

The pipeline is the trainer's own (`mgpt.train.data.train_dataset`: read, decode, transpose,
(piece, chunk) crop, pack, batch) at the `base` shapes (seq_len 2048, batch 128 rows on
this host), with `data.workers` = 0 (everything in this process), 1 and 2 grain worker
processes. Tokens are batch rows x seq_len; each setting runs for --seconds after its
first batch (worker start-up is excluded). Wall-clock rates: on a shared machine, other
load lowers them.

The demand is what `base` consumes at 50 % MFU on H100s: 0.5 x 989 TFLOP/s divided by
base's training FLOPs per token (`ModelConfig.flops_per_token`, 6N + attention).

Each setting also reports tokens per CPU-second of the training process and of the
workers (their CPU time from start to exit, so a little start-up is included): on a
machine shared with other work these say what a worker delivers with a core to itself.
The last line reads `input pipeline: N tokens/s per worker process (...)`, N being the
best tokens per worker CPU-second over the settings with workers; the parenthesis says so,
and gives the best wall-clock rate per worker beside it.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import base  # noqa: E402
from data_prep.vocab import Vocabulary  # noqa: E402
from mgpt.train import data as data_lib  # noqa: E402
from mgpt.model.gpt import ModelConfig  # noqa: E402

H100_BF16_PEAK = 989e12


def generated_dataset(folder: str, pieces: int) -> str:
    """A piano dataset of MAESTRO-like lengths (a few hundred to ~20k events), built by data_prep."""
    from data_prep import build, synthetic

    midis = os.path.join(folder, "midi")
    os.makedirs(midis, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(pieces):
        notes = int(np.exp(rng.uniform(np.log(100), np.log(6000))))  # ~3 events per note
        with open(os.path.join(midis, f"p{i:03d}.mid"), "wb") as f:
            f.write(synthetic.piano_midi(i, num_notes=notes))
    return str(build.build_dataset([f"midi_dir:{midis}"], os.path.join(folder, "out"), num_workers=1,
                                   progress=False, verbose=False, split_percents=(100, 0, 0), parser="fast"))


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _live_children_cpu() -> dict[int, float]:
    """CPU seconds so far of each live child process, by pid (Linux /proc; {} elsewhere).

    Read while the workers run: RUSAGE_CHILDREN counts a child only once it is reaped, and
    grain's workers may still be exiting when the iterator is closed (the bench read 0 and
    divided by it)."""
    out, me = {}, os.getpid()
    try:
        tick, pids = os.sysconf("SC_CLK_TCK"), [p for p in os.listdir("/proc") if p.isdigit()]
    except (OSError, ValueError):
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
        if int(fields[1]) == me:
            out[int(pid)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def measure(source, vocab, lengths, c, workers: int, seconds: float) -> tuple[float, float, float]:
    """(tokens/s, tokens per CPU-second of this process, per CPU-second of the workers) with
    `workers` grain worker processes. Worker CPU counts from their start to their exit."""
    children0, before = _children_cpu(), set(_live_children_cpu())
    ds = data_lib.train_dataset(
        source, vocab, seq_len=c.data.seq_len, batch_size=c.train.batch_size, seed=0, transpose=c.data.transpose,
        num_packing_bins=c.data.num_packing_bins, read_threads=c.data.read_threads, prefetch=c.data.prefetch,
        workers=workers, lengths=lengths,
    )
    it = iter(ds)
    next(it)  # start-up: worker processes, first packing bins
    batches, start, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        next(it)
        batches += 1
    tokens = batches * c.train.batch_size * c.data.seq_len
    rate, main_cpu = tokens / (time.perf_counter() - start), time.process_time() - cpu0
    live = sum(t for pid, t in _live_children_cpu().items() if pid not in before)  # this setting's workers
    it.close()
    del it, ds
    gc.collect()  # reaps the worker processes, so their CPU time is counted
    worker_cpu = max(live, _children_cpu() - children0)
    per_worker_cpu = tokens / worker_cpu if workers and worker_cpu > 0 else float("nan")
    return rate, tokens / max(main_cpu, 1e-9), per_worker_cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset_dir", default="", help="a data_prep dataset (PATH); default: generate one")
    p.add_argument("--pieces", type=int, default=150, help="pieces of the generated dataset")
    p.add_argument("--workers", default="0,1,2", help="comma list of grain worker process counts")
    p.add_argument("--seconds", type=float, default=20.0, help="measuring time per setting")
    args = p.parse_args()

    c = base.get_config()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset_dir or generated_dataset(tmp, args.pieces)
        source = data_lib.open_source(dataset, "train", training_only=True)
        vocab = Vocabulary.load(dataset)
        lengths = data_lib.piece_lengths(source)
        print(f"dataset: {len(source)} pieces, {lengths.sum():,} events (median {int(np.median(lengths)):,}, "
              f"max {lengths.max():,}); base shapes: seq_len {c.data.seq_len}, {c.train.batch_size} rows per batch; "
              f"{os.cpu_count()} cores")
        rates, per_cpu = {}, {}
        for w in (int(x) for x in args.workers.split(",")):
            rates[w], main, per_cpu[w] = measure(source, vocab, lengths, c, w, args.seconds)
            workers_note = f", {per_cpu[w]:,.0f} per worker CPU-second" if w else ""
            print(f"workers {w}: {rates[w]:>12,.0f} tokens/s per host (wall clock); {main:,.0f} tokens per "
                  f"CPU-second of the training process{workers_note}")

    model = ModelConfig.from_config(c.model, vocab.size)
    demand = 0.5 * H100_BF16_PEAK / model.flops_per_token(c.data.seq_len)
    print(f"demand of base at 50% MFU: {demand:,.0f} tokens/s on one H100, {8 * demand:,.0f} on eight")
    with_workers = {w: r for w, r in rates.items() if w > 0}
    if with_workers:
        # A worker that has a core to itself delivers its tokens per CPU-second; on a busy
        # machine the wall-clock rate over worker count is lower, and is shown beside it.
        best = max(with_workers, key=lambda w: per_cpu[w])
        wall = max(r / w for w, r in with_workers.items())
        print(f"wall clock: {wall:,.0f} tokens/s per worker at best; "
              f"{os.getloadavg()[0]:.1f} load average over {os.cpu_count()} cores")
        print(f"input pipeline: {per_cpu[best]:,.0f} tokens/s per worker process "
              f"(per worker CPU-second, {best} workers; wall clock {wall:,.0f} per worker)")


if __name__ == "__main__":
    main()
