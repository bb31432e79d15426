"""Build a training dataset: sources -> note-seq performance events -> TFDS ArrayRecord.

    python -m data_prep.build --source=music21:bach,ryansMammoth:200 --output_dir=data/demo
    python -m data_prep.build --source=maestro:/data/maestro-v3.0.0 --output_dir=data/maestro \
        --time_stretch --num_workers=16

The last line printed is the dataset directory PATH:

    tfds.builder_from_directory(PATH).as_data_source("train")   # random access, no TensorFlow

Each record: `tokens` int32[None] (event ids only: no STYLE/EOS/PAD), `piece_id`, `path`
(relative to the source root), `source`, `style` (normalized label, '' if none),
`composer` ('' if none). PATH also holds `vocab.json`, `skipped.jsonl` (every input that
was left out, with the reason) and `build.json` (sources, options, counts, and per-style
note lengths of the train split: `note_seconds`, which sets the sampler's note-length guard).

The dataset is written in a staging folder beside PATH and moved into place by one
rename only when complete: an interrupted build never leaves a PATH that looks
finished, and an interrupted `--overwrite` leaves the dataset already there intact. A split
with no pieces is left out (TFDS cannot store an empty split); `info.splits` lists those
present. Time-stretched copies (`--time_stretch`) are made of training pieces only, so
no copy ever crosses a split; their piece_id ends in `@x<factor>`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process  # its BrokenProcessPool is caught even when no pool was made
import contextlib
import dataclasses
import errno
import fcntl
import functools
import glob
import importlib.util
import inspect
import io
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from data_prep import midi, sources
from data_prep.vocab import UNKNOWN_STYLE, Vocabulary, normalize_label
from mgpt.errors import UserError, is_disk_full, reported

DATASET_NAME = "mgpt_events"
DATASET_VERSION = "1.0.0"
STRETCH_FACTORS = (0.95, 0.975, 1.025, 1.05)

# The README demo: four clearly different styles from the music21 wheel (chorales,
# Renaissance polyphony, British/Irish dance tunes, German songs), about 100k events
# each, small enough to build in about two minutes on two cores.
DEMO_SOURCES = ("music21:bach:135,palestrina:85,ryansMammoth:80,oneills1850:80,essenFolksong:580",)
DEMO_DIR = "data/music21_demo"  # the demo's dataset: configs/common.py trains on it, mgpt.train.data builds it on first use
# The vocabulary's settings and their defaults, as data_prep.vocab.Vocabulary takes them.
VOCAB_DEFAULTS = {name: p.default for name, p in inspect.signature(Vocabulary).parameters.items()
                  if p.kind is p.KEYWORD_ONLY}


def dataset_path(output_dir: str | os.PathLike) -> pathlib.Path:
    """Where build_dataset(…, output_dir) puts the dataset (the PATH it prints)."""
    return pathlib.Path(output_dir) / DATASET_NAME / DATASET_VERSION


def is_complete(path: str | os.PathLike) -> bool:
    path = pathlib.Path(path)
    return all((path / f).is_file() for f in ("dataset_info.json", "vocab.json", "skipped.jsonl"))


def ensure_dataset(output_dir: str | os.PathLike = DEMO_DIR, **opts) -> pathlib.Path:
    """The embedded demo dataset (DEMO_SOURCES) in output_dir: built once, then reused.

    A dataset built there from another DEMO_SOURCES (an older mgpt) is rebuilt.
    """
    path = dataset_path(output_dir)
    if _is_demo(path):
        return path
    o = _options(dict(opts, overwrite=True))
    _check_writable(output_dir)
    with _build_lock(output_dir):
        if _is_demo(path):  # another process built it while we waited for the lock
            return path
        return _build(list(DEMO_SOURCES), output_dir, o)


def _is_demo(path: pathlib.Path) -> bool:
    if not is_complete(path):
        return False
    try:
        with open(path / "build.json") as f:
            return json.load(f).get("sources") == list(DEMO_SOURCES)
    except (OSError, ValueError):
        return False


def build_dataset(sources_: Sequence[str], output_dir: str | os.PathLike, **opts) -> pathlib.Path:
    """Convert every piece of `sources_` into a dataset in output_dir; returns its PATH.

    Options (all keyword): num_workers (default: all cores), num_velocity_bins,
    min_pitch, max_pitch, max_shift_steps, steps_per_second (vocabulary), time_stretch
    (bool), stretch_factors, file_format ('array_record' or 'tfrecord'), max_pieces
    (per source), split_percents ((90, 5, 5)), overwrite, parser ('fast' or 'note_seq'),
    progress (tqdm bar), verbose (print the summary).
    Raises UserError (a ValueError) with a one-line message for bad settings or sources.
    """
    o = _options(opts)  # bad settings fail at once, before any work
    _check_writable(output_dir)
    with _build_lock(output_dir):
        return _build(list(sources_), output_dir, o)


@dataclasses.dataclass
class _Options:
    num_workers: int = 0
    num_velocity_bins: int = VOCAB_DEFAULTS["num_velocity_bins"]
    min_pitch: int = VOCAB_DEFAULTS["min_pitch"]
    max_pitch: int = VOCAB_DEFAULTS["max_pitch"]
    max_shift_steps: int = VOCAB_DEFAULTS["max_shift_steps"]
    steps_per_second: int = VOCAB_DEFAULTS["steps_per_second"]
    time_stretch: bool = False
    stretch_factors: tuple[float, ...] = STRETCH_FACTORS
    file_format: str = "array_record"
    max_pieces: int | None = None
    split_percents: tuple[float, float, float] = (90.0, 5.0, 5.0)
    overwrite: bool = False
    parser: str = "fast"
    progress: bool = True
    verbose: bool = True

    def vocab(self, styles=()) -> Vocabulary:
        return Vocabulary(
            styles,
            min_pitch=self.min_pitch,
            max_pitch=self.max_pitch,
            max_shift_steps=self.max_shift_steps,
            num_velocity_bins=self.num_velocity_bins,
            steps_per_second=self.steps_per_second,
        )


def _options(opts: dict) -> _Options:
    names = {f.name for f in dataclasses.fields(_Options)}
    unknown = sorted(set(opts) - names)
    if unknown:
        raise TypeError(f"build_dataset: unknown option(s) {', '.join(unknown)}")
    o = _Options(**opts)
    o.stretch_factors = tuple(float(f) for f in o.stretch_factors)
    o.split_percents = tuple(float(p) for p in o.split_percents)
    if o.file_format not in ("array_record", "tfrecord"):
        raise UserError(f"--file_format={o.file_format}: expected array_record or tfrecord")
    if o.file_format == "tfrecord" and not _have_tensorflow():
        raise UserError(
            "--file_format=tfrecord needs TensorFlow: pip install 'mgpt[tf]' (or keep the default array_record)"
        )
    if len(o.split_percents) != 3 or min(o.split_percents) < 0 or sum(o.split_percents) <= 0:
        raise UserError(f"--splits={o.split_percents}: expected three non-negative percents (train,validation,test)")
    if o.time_stretch and (not o.stretch_factors or min(o.stretch_factors) <= 0):
        raise UserError(f"--stretch_factors={o.stretch_factors}: expected positive factors")
    if o.max_pieces is not None and o.max_pieces < 1:
        raise UserError(f"--max_pieces={o.max_pieces}: expected at least 1")
    if o.parser not in ("fast", "note_seq"):
        raise UserError(f"--parser={o.parser}: expected fast or note_seq")
    try:  # bad vocabulary settings fail before any work
        o.vocab()
    except ValueError as e:  # Vocabulary's own check, which names no flag
        raise UserError(f"vocabulary flags: {e}") from None
    if o.num_workers <= 0:
        o.num_workers = os.cpu_count() or 1
    return o


def _have_tensorflow() -> bool:
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def _check_writable(output_dir) -> None:
    """A one-line error before any work when output_dir cannot be made or written (under a file, read-only)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        reason = e.strerror or e
        raise UserError(f"--output_dir={output_dir}: cannot write there ({reason}); pick another dir") from None


@contextlib.contextmanager
def _build_lock(output_dir):
    """One build per output_dir at a time (e.g. two trainers asking for the demo data)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, ".build.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- conversion
@dataclasses.dataclass
class _Result:
    index: int
    records: list[dict]  # tokens, piece_id, path, source, style, composer
    skip_reason: str = ""
    seconds: float = 0.0  # music in the original piece


_worker_opts: _Options | None = None
_worker_vocab: Vocabulary | None = None


def _init_worker(opts: _Options, parent_pid: int | None = None) -> None:
    global _worker_opts, _worker_vocab
    if parent_pid is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
        _die_with_parent(parent_pid)
    _worker_opts, _worker_vocab = opts, opts.vocab()


def _die_with_parent(parent_pid: int) -> None:
    """A worker whose parent is killed (kill -9, the OOM killer) would block forever on its
    queues, holding its memory: have the kernel kill it, or else watch the parent."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    else:
        import threading

        def watch():
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)


def _convert(job: tuple[int, sources.Item, str]) -> _Result:
    """One piece -> its records (the original, plus stretched copies in train)."""
    index, item, split = job
    opts, vocab = _worker_opts, _worker_vocab
    try:
        notes, composer = sources.load(item, parser=opts.parser)
        tokens = vocab.encode_notes(notes.pitch, notes.velocity, notes.start_s, notes.end_s)
        if len(tokens) == 0:
            raise midi.SkipPiece(f"no notes in the pitch range {vocab.min_pitch}..{vocab.max_pitch}")
    except midi.SkipPiece as e:
        return _Result(index, [], str(e))
    except Exception as e:  # noqa: BLE001 - junk input must never abort a run; the reason is kept
        return _Result(index, [], f"unexpected error: {midi.one_line(e)}")
    base = dict(path=item.path, source=item.source, style=item.style, composer=composer)
    records = [dict(base, tokens=tokens, piece_id=item.piece_id)]
    if opts.time_stretch and split == "train":
        for factor in opts.stretch_factors:
            s = notes.stretched(factor)
            stretched = vocab.encode_notes(s.pitch, s.velocity, s.start_s, s.end_s)
            records.append(dict(base, tokens=stretched, piece_id=f"{item.piece_id}@x{factor:g}"))
    return _Result(index, records, seconds=notes.seconds)


class _Spool:
    """Converted records on disk, per split, until TFDS writes them (bounded memory)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._files: dict[str, tuple] = {}
        self.counts = collections.Counter()

    def add(self, split: str, key: str, record: dict) -> None:
        if split not in self._files:
            tok = open(os.path.join(self.folder, f"{split}.i32"), "wb")
            meta = open(os.path.join(self.folder, f"{split}.jsonl"), "w")
            self._files[split] = (tok, meta, [0])
        tok, meta, offset = self._files[split]
        tokens = np.asarray(record["tokens"], "<i4")
        tok.write(tokens.tobytes())
        fields = {k: v for k, v in record.items() if k != "tokens"}
        meta.write(json.dumps(dict(fields, key=key, offset=offset[0], length=len(tokens))) + "\n")
        offset[0] += len(tokens)
        self.counts[split] += 1

    def close(self) -> None:
        for tok, meta, _ in self._files.values():
            tok.close()
            meta.close()

    def splits(self) -> list[str]:
        return [s for s in sources.SPLITS if self.counts[s]]

    def read(self, split: str):
        tokens_path = os.path.join(self.folder, f"{split}.i32")
        all_tokens = np.memmap(tokens_path, "<i4", mode="r") if os.path.getsize(tokens_path) else None
        with open(os.path.join(self.folder, f"{split}.jsonl")) as f:
            for line in f:
                m = json.loads(line)
                a, n = m.pop("offset"), m.pop("length")
                key = m.pop("key")
                tokens = np.array(all_tokens[a : a + n], np.int32) if n else np.zeros(0, np.int32)
                yield key, dict(m, tokens=tokens)


def _list_all(specs: list[str], opts: _Options) -> list[sources.Item]:
    items, seen = [], set()
    for spec in specs:
        found = sources.list_items(spec)
        if opts.max_pieces is not None:
            found = sources.sample(found, opts.max_pieces)
        for it in found:
            if (it.source, it.root, it.piece_id) not in seen:  # the same source given twice
                seen.add((it.source, it.root, it.piece_id))
                items.append(it)
    return items


def _build(specs: list[str], output_dir, o: _Options) -> pathlib.Path:
    """`_build_steps`; a KeyboardInterrupt that comes once the new dataset is in place (while the
    work folders are removed or the summary printed) carries `.written`, its PATH, so that the
    one line `main` prints says so instead of "nothing was written"."""
    written: list[pathlib.Path] = []
    try:
        return _build_steps(specs, output_dir, o, written)
    except KeyboardInterrupt as e:
        if written:
            e.written = written[0]
        raise


def _build_steps(specs: list[str], output_dir, o: _Options, written: list) -> pathlib.Path:
    if not specs:
        raise UserError("--source: give at least one source (midi_dir:PATH, maestro:PATH, asap:PATH, music21:NAMES)")
    path = dataset_path(output_dir)
    _recover_swap(path)
    if path.exists() and not o.overwrite:
        raise UserError(
            f"--output_dir={output_dir}: {path} already holds a dataset (pass --overwrite or pick another dir)"
        )
    items = _list_all(specs, o)
    if not items:
        raise UserError(f"--source={','.join(specs)}: no input files found")
    jobs = [(i, it, sources.assign_split(it, o.split_percents)) for i, it in enumerate(items)]
    # TFDS orders each split by a hash of the records' keys, so a key names its source by its place
    # among the inputs, not by its folder: the same --source then gives the same records in the same
    # order wherever it is built (music21's corpus lives inside each checkout's venv).
    root_ids = {root: n for n, root in enumerate(dict.fromkeys(it.root for it in items))}

    t0 = time.time()
    os.makedirs(output_dir, exist_ok=True)
    _remove_leftovers(output_dir)
    spool_dir = tempfile.mkdtemp(prefix=".spool.", dir=output_dir)
    staging = tempfile.mkdtemp(prefix=".staging.", dir=output_dir)
    results = None
    try:
        spool = _Spool(spool_dir)
        skipped, stats = [], _Stats(o.vocab())
        # Closed in `finally`: the workers stop as soon as anything fails here, not when the
        # generator is collected (a traceback kept for the error message keeps it alive).
        results = _run_jobs(jobs, o)
        for r in results:
            item, split = items[r.index], jobs[r.index][2]
            if r.skip_reason:
                skipped.append(
                    dict(
                        path=item.path, piece_id=item.piece_id, source=item.source, root=item.root, reason=r.skip_reason
                    )
                )
                continue
            for rec in r.records:
                spool.add(split, f"{item.source}:{root_ids[item.root]}:{rec['piece_id']}", rec)
                stats.add(split, rec)
        spool.close()
        convert_s = time.time() - t0
        if not spool.splits():
            reasons = collections.Counter(s["reason"] for s in skipped).most_common(3)
            raise UserError(
                f"--source={','.join(specs)}: none of the {len(items)} inputs could be used "
                f"(most common reasons: {'; '.join(f'{r} ({n})' for r, n in reasons)})"
            )
        vocab = o.vocab(sorted({s for s in stats.styles if s}))
        summary = dict(
            sources=specs,
            options={k: v for k, v in dataclasses.asdict(o).items() if k not in ("progress", "verbose")},
            inputs=len(items),
            skipped=len(skipped),
            splits=stats.split_table(),
            styles=stats.style_table(),
            note_seconds=note_length_table(stats.note_lengths),
            convert_seconds=round(convert_s, 2),
        )
        extra = {
            "vocab.json": vocab.to_json(),
            "skipped.jsonl": sorted(skipped, key=lambda r: (r["source"], r["root"], r["piece_id"])),
            "build.json": summary,
        }
        if o.progress:
            print(f"writing {sum(spool.counts.values()):,} records as {o.file_format} ...", file=sys.stderr, flush=True)
        _write_tfds(pathlib.Path(staging), spool, extra, o)
        old = _swap_in(dataset_path(staging), path)
        written.append(path)  # from here an interrupt finds the new dataset complete
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if results is not None:
            results.close()
        shutil.rmtree(spool_dir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    if o.verbose:
        _print_summary(path, summary, stats, skipped, convert_s, time.time() - t0, o)
    return path


def _remove_leftovers(output_dir) -> None:
    """Work folders of builds that were killed (we hold the lock: none is running)."""
    leftovers = glob.glob(os.path.join(output_dir, ".spool.*")) + glob.glob(os.path.join(output_dir, ".staging.*"))
    leftovers += glob.glob(os.path.join(output_dir, DATASET_NAME, "incomplete.*"))
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a))


def _swap_in(new: pathlib.Path, path: pathlib.Path) -> pathlib.Path | None:
    """Put the complete dataset `new` at `path`, replacing any old one, by one rename; returns
    the folder now holding the old dataset (None if there was none), for the caller to delete
    once it has noted that the new one is in place.

    Until that rename, readers and a killed build see the old dataset whole. Where the
    filesystem cannot exchange two folders, the old one is first renamed aside to
    `path.replaced`; `_recover_swap` puts it back if we die between the two renames.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.rename(new, path)
        return None
    if _exchange(new, path):
        return new  # `new` now holds the old dataset
    aside = path.with_name(path.name + ".replaced")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(path, aside)
    os.rename(new, path)
    return aside


def _recover_swap(path: pathlib.Path) -> None:
    """A build killed between _swap_in's two renames: the old dataset goes back in place."""
    aside = path.with_name(path.name + ".replaced")
    if aside.exists():
        if path.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, path)


def recover_swap(path: str | os.PathLike) -> None:
    """For a reader of the dataset at PATH: where a build was killed between `_swap_in`'s two
    renames, the old dataset is put back from PATH.replaced (under the build lock, so that a
    live build's swap is never undone), as the next build would. Where PATH is there, a
    leftover PATH.replaced is only old data: it is left for the next build to remove."""
    path = pathlib.Path(os.path.abspath(path))  # '.' and './' have a name once absolute
    if not path.name:  # the filesystem root: nothing can sit beside it
        return
    aside = path.with_name(path.name + ".replaced")
    if not aside.exists() or path.exists():
        return
    try:
        with _build_lock(path.parent.parent):
            _recover_swap(path)
    except OSError as e:
        raise UserError(f"{aside}: a killed build left the dataset here and it cannot be put back "
                        f"({e.strerror or e}); rename it to {path}") from None


def _run_jobs(jobs, o: _Options):
    """Yield _Results as pieces finish, with a tqdm bar; in-process for one worker."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="piece", desc="converting", disable=not o.progress, smoothing=0.05)
    workers = min(o.num_workers, len(jobs))
    events = 0
    pool = None
    try:
        if workers <= 1:
            _init_worker(o)
            results = map(_convert, jobs)
        else:
            # spawn, not fork: the caller may have started JAX (threads) before asking for
            # data. A worker that dies (out of memory) fails the run instead of hanging it.
            # Workers start with SIGINT blocked (the mask survives exec): a terminal's Ctrl-C
            # reaches the whole process group, and a worker still starting up would die of it
            # with a traceback. The main process handles Ctrl-C and stops them itself.
            # (Blocked after the pool exists: starting multiprocessing's resource tracker, which
            # the pool's queues do, unblocks SIGINT again.)
            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(o, os.getpid()),
            )
            size = max(1, min(8, len(jobs) // (workers * 16)))
            chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                futures = [pool.submit(_convert_many, chunk) for chunk in chunks]  # spawns the workers
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            results = (r for f in concurrent.futures.as_completed(futures) for r in f.result())
        for r in results:
            events += sum(len(rec["tokens"]) for rec in r.records)
            bar.update(1)
            bar.set_postfix_str(f"{events / max(bar.format_dict['elapsed'], 1e-9):,.0f} events/s", refresh=False)
            yield r
    except concurrent.futures.process.BrokenProcessPool:
        raise RuntimeError("a worker process died while converting (out of memory?); try fewer --num_workers") from None
    except BaseException:  # Ctrl-C or a failing consumer: stop the workers now, not after their queue
        if pool is not None:
            _stop_now(pool)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        bar.close()


def _stop_now(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Kill the workers and reap them before returning: a worker left mid-task (or a zombie)
    can keep the executor's threads, and so the interpreter's exit, waiting forever."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    # (Taken now: shutdown() drops the executor's references to them.)
    manager = getattr(pool, "_executor_manager_thread", None)
    result_queue = getattr(pool, "_result_queue", None)
    for process in processes:
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=10)
    # A worker killed halfway through sending a result leaves the executor's manager thread
    # blocked reading the rest of that message, and the interpreter joins that thread at exit:
    # the build hung after its last line. Our own copy of the pipe's write end is all that
    # keeps it open now the workers are gone; closing it ends the read (EOF, a broken pool).
    if result_queue is not None:
        result_queue._writer.close()
    if manager is not None:
        manager.join(timeout=5)


def _convert_many(jobs) -> list[_Result]:
    return [_convert(job) for job in jobs]


NOTE_PERCENTILES = (50, 90, 99, 99.5, 99.9)


def note_length_table(lengths_by_style: dict[str, list[np.ndarray]]) -> dict[str, dict]:
    """{style: {'notes', 'mean', 'p50', ..., 'p99.9', 'max', 'share_ge_4s'}} in seconds, plus 'all'."""
    out = {}
    groups = dict(sorted(lengths_by_style.items()))
    groups["all"] = [x for arrays in lengths_by_style.values() for x in arrays]
    for style, arrays in groups.items():
        x = np.concatenate(arrays) if arrays else np.zeros(0)
        if not len(x):
            continue
        row = {"notes": int(len(x)), "mean": round(float(x.mean()), 4)}
        row.update({f"p{q:g}": round(float(v), 4) for q, v in zip(NOTE_PERCENTILES, np.percentile(x, NOTE_PERCENTILES))})
        row.update(max=round(float(x.max()), 4), share_ge_4s=round(float((x >= 4.0).mean()), 5))
        out[style] = row
    return out


class _Stats:
    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.split = collections.defaultdict(lambda: collections.Counter())
        self.style = collections.defaultdict(lambda: collections.Counter())
        self.styles = set()
        self.note_lengths = collections.defaultdict(list)  # style token name -> arrays (train split)

    def add(self, split, rec):
        n = len(rec["tokens"])
        secs = self.vocab.seconds(rec["tokens"])
        stretched = "@x" in rec["piece_id"]
        for table, key in ((self.split, split), (self.style, rec["style"] or "(none)")):
            table[key]["copies" if stretched else "pieces"] += 1
            table[key]["events"] += n
            table[key]["seconds"] += secs
        self.styles.add(rec["style"])
        if split == "train":  # what the model learns from: the sampler's note-length guard reads it
            self.note_lengths[normalize_label(rec["style"]) if rec["style"] else UNKNOWN_STYLE].append(
                self.vocab.note_lengths(rec["tokens"]))

    def split_table(self):
        return {k: dict(v) for k, v in self.split.items()}

    def style_table(self):
        return {k: dict(v) for k, v in sorted(self.style.items())}

    def total(self, key):
        return sum(v[key] for v in self.split.values())


def _print_summary(path, summary, stats, skipped, convert_s, total_s, o):
    def rows(table, order):
        for name in order:
            v = table.get(name)
            if v:
                extra = f" (+{v['copies']} stretched)" if v.get("copies") else ""
                print(
                    f"  {name:<20} {v['pieces']:>7} pieces{extra:<16} {v['events']:>11,} events {v['seconds'] / 3600:>8.2f} h"
                )

    events = stats.total("events")
    print(f"built {path}")
    print("splits:")
    rows(summary["splits"], sources.SPLITS)
    print("styles:")
    rows(summary["styles"], list(summary["styles"]))
    reasons = collections.Counter(s["reason"].split(":")[0].split("(")[0].strip() for s in skipped)
    detail = ", ".join(f"{r}: {n}" for r, n in reasons.most_common(5))
    print(
        f"skipped {len(skipped)} of {summary['inputs']} inputs" + (f" ({detail}; see skipped.jsonl)" if skipped else "")
    )
    print(
        f"{events:,} events, {stats.total('seconds') / 3600:.2f} h of music; converted in {convert_s:.1f} s "
        f"({events / max(convert_s, 1e-9):,.0f} events/s on {min(o.num_workers, summary['inputs'])} workers), "
        f"{total_s:.1f} s in all"
    )
    missing = [s for s in sources.SPLITS if s not in summary["splits"]]
    if missing:
        print(f"note: no pieces fell in {', '.join(missing)}: that split is absent")


# ----------------------------------------------------------------------------- TFDS
def _write_tfds(data_dir: pathlib.Path, spool: _Spool, extra: dict, o: _Options) -> None:
    import tensorflow_datasets as tfds
    from absl import logging

    tfds.disable_progress_bar()
    builder = _EventsBuilder(spool=spool, extra_files=extra, data_dir=os.fspath(data_dir), file_format=o.file_format)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # TFDS narrates every shard at INFO
    try:
        with tempfile.TemporaryDirectory(dir=spool.folder) as downloads, contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_dir=downloads,
                # data_dir is a fresh staging folder: TFDS never sees (or deletes) the old dataset.
                download_config=tfds.download.DownloadConfig(
                    try_download_gcs=False, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
                ),
            )
    finally:
        logging.set_verbosity(verbosity)


def _features():
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict(
        {
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "piece_id": tfds.features.Text(),
            "path": tfds.features.Text(),
            "source": tfds.features.Text(),
            "style": tfds.features.Text(),
            "composer": tfds.features.Text(),
        }
    )


@functools.cache
def _builder_class():
    """Defined lazily so that importing data_prep.build does not import TFDS."""
    import tensorflow_datasets as tfds

    # Not registered by name: readers use tfds.builder_from_directory(PATH).
    class MgptEvents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Symbolic music as note-seq performance event ids (see data_prep/build.py)."""

        name = DATASET_NAME
        VERSION = tfds.core.Version(DATASET_VERSION)

        def __init__(self, *, spool: _Spool, extra_files: dict, **kwargs):
            self._spool, self._extra_files = spool, extra_files
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="note-seq performance events (mgpt); see build.json for sources and counts",
                features=_features(),
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in self._spool.splits()}

        def _generate_examples(self, split):
            yield from self._spool.read(split)

        def _download_and_prepare(self, dl_manager, download_config):
            super()._download_and_prepare(dl_manager, download_config)
            # self.data_dir is TFDS's incomplete.* folder here: these land atomically too.
            for name, content in self._extra_files.items():
                with open(os.path.join(self.data_dir, name), "w") as f:
                    if name.endswith(".jsonl"):
                        f.writelines(json.dumps(row) + "\n" for row in content)
                    else:
                        json.dump(content, f, indent=1)

    return MgptEvents


def _EventsBuilder(**kwargs):
    return _builder_class()(**kwargs)


# ----------------------------------------------------------------------------- CLI
@reported
def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    del argv
    f = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    if f.demo == bool(f.source):
        raise UserError("give either --demo or at least one --source")
    output_dir = f.output_dir or DEMO_DIR
    try:
        if f.demo:  # the embedded-corpus subset the README demo trains on; reused when present
            print(ensure_dataset(output_dir, num_workers=f.num_workers, progress=True, verbose=True))
            return
        if not f.output_dir:
            raise UserError("--output_dir is required with --source")
        build_dataset(
            f.source,
            f.output_dir,
            num_workers=f.num_workers,
            num_velocity_bins=f.num_velocity_bins,
            min_pitch=f.min_pitch,
            max_pitch=f.max_pitch,
            max_shift_steps=f.max_shift_steps,
            steps_per_second=f.steps_per_second,
            time_stretch=f.time_stretch,
            stretch_factors=tuple(float(x) for x in f.stretch_factors),
            file_format=f.file_format,
            max_pieces=f.max_pieces,
            split_percents=tuple(float(x) for x in f.splits),
            overwrite=f.overwrite,
            parser=f.parser,
        )
    except KeyboardInterrupt as e:
        # Whatever is left to do is the interpreter's clean-up: a second Ctrl-C ends it at once.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if getattr(e, "written", None):  # after the swap: the new dataset is complete
            raise SystemExit(f"interrupted after the new dataset was complete: {e.written} holds it") from None
        raise SystemExit(
            f"interrupted: nothing was written to {dataset_path(output_dir)} (a dataset there is unchanged)"
        ) from None
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise SystemExit(f"disk full writing {output_dir}: nothing was written to {dataset_path(output_dir)} "
                         "(a dataset there is unchanged); free some space and re-run") from None
    print(dataset_path(f.output_dir))


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_multi_string("source", None, "midi_dir:PATH | maestro:PATH | asap:PATH | music21:NAMES (repeatable)")
    flags.DEFINE_bool("demo", False, f"build the embedded demo subset {DEMO_SOURCES} (kept when already built)")
    flags.DEFINE_string("output_dir", None, f"folder to hold the dataset (default with --demo: {DEMO_DIR})")
    flags.DEFINE_integer("num_workers", 0, "worker processes (0: one per core)")
    v = VOCAB_DEFAULTS
    flags.DEFINE_integer("num_velocity_bins", v["num_velocity_bins"], "VELOCITY bins of the vocabulary")
    flags.DEFINE_integer("min_pitch", v["min_pitch"], "lowest MIDI pitch kept")
    flags.DEFINE_integer("max_pitch", v["max_pitch"], "highest MIDI pitch kept")
    flags.DEFINE_integer("max_shift_steps", v["max_shift_steps"], "longest TIME_SHIFT, in steps")
    flags.DEFINE_integer("steps_per_second", v["steps_per_second"], "time steps per second (100: 10 ms)")
    flags.DEFINE_bool("time_stretch", False, "add time-stretched copies of training pieces")
    flags.DEFINE_list("stretch_factors", [str(x) for x in STRETCH_FACTORS], "tempo factors for --time_stretch")
    flags.DEFINE_enum("file_format", "array_record", ["array_record", "tfrecord"], "record file format")
    flags.DEFINE_integer("max_pieces", None, "at most this many pieces per source (a stable sample)")
    flags.DEFINE_list("splits", ["90", "5", "5"], "train,validation,test percents for sources without splits")
    flags.DEFINE_bool("overwrite", False, "replace a dataset already in --output_dir")
    flags.DEFINE_enum("parser", "fast", ["fast", "note_seq"], "MIDI reader (both give note-seq's notes)")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
