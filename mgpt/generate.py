"""Generate music from a trained run: MIDI, piano rolls, audio and an HTML gallery.

    python -m mgpt.generate --workdir=runs/demo --output_dir=out/demo --style=all --num_samples=8 --audio

Piece i of a command gets style `styles[i % len(styles)]` and seed `--seed + i`, so a
piece depends only on its index and the flags, never on batch size, device count or
how often the command was interrupted. Each piece is written as `NNNNN_STYLE.mid`
(+ `.png`, + `.wav` with --audio) and then one line is appended to `manifest.jsonl`;
re-running the same command skips pieces already listed there, so a killed job
resumes where it stopped. `index.html` is rewritten at the end.

`--guidance=G` strengthens the requested style by classifier-free guidance (mgpt.sample;
the model must have been trained with data.style_dropout > 0, and such a model samples with
G = 1.5 unless told otherwise; G = 1 is plain sampling). The copy guard
(`--max_copy_seconds=X`, default 8, 0 = off) searches each finished piece against the
training set (mgpt.originality, transposition-aware; the index is cached beside the
dataset) and re-draws a piece that copies X seconds or more with a new seed, up to
`--copy_tries` draws in all. Each manifest line records the piece's longest copied span
(seconds, notes, training piece) and whether it is still over the limit.

`--infill=FILE.mid --infill_start=S --infill_end=E` (seconds) keeps the file outside [S, E)
and fills the gap: the model (trained with data.fim_rate > 0) reads the music before S, the
music from E on and the gap's length, and writes a middle that lasts exactly E - S and
leaves sounding at E just the notes the file has sounding there (mgpt/fim.py). Each sample
is the whole joined piece; the piano roll marks the gap.

Batches of `--batch_size` rows run on every local device at once (one sampler call
per device, from host threads: pieces are independent, so no device waits for
another). On a multi-host pod each host takes the piece indices i with
i % num_hosts == host and writes its own `manifest-HHHHH-of-NNNNN.jsonl`; host 0
writes the gallery over all shards it can see.

Notebook use:

    from mgpt import generate
    run = generate.load_run("runs/demo")
    pieces = run.generate(style="bach", n=4, max_seconds=20, top_p=0.95)   # NoteSequences
    pieces = run.generate(style="bach", n=4, max_seconds=20, guidance=2.0)  # style guidance
    run.write_midi(pieces, "out/notebook")                                  # -> .mid paths
    filled = run.infill("mine.mid", start=8.0, end=12.0, n=4, style="bach")  # NoteSequences, gap refilled
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
import warnings
from collections.abc import Sequence

import numpy as np

from data_prep import notes as notes_lib
from data_prep.vocab import UNKNOWN_STYLE, Vocabulary, normalize_label
from mgpt import render
from mgpt.errors import UserError, is_disk_full, quiet_after_disk_full, reported

UNCONDITIONAL = "unconditional"
ALL_STYLES = "all"
DEFAULT_MAX_EVENTS = 1024  # when neither --max_events nor --max_seconds is given
# The note-length guard's default: this percentile of the requested style's note lengths in
# the training data (build.json's note_seconds). 99.5 cuts only notes longer than nearly
# all real ones; FALLBACK_MAX_NOTE_SECONDS serves a run whose dataset has no such table.
NOTE_GUARD_PERCENTILE = "p99.5"
FALLBACK_MAX_NOTE_SECONDS = 8.0
DEFAULT_BATCH_SIZE = 16  # rows per device per sampler call
# Style guidance for a model trained with style dropout (it runs every row twice). On four demo
# models (README, Results) G = 1.5 took style accuracy from 79-88.5 % to 83-95.8 %, keeping the
# feature overlap at 0.85-0.91x its ceiling; G = 2 did better on two of them (99 % on the final
# one) and worse on two, and G = 3 lost overlap (0.80x).
DEFAULT_GUIDANCE = 1.5
DEFAULT_MAX_COPY_SECONDS = 8.0  # the copy guard: longest span a piece may share with a training piece
DEFAULT_COPY_TRIES = 4  # draws per piece (the first and up to three re-draws) before it is marked


# ----------------------------------------------------------------------------- inputs


def resolve_styles(vocab: Vocabulary, spec: str) -> list[str]:
    """'--style' -> the style cycle: a name, a comma list, 'all' (every known style) or 'unconditional'.

    Names are normalised like dataset labels ('J.S. Bach' -> 'j_s_bach'). Returns
    style names, with 'unconditional' meaning the STYLE:unknown token.
    """
    known = [s for s in vocab.styles if s != UNKNOWN_STYLE]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UserError(f"--style is empty; known styles: {_style_help(known)}")
    out: list[str] = []
    for name in names:
        if name.lower() == ALL_STYLES:
            out.extend(known or [UNCONDITIONAL])
        elif name.lower() in (UNCONDITIONAL, UNKNOWN_STYLE, "none"):
            out.append(UNCONDITIONAL)
        elif normalize_label(name) in known:
            out.append(normalize_label(name))
        else:
            raise UserError(f"--style={name}: not a style of this model; known styles: {_style_help(known)}")
    return out


def _style_help(known: Sequence[str]) -> str:
    listed = ", ".join(known) if known else "(none: the model was trained without labels)"
    return f"{listed} (or {UNCONDITIONAL}, or {ALL_STYLES})"


def style_token(vocab: Vocabulary, style: str) -> int:
    return vocab.unknown_style_id if style == UNCONDITIONAL else vocab.style_id(style)


# A primer file above this size (about 40,000 notes) is read for long enough to say so first.
LONG_PRIMER_BYTES = 256 * 2**10
_long_primers_said: set[str] = set()


def load_primer(path: str | os.PathLike, vocab: Vocabulary, seconds: float = 0.0) -> np.ndarray:
    """The first `seconds` of a MIDI file (0 = all of it) as event ids, sustain pedal applied;
    a negative `seconds` is a UserError, as `--primer_seconds<0` is.

    Notes still sounding at the cut are shortened to end there, so the primer is
    complete music on its own and the model continues from its last event.
    Raises UserError naming the file when it is missing, unreadable or has no notes.
    """
    _check_primer_seconds(seconds)
    path = os.fspath(path)
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    if size > LONG_PRIMER_BYTES and path not in _long_primers_said:  # even under --noprogress: it can take minutes
        _long_primers_said.add(path)  # the command reads it twice (checked before the weights load): said once
        print(f"note: reading a long primer, {path} ({size / 2**20:.1f} MiB); "
              f"{'its first ' + format(seconds, 'g') + ' s are kept' if seconds else 'all of it is kept (--primer_seconds=0)'}",
              file=sys.stderr, flush=True)
    notes = notes_lib.crop(_read_midi_notes("primer", path), seconds or None)
    ids = vocab.encode_notes(*notes)
    if not vocab.is_event(ids).any():
        span = f"in its first {seconds:g} s" if seconds else "at all"
        raise UserError(
            f"--primer={path}: no notes {span} in the model's pitch range {vocab.min_pitch}..{vocab.max_pitch}"
        )
    return ids


def _read_midi_notes(flag: str, path: str | os.PathLike):
    """The notes of a MIDI file (sustain applied, drums left out), or a UserError naming `flag`."""
    import note_seq

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"--{flag}={path}: no such file")
    try:
        ns = note_seq.midi_file_to_note_sequence(path)
    except Exception as e:  # pretty_midi/mido raise many types on corrupt files; all mean the same to a user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--{flag}={path}: not a readable MIDI file ({reason[:200]})") from None
    notes = notes_lib.from_sequence(ns)
    return notes.select(notes.end_s > notes.start_s)


@dataclasses.dataclass(frozen=True, eq=False)
class Infill:
    """A gap [start, end) seconds to fill in a MIDI file: its events and their cut (`mgpt.fim.Gap`)."""

    path: str
    start: float
    end: float
    ids: np.ndarray = dataclasses.field(repr=False)
    gap: object = dataclasses.field(repr=False)

    def to_dict(self) -> dict:
        return {"file": self.path, "start": self.start, "end": self.end}


def check_infill_times(start, end) -> None:
    """The checks that need no file: one line naming the setting."""
    if start is None or end is None:
        raise UserError("--infill needs --infill_start and --infill_end (seconds of the file, start < end)")
    if not (np.isfinite(start) and start >= 0):
        raise UserError(f"--infill_start={start}: must be a time in seconds >= 0")
    if not (np.isfinite(end) and end > start):
        raise UserError(f"--infill_end={end}: must be later than --infill_start={start}")


def load_infill(path: str | os.PathLike, vocab: Vocabulary, start: float, end: float) -> Infill:
    """A MIDI file cut for infilling at [start, end) seconds (both on the 10 ms grid of the events).

    Raises UserError naming the setting: a missing or unreadable file, no notes, a gap that is
    not inside the file's music (0 <= start < end <= its last note's end), or one too short to hold
    a time step.
    """
    from mgpt import fim

    check_infill_times(start, end)
    path = os.fspath(path)
    ids = vocab.encode_notes(*_read_midi_notes("infill", path))
    if not vocab.is_event(ids).any():
        raise UserError(f"--infill={path}: no notes in the model's pitch range {vocab.min_pitch}..{vocab.max_pitch}")
    length = vocab.seconds(ids)
    if end > length + 0.5 / vocab.steps_per_second:
        raise UserError(f"--infill_end={end:g}: past the end of {path}, whose music ends at {length:.2f} s")
    sps = vocab.steps_per_second
    start_step, end_step = int(round(start * sps)), int(round(end * sps))
    if end_step <= start_step:
        raise UserError(f"--infill_end={end:g}: the gap from --infill_start={start:g} is shorter than one "
                        f"{1000 // sps} ms step")
    return Infill(path, float(start), float(end), ids, fim.Gap.cut(vocab, ids, start_step, end_step))


def check_infill_model(vocab: Vocabulary, workdir: str, flag: str = "--infill") -> None:
    if not vocab.fim:
        raise UserError(f"{flag}: the model in {workdir} has no FIM tokens (it was trained with data.fim_rate = 0 "
                        "or before infilling existed); train one with data.fim_rate > 0, as configs/small.py does")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling controls and the length budget (new events and/or seconds of new music).

    The defaults (temperature 0.9, top-p 0.95) were chosen with `mgpt.evaluate` on the
    demo model: against plain sampling they raised the share of pieces classified as
    their requested style from 73 % to 85-91 % and the musical-feature overlap with real
    pieces from 0.71x to 0.85-0.92x the real-vs-real ceiling (README, Evaluating).
    """

    temperature: float = 0.9
    top_k: int = 0
    top_p: float = 0.95
    min_p: float = 0.0
    greedy: bool = False
    max_events: int | None = None
    max_seconds: float | None = None
    max_note_seconds: float | None = None  # the note-length guard: None = from the data, 0 = off
    guidance: float | None = None  # style guidance G (1 = off; None = the run's default, `Run.sampling`)

    def __post_init__(self):
        from mgpt.sample import sampling_settings

        try:
            sampling_settings(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              greedy=self.greedy)
        except ValueError as e:
            raise UserError(f"--{e}") from None
        # A zero budget writes pieces with no new music: refused rather than done silently.
        if self.max_events is not None and self.max_events < 1:
            raise UserError(f"--max_events must be >= 1, got {self.max_events}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise UserError(f"--max_seconds must be > 0, got {self.max_seconds}")
        if self.max_note_seconds is not None and not self.max_note_seconds >= 0:
            raise UserError(f"--max_note_seconds must be >= 0 (0 = off), got {self.max_note_seconds}")
        if self.guidance is not None:
            try:
                guidance_ok = np.isfinite(float(self.guidance)) and float(self.guidance) >= 0
            except (TypeError, ValueError):
                guidance_ok = False
            if not guidance_ok:
                raise UserError(f"--guidance must be a number >= 0 (1 = off), got {self.guidance!r}")
            object.__setattr__(self, "guidance", float(self.guidance))  # a plain float for the manifest's JSON

    def budget(self) -> dict:
        if self.max_events is None and self.max_seconds is None:
            return {"max_events": DEFAULT_MAX_EVENTS, "max_seconds": None}
        return {"max_events": self.max_events, "max_seconds": self.max_seconds}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), **self.budget()}


# ----------------------------------------------------------------------------- a loaded run


@dataclasses.dataclass
class Run:
    """A trained model ready to sample: `load_run(workdir)`; then `generate` / `write_midi`."""

    model: object
    vocab: Vocabulary
    config: object = None
    step: int = 0
    workdir: str = ""
    note_seconds: dict = dataclasses.field(default_factory=dict)  # build.json's per-style note lengths
    dataset_dir: str | None = None  # the training dataset when it is on this machine (the copy guard's)
    _replicas: dict = dataclasses.field(default_factory=dict, repr=False)
    _guard_fallbacks: set = dataclasses.field(default_factory=set, repr=False, init=False)  # styles warned about

    @property
    def default_guidance(self) -> float:
        """DEFAULT_GUIDANCE for a model trained with style dropout (it knows STYLE:unknown, the
        unconditional twin guidance needs), else 1: plain sampling."""
        dropout = getattr(self.config.data, "style_dropout", 0.0) if self.config is not None else 0.0
        return DEFAULT_GUIDANCE if dropout and dropout > 0 else 1.0

    def sampling(self, sampling: Sampling, prompts: Sequence[np.ndarray] = ()) -> Sampling:
        """`sampling` with its defaults that depend on this run filled in: guidance, which is 1
        when every prompt is unconditional (its twin would be itself: twice the work, same piece)."""
        if sampling.guidance is not None:
            return sampling
        unconditional = len(prompts) and all(int(p[0]) == self.vocab.unknown_style_id for p in prompts)
        return dataclasses.replace(sampling, guidance=1.0 if unconditional else self.default_guidance)

    def max_note_seconds(self, prompt: np.ndarray, sampling: Sampling) -> float:
        """The note-length guard for one prompt: the explicit setting, else a high percentile
        (NOTE_GUARD_PERCENTILE) of its style's training notes ('all' when unconditional)."""
        if sampling.max_note_seconds is not None:
            return float(sampling.max_note_seconds)
        style = self.vocab.token_of(int(prompt[0])).split(":", 1)[1]
        for row in (self.note_seconds.get(style if style != UNKNOWN_STYLE else "all"), self.note_seconds.get("all")):
            if isinstance(row, dict) and isinstance(row.get(NOTE_GUARD_PERCENTILE), (int, float)):
                return float(row[NOTE_GUARD_PERCENTILE])
        if style not in self._guard_fallbacks:  # said once per style, not once per piece
            self._guard_fallbacks.add(style)
            print(f"warning: the note-length guard for style {style!r} is {FALLBACK_MAX_NOTE_SECONDS:g} s: the run's "
                  "training dataset (config.data.dataset_dir) is not on this machine or its build.json has no "
                  f"{NOTE_GUARD_PERCENTILE} note length for it; pass --max_note_seconds to set it",
                  file=sys.stderr, flush=True)
        return FALLBACK_MAX_NOTE_SECONDS

    @property
    def styles(self) -> list[str]:
        """Styles this model knows (pass one as `style=`; 'unconditional' is always allowed)."""
        return [s for s in self.vocab.styles if s != UNKNOWN_STYLE]

    def prompts(self, styles: Sequence[str], primer_ids: np.ndarray | None = None) -> list[np.ndarray]:
        """One prompt per style: its STYLE token, then the primer events (if any)."""
        primer = np.zeros((0,), np.int32) if primer_ids is None else np.asarray(primer_ids, np.int32)
        return [np.concatenate([[style_token(self.vocab, s)], primer]).astype(np.int32) for s in styles]

    def replica(self, device):
        """The model with its weights on `device` (copied once, then cached)."""
        import jax
        from flax import nnx

        key = device.id
        if key not in self._replicas:
            graphdef, state = nnx.split(self.model)
            self._replicas[key] = nnx.merge(graphdef, jax.device_put(state, device))
        return self._replicas[key]

    def sample_ids(
        self,
        prompts: Sequence[np.ndarray],
        seeds: Sequence[int],
        sampling: Sampling = Sampling(),
        *,
        batch_size: int | None = None,
        devices: Sequence | None = None,
        gaps: Sequence | None = None,
    ) -> list[np.ndarray]:
        """prompts[i] continued with seed seeds[i] -> full rows (prompt + new events, no EOS).

        The rows are split evenly over `devices` (default: all local devices); each
        device runs the jitted sampler on its share, `batch_size` rows at a time.
        With `gaps` (mgpt.fim.Gap per prompt) the new events are each gap's middle, whose
        length the gap sets (`Sampling.max_events` still caps its events).
        """
        import jax

        from mgpt.sample import generate_tokens

        devices = list(devices) if devices is not None else jax.local_devices()
        devices = devices[: max(1, len(prompts))]
        shares = np.array_split(np.arange(len(prompts)), len(devices))
        sampling = self.sampling(sampling, prompts)
        kwargs = dict(
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
            greedy=sampling.greedy, guidance=sampling.guidance, batch_size=batch_size,
            **(sampling.budget() if gaps is None else {"max_events": sampling.max_events}),
        )
        limits = [self.max_note_seconds(p, sampling) for p in prompts]

        home = _device_of(self.model)

        def run_share(device, share):
            if not len(share):
                return []
            model = self.model if device == home else self.replica(device)
            return generate_tokens(model, self.vocab, [prompts[i] for i in share], seeds=[int(seeds[i]) for i in share],
                                   max_note_seconds=[limits[i] for i in share],
                                   gaps=None if gaps is None else [gaps[i] for i in share], **kwargs)

        if len(devices) == 1:
            return run_share(devices[0], shares[0])
        # One host thread per device: dispatch releases the GIL, so all devices decode at once.
        with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
            parts = list(pool.map(run_share, devices, shares))
        return [row for part in parts for row in part]

    def generate_ids(
        self,
        style: str = UNCONDITIONAL,
        n: int = 1,
        *,
        seed: int = 0,
        primer: str | os.PathLike | None = None,
        primer_seconds: float = 0.0,
        batch_size: int | None = None,
        **sampling,
    ) -> list[np.ndarray]:
        """`n` id rows (STYLE token + primer + new events). `style` may be a name, a comma list or 'all'.

        Piece i uses seed `seed + i`. Sampling keywords: temperature, top_k, top_p,
        min_p, greedy, max_events, max_seconds, max_note_seconds, guidance (see `Sampling`).
        """
        _check_primer_seconds(primer_seconds)  # refused with or without a primer, as on the command line
        cycle = resolve_styles(self.vocab, style)
        styles = [cycle[i % len(cycle)] for i in range(n)]
        primer_ids = load_primer(primer, self.vocab, primer_seconds) if primer else None
        return self.sample_ids(self.prompts(styles, primer_ids), [seed + i for i in range(n)], Sampling(**sampling),
                               batch_size=batch_size)

    def infill_rows(self, infill: Infill, styles: Sequence[str], seeds: Sequence[int], sampling: Sampling = Sampling(),
                    *, batch_size: int | None = None, devices: Sequence | None = None
                    ) -> tuple[list[np.ndarray], list[dict]]:
        """One joined piece per (style, seed): STYLE + the file's events before S + a sampled middle
        + the closing events (`mgpt.fim.close`) + the file's events from E. Also, per piece,
        new_events (the middle's) and what the closing did (released, struck, short_steps)."""
        from mgpt import fim

        check_infill_model(self.vocab, self.workdir)
        gap = infill.gap
        window = self.model.cfg.max_len
        try:  # the gap's length is written as TIME_SHIFTs into a prompt of half the context
            fim.prompt(self.vocab, self.vocab.unknown_style_id, gap.prefix, gap, gap.steps, budget=window // 2)
        except ValueError:
            raise UserError(f"--infill_end={infill.end:g}: a {infill.end - infill.start:g} s gap is too long for this "
                            f"model's {window}-token context; fill it in shorter gaps") from None
        rows = self.sample_ids(self.prompts(styles, gap.prefix), seeds, sampling, batch_size=batch_size,
                               devices=devices, gaps=[gap] * len(styles))
        joined, info = [], []
        for row in rows:
            tail, counts = fim.close(self.vocab, gap, row[1:])
            joined.append(np.concatenate([row, tail, gap.suffix]).astype(np.int32))
            info.append({"new_events": int(len(row) - 1 - len(gap.prefix)), **counts})
        return joined, info

    def infill_ids(self, midi: str | os.PathLike, start: float, end: float, n: int = 1, *, seed: int = 0,
                   style: str = UNCONDITIONAL, batch_size: int | None = None, **sampling) -> list[np.ndarray]:
        """`n` id rows of `midi` with [start, end) seconds filled by the model; piece i uses seed `seed + i`."""
        cycle = resolve_styles(self.vocab, style)
        infill = load_infill(midi, self.vocab, start, end)
        return self.infill_rows(infill, [cycle[i % len(cycle)] for i in range(n)], [seed + i for i in range(n)],
                                Sampling(**sampling), batch_size=batch_size)[0]

    def infill(self, midi: str | os.PathLike, start: float, end: float, n: int = 1, **kwargs) -> list:
        """`n` NoteSequences of `midi` with [start, end) seconds filled (same arguments as `infill_ids`)."""
        return [self.decode(ids) for ids in self.infill_ids(midi, start, end, n, **kwargs)]

    def generate(self, style: str = UNCONDITIONAL, n: int = 1, **kwargs) -> list:
        """`n` pieces as NoteSequences (same arguments as `generate_ids`)."""
        return [self.decode(ids) for ids in self.generate_ids(style, n, **kwargs)]

    def decode(self, ids: np.ndarray):
        """Id row -> NoteSequence, exactly as it is written to MIDI (see render.playable)."""
        return decode(self.vocab, ids)

    def write_midi(self, pieces, output_dir: str | os.PathLike, *, prefix: str = "piece", images: bool = False,
                   audio: bool = False, soundfont: str | None = None) -> list[pathlib.Path]:
        """NoteSequences (or id rows) -> `output_dir/{prefix}_{i:03d}.mid` (+ .png, + .wav). Returns the .mid paths."""
        if not isinstance(pieces, (list, tuple)):
            pieces = [pieces]
        if audio:
            render.find_audio_tools(soundfont)
        paths = []
        for i, piece in enumerate(pieces):
            ns = piece if hasattr(piece, "notes") else self.decode(piece)
            path = render.write_midi(ns, pathlib.Path(output_dir) / f"{prefix}_{i:03d}.mid")
            if images:
                render.piano_roll(ns, path.with_suffix(".png"), title=path.name)
            if audio:
                render.render_audio(path, path.with_suffix(".wav"), soundfont=soundfont)
            paths.append(path)
        return paths


def _device_of(model):
    import jax
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model))
    devices = leaves[0].devices() if leaves else set()
    return next(iter(devices)) if len(devices) == 1 else None


def read_run_info(workdir: str, step: int | None = None) -> tuple[Vocabulary, dict, int]:
    """(vocab, config dict, step) of a checkpoint without loading weights (fast; for checking flags)."""
    from mgpt import checkpoint as ckpt_lib

    def load(root, at_step):
        config = ckpt_lib.read_json_item(root, at_step, "config")
        vocab = Vocabulary.from_json(ckpt_lib.read_json_item(root, at_step, "vocab"), origin=f"{root}/{at_step}/vocab")
        return vocab, config

    (vocab, config), step = ckpt_lib.load_newest(workdir, step, load)
    return vocab, config, step


def load_run(workdir: str, step: int | None = None) -> Run:
    """A run's checkpoint (latest, or `step`) loaded for sampling."""
    from mgpt.checkpoint import restore_model

    _, config, _ = read_run_info(workdir, step)
    kind = config.get("model", {}).get("kind", "gpt")
    if kind != "gpt":  # the sampler's KV-cache decode is mgpt.model.GPT's
        raise UserError(f"{workdir}: model.kind={kind!r}; the sampler supports 'gpt' only")
    model, vocab, config, step = restore_model(workdir, step)
    dataset = local_dataset(config)
    return Run(model=model, vocab=vocab, config=config, step=step, workdir=str(workdir),
               note_seconds=dataset_note_seconds(config), dataset_dir=os.fspath(dataset) if dataset else None)


def local_dataset(config) -> pathlib.Path | None:
    """The run's dataset folder (the one holding vocab.json) when it is on this machine, else None.

    Never builds one: a sampler must not start a dataset build.
    """
    from data_prep.build import dataset_path

    dataset_dir = str((config.get("data") or {}).get("dataset_dir") or "")
    for folder in ((dataset_dir, os.fspath(dataset_path(dataset_dir))) if dataset_dir else ()):
        if os.path.isfile(os.path.join(folder, "vocab.json")):
            return pathlib.Path(folder)
    return None


def dataset_note_seconds(config) -> dict:
    """The per-style note-length table of the run's dataset (build.json), or {} when the dataset
    is not here or predates the table (the guard then falls back to FALLBACK_MAX_NOTE_SECONDS)."""
    from data_prep.build import dataset_path

    dataset_dir = str((config.get("data") or {}).get("dataset_dir") or "")
    for folder in ((dataset_dir, os.fspath(dataset_path(dataset_dir))) if dataset_dir else ()):
        try:
            with open(os.path.join(folder, "build.json")) as f:
                return dict(json.load(f).get("note_seconds") or {})
        except (OSError, ValueError, AttributeError):
            continue
    return {}


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

    index: object  # mgpt.originality.CopyIndex over the train split
    piece_ids: list
    vocab: Vocabulary
    max_seconds: float
    tries: int = DEFAULT_COPY_TRIES

    @classmethod
    def for_run(cls, run: Run, max_seconds: float, tries: int = DEFAULT_COPY_TRIES) -> "CopyGuard | None":
        """The guard over the run's training set, or None (with a warning) when that is not here."""
        from mgpt import originality

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
            best = min(range(len(t)), key=lambda k: t[k]["seconds"])  # the first draw on a tie
            over = t[best]["seconds"] >= self.max_seconds
            if over:
                log(f"copy guard: {names[i]} still copies {t[best]['seconds']:.2f} s of training piece "
                    f"{t[best]['train_piece_id']} after {len(t)} draw(s); marked copy_over_limit in the manifest")
            kept.append(drawn[i][best])
            fields.append({"drawn_seed": t[best]["seed"], "copy": {k: v for k, v in t[best].items() if k != "seed"},
                           "copy_over_limit": over, "copy_tries": t})
        return kept, fields


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


def read_all_manifests(output_dir: str | os.PathLike) -> list[dict]:
    """Every host's manifest lines, one per piece index, in index order."""
    by_index = {}
    for path in sorted(pathlib.Path(output_dir).glob("manifest*.jsonl")):
        for entry in render.read_manifest(path):
            by_index.setdefault(entry["index"], entry)
    return [by_index[i] for i in sorted(by_index)]


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
_SETTINGS_SINCE = {"guidance": 1.0}
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
) -> list[dict]:
    """Generate this host's share of `num_samples` pieces into output_dir, resuming; returns its manifest lines.

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

    group = batch_size * len(devices)
    groups = [todo[i : i + group] for i in range(0, len(todo), group)]
    written = [e for e in done.values() if e["index"] % process_count == process_index]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="piece", disable=not progress,
               desc=f"generating into {out}", dynamic_ncols=True)
    events = 0
    start = time.perf_counter()

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

    # Sampling of group g+1 runs (on its own thread) while group g's files are written.
    with concurrent.futures.ThreadPoolExecutor(1) as pool, _open_manifest(manifest) as log:
        pending = pool.submit(sample, groups[0]) if groups else None
        for g, pieces in enumerate(groups):
            rows, copy_fields = pending.result()
            pending = pool.submit(sample, groups[g + 1]) if g + 1 < len(groups) else None
            for p, ids, copy in zip(pieces, rows, copy_fields):
                entry = _write_piece(run.vocab, out, p, ids, primer_ids, audio=audio, soundfont=soundfont, infill=infill,
                                     extra={**common, "workdir": run.workdir, "host": process_index,
                                            "max_note_seconds": note_limit[p.style], **(copy or {})})
                log.write(json.dumps(entry) + "\n")
                log.flush()  # a piece counts as done only once its line is on disk
                os.fsync(log.fileno())
                written.append(entry)
                events += entry["new_events"]
                bar.update(1)
            bar.set_postfix(events_per_s=f"{events / (time.perf_counter() - start):.0f}")
    bar.close()
    return sorted(written, key=lambda e: e["index"])


def _check_primer_seconds(seconds: float | None) -> None:
    if seconds is not None and not seconds >= 0:  # None, as 0, keeps all of the primer
        raise UserError(f"--primer_seconds must be >= 0 (0 keeps all of the primer), got {seconds}")


def check_output_dir(output_dir) -> None:
    """A one-line error before the weights are loaded when output_dir cannot be made or written."""
    try:
        pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        reason = e.strerror or e
        raise UserError(f"--output_dir={output_dir}: cannot write there ({reason}); pick another dir") from None


def decode(vocab: Vocabulary, ids: np.ndarray):
    """Any id row -> a NoteSequence that plays the same in every MIDI player (see render.playable).

    Nothing is cut here: note lengths are the sampler's business (its note-length guard,
    `Sampling.max_note_seconds`), so that pieces sampled with the guard off show the raw model.
    """
    return render.playable(vocab.decode(ids))


def _write_piece(vocab, out: pathlib.Path, piece: Piece, ids: np.ndarray, primer_ids, *, audio, soundfont, extra,
                 infill: Infill | None = None):
    ns = decode(vocab, ids)
    primer_len = 0 if primer_ids is None else len(primer_ids)
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
        "events": int(len(ids) - 1),  # without the STYLE token; primer included
        "new_events": int(len(ids) - 1 - primer_len),
        "primer_events": primer_len,
        "seconds": round(float(ns.total_time), 3),
        "notes": len(ns.notes),
        **extra,
    }


def write_gallery(output_dir: str | os.PathLike, title: str | None = None) -> pathlib.Path:
    """index.html over every manifest shard in output_dir."""
    entries = read_all_manifests(output_dir)
    return render.write_gallery(output_dir, entries, title=title or f"mgpt: {len(entries)} generated pieces")


# ----------------------------------------------------------------------------- command line


def define_flags(fv):
    """The command's flags, on their own FlagValues `fv`: mgpt.evaluate, which imports this
    module, defines flags of the same names for itself."""
    from absl import flags

    kw = {"flag_values": fv}
    flags.DEFINE_string("workdir", None, "Training run directory (or its checkpoints/ or one step dir).", **kw)
    flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to load (default: the latest).", **kw)
    flags.DEFINE_string("output_dir", None, "Where the .mid/.png/.wav files, manifest.jsonl and index.html go.", **kw)
    flags.DEFINE_integer("num_samples", 4, "Pieces to generate (in total, over all hosts).", **kw)
    flags.DEFINE_string("style", UNCONDITIONAL,
                        "A style name, a comma list (cycled over pieces), 'all' (every style) or 'unconditional'.", **kw)
    flags.DEFINE_string("primer", None, "A MIDI file to continue; it is kept at the start of every piece.", **kw)
    flags.DEFINE_float("primer_seconds", 10.0, "Seconds of the primer to keep (0 = all of it).", **kw)
    flags.DEFINE_string("infill", None, "A MIDI file whose gap [--infill_start, --infill_end) the model fills; "
                        "everything outside the gap is kept. Needs a model trained with data.fim_rate > 0.", **kw)
    flags.DEFINE_float("infill_start", None, "--infill: where the gap starts, in seconds of the file.", **kw)
    flags.DEFINE_float("infill_end", None, "--infill: where the gap ends, in seconds of the file (after the start, "
                       "at most where its music ends).", **kw)
    flags.DEFINE_float("temperature", Sampling.temperature, "Softmax temperature (> 0).", **kw)
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely events (0 = off).", **kw)
    flags.DEFINE_float("top_p", Sampling.top_p,
                       "Nucleus sampling: the smallest set with this much probability (1 = off).", **kw)
    flags.DEFINE_float("min_p", 0.0, "Drop events less likely than min_p * the most likely one (0 = off).", **kw)
    flags.DEFINE_bool("greedy", False, "Always take the most likely event (after the filters).", **kw)
    flags.DEFINE_integer("seed", 0, "Piece i uses seed + i.", **kw)
    flags.DEFINE_integer("max_events", None,
                         f"New events per piece (default {DEFAULT_MAX_EVENTS} if no --max_seconds).", **kw)
    flags.DEFINE_float("max_seconds", None,
                       "Seconds of new music per piece (with --max_events: whichever ends first).", **kw)
    flags.DEFINE_float("max_note_seconds", None,
                       "Close any note that has sounded this long, at the next event (0 = off; default: the "
                       f"{NOTE_GUARD_PERCENTILE} note length of the style's training pieces, from the dataset's "
                       "build.json).", **kw)
    flags.DEFINE_float("guidance", None, "Classifier-free style guidance G >= 0: l_uncond + G (l_cond - l_uncond); "
                       f"1 = off. Default: {DEFAULT_GUIDANCE:g} for a model trained with data.style_dropout > 0 "
                       "(configs/small.py), else 1.", **kw)
    flags.DEFINE_float("max_copy_seconds", DEFAULT_MAX_COPY_SECONDS,
                       "Copy guard: re-draw a piece that shares this many seconds with a training piece "
                       "(transposition-aware; 0 = off).", **kw)
    flags.DEFINE_integer("copy_tries", DEFAULT_COPY_TRIES,
                         "Copy guard: draws per piece before it is kept and marked copy_over_limit.", **kw)
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Pieces per device per sampler call.", **kw)
    flags.DEFINE_bool("audio", False,
                      f"Render a WAV per piece with FluidSynth ({render.INSTALL_AUDIO}).", **kw)
    flags.DEFINE_string("soundfont", None, "A .sf2 soundfont for --audio (default: Debian's GM soundfonts).", **kw)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", **kw)
    flags.DEFINE_enum("distributed", "auto", ["auto", "no"],
                      "Multi-host pods: 'auto' initialises jax.distributed when a cluster is detected.", **kw)


def run_command(f) -> pathlib.Path:
    """The command line's work, given parsed flags `f` (anything with the flag attributes)."""
    if not f.workdir or not f.output_dir:
        raise UserError("usage: python -m mgpt.generate --workdir=RUN --output_dir=OUT [--style=NAME|all] "
                        "[--num_samples=N] [--primer=FILE.mid | --infill=FILE.mid --infill_start=S --infill_end=E] [--audio]")
    sampling = Sampling(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, min_p=f.min_p, greedy=f.greedy,
                        max_events=f.max_events, max_seconds=f.max_seconds, max_note_seconds=f.max_note_seconds,
                        guidance=f.guidance)
    _check_primer_seconds(f.primer_seconds)
    check_copy_guard(f.max_copy_seconds, f.copy_tries)
    if f.audio:
        render.find_audio_tools(f.soundfont)
    # Everything a user can get wrong is checked before the weights are loaded.
    vocab, _, _ = read_run_info(f.workdir, f.checkpoint_step)
    styles = resolve_styles(vocab, f.style)
    if f.primer:
        load_primer(f.primer, vocab, f.primer_seconds)
    infill = None
    if f.infill is not None or f.infill_start is not None or f.infill_end is not None:
        if not f.infill:
            raise UserError("--infill_start/--infill_end need --infill=FILE.mid")
        if f.primer:
            raise UserError("--infill and --primer cannot be combined: the file around the gap is the primer")
        check_infill_times(f.infill_start, f.infill_end)
        infill = load_infill(f.infill, vocab, f.infill_start, f.infill_end)
        check_infill_model(vocab, f.workdir)
    check_output_dir(f.output_dir)
    import jax

    from mgpt import mesh

    mesh.maybe_initialize_distributed(f.distributed)

    run = load_run(f.workdir, f.checkpoint_step)
    generate_corpus(
        run, f.output_dir, num_samples=f.num_samples, styles=styles, seed=f.seed, sampling=sampling,
        primer=f.primer, primer_seconds=f.primer_seconds, batch_size=f.batch_size, audio=f.audio,
        soundfont=f.soundfont, progress=f.progress, max_copy_seconds=f.max_copy_seconds, copy_tries=f.copy_tries,
        infill=infill,
    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mgpt.generate: all pieces written")
    if jax.process_index() == 0:
        return write_gallery(f.output_dir)
    return pathlib.Path(f.output_dir)


@reported
def main(argv: Sequence[str] | None = None) -> None:
    from absl import flags, logging

    fv = flags.FlagValues()
    define_flags(fv)
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print("\n\n".join(__doc__.split("\n\n")[:2]) + "\n\nFlags:\n" + fv.get_help(include_special_flags=False))
        return
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise UserError(f"{e} (see python -m mgpt.generate --help)") from None
    if len(rest) > 1:
        raise UserError(f"unexpected arguments: {rest[1:]}")
    logging.set_verbosity(logging.ERROR)  # orbax logs every file it reads, and warns that a restore is read-only
    # pydub (imported by note-seq) warns about ffmpeg, which only its audio export needs.
    warnings.filterwarnings("ignore", "Couldn't find ffmpeg", RuntimeWarning)
    try:
        print(run_command(fv))
    except Exception as e:
        if not is_disk_full(e):
            raise
        quiet_after_disk_full()
        raise SystemExit(f"disk full writing {fv.output_dir}: every piece its manifest.jsonl lists is complete; "
                         "free some space and re-run the same command to write the rest") from None


if __name__ == "__main__":
    main()
