"""A corpus of generated pieces: the plan, the manifests, resume, and the copy guard.

Piece i of a corpus gets style `styles[i % len(styles)]` and seed `seed + i`, so a
piece depends only on its index and the settings, never on batch size, device count or
how often the command was interrupted. Each piece is written as `NNNNN_STYLE.mid`
(+ `.png`, + `.wav` with audio) and then one line is appended to `manifest.jsonl`;
re-running the same command skips pieces already listed there, so a killed job
resumes where it stopped.

The copy guard (`max_copy_seconds=X`, default 8, 0 = off) searches each finished piece against
the training set (mgpt.music.originality, transposition-aware; the index is cached beside the
dataset) and re-draws a piece that copies X seconds or more with a new seed, up to
`copy_tries` draws in all. Each manifest line records the piece's longest copied span
(seconds, notes, training piece) and whether it is still over the limit.

The continuous sampler (mgpt.sample.continuous, under either context: a rolling cache, or the
windowed sampler's re-prefilled windows) keeps `batch_size` slots per device busy and pieces are
written as they finish, so the manifest lists them in the order they finished; a kill loses only
the pieces in flight, and a resume writes the others byte for byte as an unbroken run would have.
Infilling, hard limits and controls (and `continuous=False`) run batches of `batch_size` rows on
every local device at once instead (one sampler call per device, from host threads: pieces are
independent, so no device waits for another). On a multi-host pod each host takes the piece indices i with
i % num_hosts == host and writes its own `manifest-HHHHH-of-NNNNN.jsonl`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from data_prep.vocab import Vocabulary
from mgpt import render
from mgpt.errors import UserError
from mgpt.sample.run import (Infill, Run, Sampling, _check_primer_seconds, check_infill_model, decode, load_primer,
                             style_token)

DEFAULT_BATCH_SIZE = 16  # rows per device per sampler call
DEFAULT_MAX_COPY_SECONDS = 8.0  # the copy guard: longest span a piece may share with a training piece
DEFAULT_COPY_TRIES = 4  # draws per piece (the first and up to three re-draws) before it is marked


# ----------------------------------------------------------------------------- the copy guard


def check_copy_guard(max_copy_seconds: float, copy_tries: int) -> None:
    if not (np.isfinite(max_copy_seconds) and max_copy_seconds >= 0):
        raise UserError(f"--max_copy_seconds must be >= 0 (0 = off), got {max_copy_seconds}")
    if int(copy_tries) != copy_tries or copy_tries < 1:
        raise UserError(f"--copy_tries must be an integer >= 1 (draws per piece), got {copy_tries}")


def redraw_seed(seed: int, attempt: int) -> int:
    """The seed of a piece's re-draw number `attempt` (0 = the piece's own seed): a function of
    both only, so a guarded corpus still depends on nothing but its flags."""
    if attempt == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(attempt)]).generate_state(1, np.uint32)[0])


@dataclasses.dataclass
class CopyGuard:
    """Re-draws pieces that copy `max_seconds` or more of a training piece (see the module docstring)."""

    index: object  # mgpt.music.originality.CopyIndex over the train split
    piece_ids: list
    vocab: Vocabulary
    max_seconds: float
    tries: int = DEFAULT_COPY_TRIES

    @classmethod
    def for_run(cls, run: Run, max_seconds: float, tries: int = DEFAULT_COPY_TRIES) -> "CopyGuard | None":
        """The guard over the run's training set, or None (with a warning) when that is not here."""
        from mgpt.music import originality

        if not run.dataset_dir:
            print("warning: the copy guard is off: the run's training dataset (config.data.dataset_dir) is not on "
                  "this machine; pass --max_copy_seconds=0 to silence this", file=sys.stderr, flush=True)
            return None
        index, piece_ids = originality.training_index(run.dataset_dir, run.vocab)
        return cls(index, piece_ids, run.vocab, float(max_seconds), int(tries))

    def longest_copy(self, ids: np.ndarray) -> dict:
        """The longest-in-seconds span of the piece `ids` found in a training piece: seconds (first to
        last onset), notes, and the training piece's id. Notes are read as mgpt.evaluate reads a
        generated file (the playable decode, quantised by the vocabulary), so both agree."""
        notes = self.vocab.decode_notes(self.vocab.encode(decode(self.vocab, ids)))
        copy, _ = self.index.longest_copy(notes)
        return {"seconds": round(copy.seconds, 3), "notes": copy.seconds_notes,
                "train_piece_id": self.piece_ids[copy.train_piece] if copy.train_piece >= 0 else None}

    def enforce(self, rows: Sequence[np.ndarray], seeds: Sequence[int], names: Sequence[str], draw,
                redraw: bool = True, log=None) -> tuple[list[np.ndarray], list[dict]]:
        """rows[i] (drawn with seeds[i]) -> (kept rows, their manifest fields).

        A piece copying max_seconds or more is re-drawn by `draw(indices, seeds) -> rows` with
        `redraw_seed`, up to `tries` draws in all; each try is logged. A piece over the limit
        after the last try keeps its draw with the shortest copy. Manifest fields: drawn_seed,
        copy (seconds, notes, train_piece_id of the kept draw), copy_over_limit, copy_tries
        (seed and copy of every draw, in order).
        """
        log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        tries = [[{"seed": int(s), **self.longest_copy(r)}] for s, r in zip(seeds, rows)]
        drawn = [[r] for r in rows]
        for attempt in range(1, self.tries if redraw else 1):
            over = [i for i, t in enumerate(tries) if t[-1]["seconds"] >= self.max_seconds]
            if not over:
                break
            new_seeds = [redraw_seed(seeds[i], attempt) for i in over]
            for i, seed in zip(over, new_seeds):
                c = tries[i][-1]
                log(f"copy guard: {names[i]} (seed {c['seed']}) copies {c['seconds']:.2f} s ({c['notes']} notes) of "
                    f"training piece {c['train_piece_id']}; re-drawing with seed {seed} (try {attempt + 1} of "
                    f"{self.tries})")
            for i, seed, row in zip(over, new_seeds, draw(over, new_seeds)):
                tries[i].append({"seed": seed, **self.longest_copy(row)})
                drawn[i].append(row)
        kept, fields = [], []
        for i, t in enumerate(tries):
            row, f = self.verdict(t, drawn[i], names[i], log)
            kept.append(row)
            fields.append(f)
        return kept, fields

    def verdict(self, tries: list[dict], drawn: list[np.ndarray], name: str, log) -> tuple[np.ndarray, dict]:
        """The draw a piece keeps, of its `tries` (seed and copy of each) and rows `drawn`, and
        its manifest fields (see `enforce`)."""
        best = min(range(len(tries)), key=lambda k: tries[k]["seconds"])  # the first draw on a tie
        over = tries[best]["seconds"] >= self.max_seconds
        if over:
            log(f"copy guard: {name} still copies {tries[best]['seconds']:.2f} s of training piece "
                f"{tries[best]['train_piece_id']} after {len(tries)} draw(s); marked copy_over_limit in the manifest")
        return drawn[best], {"drawn_seed": tries[best]["seed"],
                             "copy": {k: v for k, v in tries[best].items() if k != "seed"},
                             "copy_over_limit": over, "copy_tries": tries}

    def redraw_one(self, tries: list[dict], seed: int, name: str, log) -> int | None:
        """One piece at a time (a streamed corpus): the seed of its next draw, given its `tries`
        so far and its own `seed`, or None when its draws are done. The same draws, in the same
        order, as `enforce`."""
        if len(tries) >= self.tries or tries[-1]["seconds"] < self.max_seconds:
            return None
        new_seed = redraw_seed(seed, len(tries))
        c = tries[-1]
        log(f"copy guard: {name} (seed {c['seed']}) copies {c['seconds']:.2f} s ({c['notes']} notes) of "
            f"training piece {c['train_piece_id']}; re-drawing with seed {new_seed} (try {len(tries) + 1} of "
            f"{self.tries})")
        return new_seed


# ----------------------------------------------------------------------------- corpus generation


@dataclasses.dataclass(frozen=True)
class Piece:
    index: int
    style: str
    seed: int

    @property
    def stem(self) -> str:
        return f"{self.index:05d}_{self.style}"


def plan(num_samples: int, styles: Sequence[str], seed: int) -> list[Piece]:
    """Piece i: style styles[i % len(styles)], seed seed + i."""
    return [Piece(i, styles[i % len(styles)], seed + i) for i in range(num_samples)]


def manifest_name(process_index: int, process_count: int) -> str:
    if process_count == 1:
        return "manifest.jsonl"
    return f"manifest-{process_index:05d}-of-{process_count:05d}.jsonl"




def _open_manifest(path: pathlib.Path):
    """Append handle; a last line cut short by a kill is removed first so new lines stay whole."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


# Fields that make a piece what it is: a re-run must agree on them to reuse it.
_IDENTITY = ("style", "seed", "settings", "primer", "primer_seconds", "checkpoint_step", "copy_guard",
             "max_note_seconds", "infill")
# Settings added since manifests were first written, with the value that means "as before".
_SETTINGS_SINCE = {"guidance": 1.0, "pitch_range": None, "max_polyphony": None, "velocity_range": None,
                   "controls": None, "mood": None, "context": "reprefill", "density_guard": False,
                   "register_guard": False, "mode_guard": False,
                   "polyphony_guard": False, "scale_guard": False, "loudness_guard": False,
                   "control_tries": 1, "steered_guidance": None, "prefer_style": False,
                   "contrast_style": ""}
_COPY_GUARD_OFF = {"max_copy_seconds": 0.0, "tries": 1}


def _check_same(entry: dict, expected: dict, manifest: pathlib.Path) -> None:
    entry = {"copy_guard": _COPY_GUARD_OFF, **entry}  # older lines: made without the guard
    entry["settings"] = {**_SETTINGS_SINCE, **(entry.get("settings") or {})}
    for key in _IDENTITY:
        if entry.get(key) != expected.get(key):
            raise UserError(
                f"{manifest}: piece {entry['index']} was made with {key}={entry.get(key)!r}, this command asks for "
                f"{expected.get(key)!r}; re-run with the same flags to resume, or use a new --output_dir"
            )


def generate_corpus(
    run: Run,
    output_dir: str | os.PathLike,
    *,
    num_samples: int,
    styles: Sequence[str],
    seed: int = 0,
    sampling: Sampling = Sampling(),
    primer: str | None = None,
    primer_seconds: float = 0.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    audio: bool = False,
    soundfont: str | None = None,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    devices: Sequence | None = None,
    max_copy_seconds: float = DEFAULT_MAX_COPY_SECONDS,
    copy_tries: int = DEFAULT_COPY_TRIES,
    infill: Infill | None = None,
    continuous: bool = True,
) -> list[dict]:
    """Generate this host's share of `num_samples` pieces into output_dir, resuming; returns its manifest lines.

    `continuous`: the pieces go through the continuous sampler (mgpt.sample.continuous, under either
    `sampling.context`), each slot taking the next piece as soon as its own ends, and are written as
    they finish; False: in groups of batch_size through the windowed sampler, in plan order (context
    'reprefill' only: a rolling cache always streams). The pieces are the same either way under
    context 'reprefill'; the manifest's order and the speed differ. Infilling, hard limits and
    controls always take the windowed sampler.

    Pieces already in this host's manifest are skipped (and must have been made
    with the same settings). With `audio`, pieces from an earlier run that lack a
    WAV get one. `max_copy_seconds` > 0 turns on the copy guard (`CopyGuard`; off,
    with a warning, when the run's dataset is not on this machine).
    """
    import jax
    from tqdm.auto import tqdm

    if num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {num_samples}")
    _check_primer_seconds(primer_seconds)
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    if seed < 0 or seed + num_samples > 2**32:
        raise UserError(f"--seed: seeds {seed}..{seed + num_samples - 1} must lie in 0..2**32-1")
    check_copy_guard(max_copy_seconds, copy_tries)
    if audio:
        render.find_audio_tools(soundfont)  # fail before any work
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    devices = list(devices) if devices is not None else jax.local_devices()
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    if infill is not None and primer:
        raise UserError("--infill and --primer cannot be combined: the file around the gap is the primer")
    if infill is not None:
        check_infill_model(run.vocab, run.workdir)
        # The kept music is the user's own; searching it would re-draw pieces for what they wrote.
        max_copy_seconds = 0.0
    primer_ids = load_primer(primer, run.vocab, primer_seconds) if primer else None
    manifest = out / manifest_name(process_index, process_count)
    done = {e["index"]: e for e in render.read_manifest(manifest)}
    if sampling.guidance is None and done:  # resumed with the default: keep the G the corpus began with
        first = next(iter(done.values()))
        sampling = dataclasses.replace(sampling, guidance={**_SETTINGS_SINCE, **(first.get("settings") or {})}["guidance"])
    # The manifest records the guidance used, not "default".
    sampling = run.sampling(sampling, [np.asarray([style_token(run.vocab, s)]) for s in styles])
    guard = CopyGuard.for_run(run, max_copy_seconds, copy_tries) if max_copy_seconds else None
    redraw = True
    if guard and primer_ids is not None:
        c = guard.longest_copy(primer_ids)
        if c["seconds"] >= guard.max_seconds:  # no seed can change the primer: re-drawing is futile
            redraw = False
            print(f"warning: the primer itself copies {c['seconds']:.2f} s of training piece {c['train_piece_id']}; "
                  "pieces are not re-drawn and are marked copy_over_limit", file=sys.stderr, flush=True)
    common = {
        # An infilled middle's length is the gap's: the continuation budget does not apply.
        "settings": sampling.to_dict() if infill is None else {**sampling.to_dict(), "max_events": sampling.max_events,
                                                              "max_seconds": None},
        "primer": os.fspath(primer) if primer else None,
        "primer_seconds": primer_seconds if primer else None,
        "checkpoint_step": run.step,
        "copy_guard": {"max_copy_seconds": guard.max_seconds, "tries": guard.tries} if guard else _COPY_GUARD_OFF,
        "infill": infill.to_dict() if infill is not None else None,
    }
    mine = [p for p in plan(num_samples, styles, seed) if p.index % process_count == process_index]
    # The note-length guard's limit per style, as resolved here: with the default it comes from
    # the dataset, which another machine may not have (then 8 s), so the settings alone can't
    # tell two corpora apart. It is checked on resume and recorded on every manifest line.
    note_limit = {s: round(run.max_note_seconds(np.asarray([style_token(run.vocab, s)]), sampling), 3)
                  for s in set(styles)}
    for p in mine:
        if p.index in done:
            _check_same(done[p.index], {"style": p.style, "seed": p.seed, "max_note_seconds": note_limit[p.style],
                                        **common}, manifest)
    if audio:
        for e in done.values():
            wav = out / pathlib.Path(e["file"]).with_suffix(".wav")
            if not wav.is_file():
                try:
                    render.render_audio(out / e["file"], wav, soundfont=soundfont)
                except RuntimeError as err:
                    print(f"warning: no audio for {e['file']}: {err}", file=sys.stderr, flush=True)
    todo = [p for p in mine if p.index not in done]

    written = [e for e in done.values() if e["index"] % process_count == process_index]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="piece", disable=not progress,
               desc=f"generating into {out}", dynamic_ncols=True)
    events = 0
    start = time.perf_counter()

    with _open_manifest(manifest) as log:
        if (continuous or sampling.context == "rolling") and infill is None and not sampling.windowed_only():
            finished = _streamed(run, todo, primer_ids, sampling, batch_size, devices, guard, redraw)
        else:
            finished = _grouped(run, todo, primer_ids, sampling, batch_size, devices, guard, redraw, infill)
        for p, ids, copy in finished:
            entry = _write_piece(run.vocab, out, p, ids, primer_ids, audio=audio, soundfont=soundfont, infill=infill,
                                 extra={**common, "workdir": run.workdir, "host": process_index,
                                        "max_note_seconds": note_limit[p.style], **(copy or {})})
            log.write(json.dumps(entry) + "\n")
            log.flush()  # a piece counts as done only once its line is on disk
            os.fsync(log.fileno())
            written.append(entry)
            events += entry["new_events"]
            bar.update(1)
            bar.set_postfix(events_per_s=f"{events / (time.perf_counter() - start):.0f}", refresh=False)
    bar.close()
    return sorted(written, key=lambda e: e["index"])


def _grouped(run, todo, primer_ids, sampling, batch_size, devices, guard, redraw, infill):
    """(piece, ids, copy fields) in plan order, batch_size rows per device at a time: the
    re-prefill sampler and infilling. Group g + 1 samples on its own thread while group g's
    files are written."""
    group = batch_size * len(devices)
    groups = [todo[i : i + group] for i in range(0, len(todo), group)]

    def sample(pieces):
        if infill is not None:
            return run.infill_rows(infill, [p.style for p in pieces], [p.seed for p in pieces], sampling,
                                   batch_size=batch_size, devices=devices)
        prompts = run.prompts([p.style for p in pieces], primer_ids)

        def draw(indices, seeds):
            return run.sample_ids([prompts[i] for i in indices], seeds, sampling, batch_size=batch_size,
                                  devices=devices)

        rows = draw(range(len(pieces)), [p.seed for p in pieces])
        if guard is None:
            return rows, [None] * len(pieces)
        # On this worker thread, so the search overlaps the previous group's file writing.
        return guard.enforce(rows, [p.seed for p in pieces], [p.stem for p in pieces], draw, redraw=redraw)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(sample, groups[0]) if groups else None
        for g, pieces in enumerate(groups):
            rows, copy_fields = pending.result()
            pending = pool.submit(sample, groups[g + 1]) if g + 1 < len(groups) else None
            yield from zip(pieces, rows, copy_fields)


def _streamed(run, todo, primer_ids, sampling, batch_size, devices, guard, redraw):
    """(piece, ids, copy fields) as pieces finish, from the continuous sampler (`Run.stream`): one
    per device, on its own thread, taking every len(devices)-th piece of the plan. A piece the copy
    guard re-draws goes back into its device's queue with its next seed (`CopyGuard.redraw_one`)."""
    import queue
    import threading

    results: queue.Queue = queue.Queue()
    stop = threading.Event()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    def work(device, share):
        try:
            stream = run.stream(sampling, batch_size=batch_size, device=device)
            prompts = dict(zip((p.index for p in share), run.prompts([p.style for p in share], primer_ids)))
            pieces = {p.index: p for p in share}
            tries: dict[int, list] = {p.index: [] for p in share}
            drawn: dict[int, list] = {p.index: [] for p in share}
            seeds: dict[int, int] = {p.index: p.seed for p in share}
            for p in share:
                stream.add(p.index, prompts[p.index], p.seed)
            for index, row in stream:
                if stop.is_set():
                    return
                p = pieces[index]
                if guard is None:
                    results.put((p, row, None))
                    continue
                tries[index].append({"seed": seeds[index], **guard.longest_copy(row)})
                drawn[index].append(row)
                seed = guard.redraw_one(tries[index], p.seed, p.stem, log) if redraw else None
                if seed is not None:
                    seeds[index] = seed
                    stream.add(index, prompts[index], seed)
                    continue
                kept, fields = guard.verdict(tries.pop(index), drawn.pop(index), p.stem, log)
                results.put((p, kept, fields))
        except BaseException as e:  # handed to the writing thread, which raises it
            results.put(e)
        finally:
            results.put(None)

    shares = [todo[d :: len(devices)] for d in range(len(devices))]
    threads = [threading.Thread(target=work, args=(d, share), daemon=True) for d, share in zip(devices, shares)]
    for t in threads:
        t.start()
    running = len(threads)
    try:
        while running:
            item = results.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()


def check_output_dir(output_dir) -> None:
    """A one-line error before the weights are loaded when output_dir cannot be made or written."""
    try:
        pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        reason = e.strerror or e
        raise UserError(f"--output_dir={output_dir}: cannot write there ({reason}); pick another dir") from None




def _write_piece(vocab, out: pathlib.Path, piece: Piece, ids: np.ndarray, primer_ids, *, audio, soundfont, extra,
                 infill: Infill | None = None):
    ns = decode(vocab, ids)
    primer_len = 0 if primer_ids is None else len(primer_ids)
    controls = int(np.sum(vocab.is_control(ids)))
    primer_end_s = vocab.seconds(primer_ids) if primer_len else 0.0
    mid = render.write_midi(ns, out / f"{piece.stem}.mid")
    gap = (infill.start, infill.end) if infill is not None else None
    filled = f"  ·  filled {gap[0]:g}-{gap[1]:g} s" if gap else ""
    png = render.piano_roll(
        ns, out / f"{piece.stem}.png", primer_seconds=primer_end_s, gap=gap,
        title=f"{mid.name}  ·  {piece.style}  ·  seed {piece.seed}  ·  {ns.total_time:.1f} s  ·  {len(ns.notes)} notes"
              f"{filled}",
    )
    wav = None
    if audio:
        try:
            wav = render.render_audio(mid, out / f"{piece.stem}.wav", soundfont=soundfont)
        except RuntimeError as e:  # one piece FluidSynth chokes on should not stop a corpus
            print(f"warning: no audio for {mid.name}: {e}", file=sys.stderr, flush=True)
    return {
        "index": piece.index,
        "file": mid.name,
        "image": png.name,
        "audio": wav.name if wav else None,
        "style": piece.style,
        "seed": piece.seed,
        # Without the STYLE token and control tokens (written by the sampler, not events); primer included.
        "events": int(len(ids) - 1 - controls),
        "new_events": int(len(ids) - 1 - primer_len - controls),
        "primer_events": primer_len,
        "seconds": round(float(ns.total_time), 3),
        "notes": len(ns.notes),
        **extra,
    }

