"""The `Run` API a notebook uses, and the reading of a command's inputs (primer, infill, styles).

    from mgpt.sample.run import load_run
    run = load_run("runs/demo")
    pieces = run.generate(style="bach", n=4, max_seconds=20, top_p=0.95)   # NoteSequences
    pieces = run.generate(style="bach", n=4, max_seconds=20, guidance=2.0)  # style guidance
    run.write_midi(pieces, "out/notebook")                                  # -> .mid paths
    filled = run.infill("mine.mid", start=8.0, end=12.0, n=4, style="bach")  # NoteSequences, gap refilled

`guidance=G` strengthens the requested style by classifier-free guidance (mgpt.sample.sampler;
the model must have been trained with data.style_dropout > 0, and such a model samples with
G = 1.5 unless told otherwise; G = 1 is plain sampling).

`infill(FILE.mid, start=S, end=E)` (seconds) keeps the file outside [S, E) and fills the gap:
the model (trained with data.fim_rate > 0) reads the music before S, the music from E on and
the gap's length, and writes a middle that lasts exactly E - S and leaves sounding at E just the
notes the file has sounding there (mgpt/sample/fim.py). Each sample is the whole joined piece.

Whole corpora (manifests, resume, the copy guard) are mgpt.sample.corpus; the command line is
mgpt.generate.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from data_prep import notes as notes_lib
from data_prep.vocab import UNKNOWN_STYLE, Vocabulary, normalize_label
from mgpt import render
from mgpt.errors import UserError

UNCONDITIONAL = "unconditional"
ALL_STYLES = "all"
DEFAULT_MAX_EVENTS = 1024  # when neither --max_events nor --max_seconds is given
# The note-length guard's default: this percentile of the requested style's note lengths in
# the training data (build.json's note_seconds). 99.5 cuts only notes longer than nearly
# all real ones; FALLBACK_MAX_NOTE_SECONDS serves a run whose dataset has no such table.
NOTE_GUARD_PERCENTILE = "p99.5"
FALLBACK_MAX_NOTE_SECONDS = 8.0
# Style guidance for a model trained with style dropout (it runs every row twice). On four demo
# models (README, Results) G = 1.5 took style accuracy from 79-88.5 % to 83-95.8 %, keeping the
# feature overlap at 0.85-0.91x its ceiling; G = 2 did better on two of them (99 % on the final
# one) and worse on two, and G = 3 lost overlap (0.80x).
DEFAULT_GUIDANCE = 1.5
# What a piece reads past the model's window (`Sampling.context`; mgpt.sample.sampler.CONTEXTS):
# 'rolling' (a rolling KV cache under continuous batching) or 'reprefill' (re-prefilled
# windows, batch by batch). docs/sampling.md has the measurements behind the choice.
DEFAULT_CONTEXT = "reprefill"



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
    """A gap [start, end) seconds to fill in a MIDI file: its events and their cut (`mgpt.sample.fim.Gap`)."""

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
    from mgpt.sample import fim

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
    # With controls: the guidance of a piece with a style, whose twin then reads the controls, so G pulls
    # towards the style within them (mgpt.sample.controls.steered_twins). None: `guidance`, and without
    # contrast_style the twin reads neither: G pulls towards the style and the controls together.
    steered_guidance: float | None = None
    # With controls: the twin of a piece with a style reads the controls and its contrast style, so
    # guidance pulls away from that style: 'STYLE:OTHER,...' pairs (a style the model mistakes for
    # another), or 'auto', each piece the other style whose training segments have the levels asked
    # for most often (mgpt.sample.controls.parse_contrast; docs/controls.md measures both). '': off.
    contrast_style: str = ""
    # Hard limits, held on every sampled event by the sampler's mask (mgpt/sample/limits.py). A range
    # is (lo, hi) or the text 'lo-hi'; None = no limit.
    pitch_range: tuple[int, int] | str | None = None
    max_polyphony: int | None = None
    velocity_range: tuple[int, int] | str | None = None
    # Controls (mgpt/sample/controls.py): a --controls timeline and/or a --mood; None = none.
    controls: str | None = None
    mood: str | None = None
    # With a density asked for, each segment strikes as many notes as its level holds, no more and
    # no fewer (mgpt/sample/controls.py); False: the model's own density (docs/controls.md has both).
    density_guard: bool = True
    # With a register asked for, no NOTE_ON leaves the segment's mean pitch more than a level away
    # and further than it was (the same file); False: the model's own register (docs/controls.md has both).
    register_guard: bool = True
    # With a mode asked for, no NOTE_ON moves the segment's pitch classes further from that mode once
    # they are outside it (the same file); False: the model's own mode (docs/controls.md has both).
    mode_guard: bool = True
    # With the mode guard: the mode is sought inside the seven-note scale holding most of the piece's notes
    # (a segment asked for minor in a major piece turns to its relative minor); False: through any notes.
    scale_guard: bool = True
    # With a loudness asked for, no VELOCITY more than one level from it (the same file); False: the model's own.
    loudness_guard: bool = True
    # With a polyphony asked for, no onset takes the segment's mean polyphony more than a level away and
    # further than it was (the same file); False: the model's own polyphony.
    polyphony_guard: bool = True
    context: str = DEFAULT_CONTEXT  # past the window: 'rolling' or 'reprefill' (DEFAULT_CONTEXT)
    # With controls asked for: each control segment drawn this many times and the draw whose measured
    # levels are nearest the asked ones kept (mgpt/sample/rerank.py); 1 = one draw.
    control_tries: int = 1
    # With control_tries > 1: of the draws equally near the asked controls, the one the model reads
    # most as the piece's style kept (rerank.style_evidence); pieces with a style and no controls are
    # then drawn segment by segment too, chosen alike. False: the first of them.
    prefer_style: bool = False

    @property
    def steered(self) -> bool:
        """Whether controls or a mood are asked for."""
        return bool((self.controls or "").strip() or (self.mood or "").strip())

    def windowed_only(self) -> bool:
        """Whether these settings need the windowed sampler: hard limits and controls are not in
        the continuous one yet (mgpt/sample/continuous.py), so 'rolling' re-prefills with them."""
        return any(v not in (None, "") for v in (self.pitch_range, self.max_polyphony, self.velocity_range,
                                                 self.controls, self.mood))

    def __post_init__(self):
        from mgpt.sample.sampler import CONTEXTS, sampling_settings

        try:
            sampling_settings(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              greedy=self.greedy)
        except ValueError as e:
            raise UserError(f"--{e}") from None
        if self.context not in CONTEXTS:
            raise UserError(f"--context must be one of {', '.join(CONTEXTS)}, got {self.context!r}")
        # A zero budget writes pieces with no new music: refused rather than done silently.
        if self.max_events is not None and self.max_events < 1:
            raise UserError(f"--max_events must be >= 1, got {self.max_events}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise UserError(f"--max_seconds must be > 0, got {self.max_seconds}")
        if isinstance(self.control_tries, bool) or not isinstance(self.control_tries, (int, np.integer)) \
                or not 1 <= self.control_tries <= 64:
            raise UserError(f"--control_tries must be a whole number in 1..64, got {self.control_tries!r}")
        if not isinstance(self.prefer_style, (bool, np.bool_)):
            raise UserError(f"--prefer_style must be true or false, got {self.prefer_style!r}")
        if not isinstance(self.contrast_style, str):
            raise UserError(f"--contrast_style must be text ('auto' or STYLE:OTHER pairs), got {self.contrast_style!r}")
        if self.prefer_style and self.control_tries < 2:
            raise UserError("--prefer_style chooses among the draws of each control segment: give --control_tries=K "
                            "with K > 1")
        if self.control_tries > 1 and (self.steered or self.prefer_style) \
                and (self.max_seconds is None or self.max_events is not None):
            raise UserError(f"--control_tries={self.control_tries} draws pieces a control segment at a time: give "
                            "their length in seconds (--max_seconds), not in events")
        if self.max_note_seconds is not None and not self.max_note_seconds >= 0:
            raise UserError(f"--max_note_seconds must be >= 0 (0 = off), got {self.max_note_seconds}")
        for name in ("guidance", "steered_guidance"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                guidance_ok = np.isfinite(float(value)) and float(value) >= 0
            except (TypeError, ValueError):
                guidance_ok = False
            if not guidance_ok:
                raise UserError(f"--{name} must be a number >= 0{' (1 = off)' if name == 'guidance' else ''}, "
                                f"got {value!r}")
            object.__setattr__(self, name, float(value))  # a plain float for the manifest's JSON
        from mgpt.sample.limits import HardLimits, parse_range

        try:
            for name in ("pitch_range", "velocity_range"):
                if isinstance(getattr(self, name), str) or getattr(self, name) is None:
                    object.__setattr__(self, name, parse_range(name, getattr(self, name)))
            limits = HardLimits(pitch_range=self.pitch_range, max_polyphony=self.max_polyphony,
                                velocity_range=self.velocity_range)
        except ValueError as e:
            raise UserError(str(e) if str(e).startswith("--") else f"--{e}") from None
        for name in ("pitch_range", "velocity_range"):
            object.__setattr__(self, name, getattr(limits, name))

    def hard_limits(self):
        """The hard limits as `mgpt.sample.limits.HardLimits` (inactive when none is set)."""
        from mgpt.sample.limits import HardLimits

        return HardLimits(pitch_range=self.pitch_range, max_polyphony=self.max_polyphony,
                          velocity_range=self.velocity_range)

    def timeline(self, vocab: Vocabulary):
        """--controls and --mood as a `mgpt.sample.controls.Timeline` for this vocabulary; a UserError
        naming the flag when they are wrong or the model has no control tokens."""
        from mgpt.sample import controls

        try:
            return controls.parse(vocab, self.controls, self.mood, **{g: getattr(self, g) for g in GUARDS})
        except ValueError as e:
            raise UserError(str(e)) from None

    def check_limits(self, vocab: Vocabulary) -> None:
        """A range that holds nothing the model can play: one line naming the flag."""
        try:
            self.hard_limits().banned_V(vocab)
        except ValueError as e:
            raise UserError(f"--{e}") from None

    def budget(self) -> dict:
        if self.max_events is None and self.max_seconds is None:
            return {"max_events": DEFAULT_MAX_EVENTS, "max_seconds": None}
        return {"max_events": self.max_events, "max_seconds": self.max_seconds}

    def to_dict(self) -> dict:
        ranges = {k: list(getattr(self, k)) for k in ("pitch_range", "velocity_range") if getattr(self, k)}
        # The guards do nothing without controls: recorded as off then, as manifests from before
        # them read (mgpt.sample.corpus), so that a corpus without controls resumes as it was.
        return {**dataclasses.asdict(self), **self.budget(), **ranges,  # lists: what the manifest's JSON reads back
                "density_guard": bool(self.density_guard and self.steered),
                "register_guard": bool(self.register_guard and self.asks("register")),
                "mode_guard": bool(self.mode_guard and self.asks("mode")),
                "scale_guard": bool(self.scale_guard and self.mode_guard and self.asks("mode")),
                "loudness_guard": bool(self.loudness_guard and self.asks("loudness")),
                "polyphony_guard": bool(self.polyphony_guard and self.asks("polyphony")),
                "control_tries": int(self.control_tries) if self.steered or self.prefer_style else 1,
                "prefer_style": bool(self.prefer_style),
                "steered_guidance": self.steered_guidance if self.steered else None,
                "contrast_style": self.contrast_style.strip() if self.steered else ""}

    def asks(self, control: str) -> bool:
        """Whether --controls names `control` (or --mood sets it): a guard on a control nobody asks
        for changes nothing, and is recorded as off, so that a corpus begun before it resumes."""
        from mgpt.sample.controls import MOODS

        named = {item.partition("=")[0].strip().lower() for part in (self.controls or "").split(";")
                 for item in part.rpartition(":")[2].split(",")}
        return control in named or (control in MOODS.get((self.mood or "").strip().lower(), {}))


# The controls' guards (mgpt/sample/controls.py): Sampling's fields, a flag each in mgpt.generate and
# mgpt.evaluate (defined here once; tests/test_layout.py reads these calls). docs/controls.md measures each.
GUARDS = ("density_guard", "register_guard", "polyphony_guard", "mode_guard", "scale_guard", "loudness_guard")


def define_guard_flags(flags, kw: dict) -> None:
    """--density_guard, --register_guard, --polyphony_guard, --mode_guard, --scale_guard,
    --loudness_guard, --control_tries, --prefer_style, --steered_guidance and --contrast_style, defaulting to
    Sampling's."""
    flags.DEFINE_bool("density_guard", Sampling.density_guard, "With a density asked for: each control segment "
                      "strikes as many notes as its level holds, no more (NOTE_ON masked) and no fewer (leaving it "
                      "masked); false = the model's own density.", **kw)
    flags.DEFINE_bool("register_guard", Sampling.register_guard, "With a register asked for: no NOTE_ON leaves its "
                      "control segment's mean pitch more than one level away and further than it was; false = the "
                      "model's own register.", **kw)
    flags.DEFINE_bool("polyphony_guard", Sampling.polyphony_guard, "With a polyphony asked for: no onset takes its "
                      "control segment's mean polyphony more than one level away and further than it was (NOTE_ON "
                      "masked, or TIME_SHIFT and VELOCITY while a chord is too thin); false = the model's own "
                      "polyphony.", **kw)
    flags.DEFINE_bool("mode_guard", Sampling.mode_guard, "With a mode asked for: no NOTE_ON moves its control "
                      "segment's pitch classes further from that mode (by the key-finding rule the evaluation "
                      "measures) once they are outside it; false = the model's own mode.", **kw)
    flags.DEFINE_bool("scale_guard", Sampling.scale_guard, "With the mode guard: a segment is steered to its mode "
                      "through the notes of the piece's own scale (the seven-note scale holding most of its notes "
                      "so far), not through notes outside it; false = through any notes.", **kw)
    flags.DEFINE_bool("loudness_guard", Sampling.loudness_guard, "With a loudness asked for: no VELOCITY more than "
                      "one level from it in its control segment; false = the model's own loudness.", **kw)
    flags.DEFINE_integer("control_tries", Sampling.control_tries, "With controls asked for: each control segment "
                         "is drawn this many times and the draw whose measured levels are nearest the asked ones is "
                         "kept (about ten times the work at 4: docs/controls.md); 1 = one draw.", **kw)
    flags.DEFINE_bool("prefer_style", Sampling.prefer_style, "With --control_tries=K > 1: of the draws nearest the "
                      "asked controls, keep the one the model itself reads most as the piece's style (pieces with a "
                      "style and no controls are then drawn K times a segment too); false = the first of them.", **kw)
    flags.DEFINE_float("steered_guidance", None, "With controls asked for, the guidance of a piece with a style: its "
                       "twin reads the controls, so G pulls towards the style within them (2 keeps more of the "
                       "style when following a whole timeline: docs/controls.md). Needs style guidance (a model "
                       "trained with style dropout, --guidance != 1). Default: off, --guidance pulls towards the "
                       "style and the controls together.", **kw)
    flags.DEFINE_string("contrast_style", Sampling.contrast_style, "With controls asked for and style guidance, "
                        "a piece with a style has a twin that reads the controls and another style, and guidance "
                        "pulls away from it: STYLE:OTHER pairs separated by commas (e.g. folk_british_irish:"
                        "folk_german, a style and the one it is mistaken for), or 'auto' (the other style whose "
                        "training segments have the asked levels most often). Following real timelines it keeps "
                        "more of the style, and asked for one control it narrows the pieces (docs/controls.md). "
                        "Default: off.", **kw)


def guard_settings(f) -> dict:
    """The guard flags (and --control_tries, --prefer_style, --steered_guidance, --contrast_style) of parsed flags
    `f`, as Sampling's keyword arguments."""
    return {**{name: getattr(f, name) for name in GUARDS}, "control_tries": f.control_tries,
            "prefer_style": f.prefer_style, "steered_guidance": f.steered_guidance,
            "contrast_style": f.contrast_style}


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
    _scorer: object = dataclasses.field(default=None, repr=False, init=False)  # `scorer`'s, once built
    _counted: bool = dataclasses.field(default=False, repr=False, init=False)  # `count_style_levels` has run

    @property
    def default_guidance(self) -> float:
        """DEFAULT_GUIDANCE for a model trained with style dropout (it knows STYLE:unknown, the
        unconditional twin guidance needs), else 1: plain sampling."""
        dropout = getattr(self.config.data, "style_dropout", 0.0) if self.config is not None else 0.0
        return DEFAULT_GUIDANCE if dropout and dropout > 0 else 1.0

    def sampling(self, sampling: Sampling, prompts: Sequence[np.ndarray] = ()) -> Sampling:
        """`sampling` with its defaults that depend on this run filled in: guidance, which is 1
        when every prompt is unconditional and no controls are asked for (its twin would be itself:
        twice the work, same piece)."""
        if sampling.guidance is not None:
            return sampling
        unconditional = (len(prompts) and not sampling.steered
                         and all(int(p[0]) == self.vocab.unknown_style_id for p in prompts))
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

    def count_style_levels(self) -> None:
        """--contrast_style=auto (`Sampling.contrast_style`) reads how often each style's training segments
        have each control level, which training stores in the vocabulary. A model trained before it was
        stored gets the counts from its training split when that is on this machine (a few seconds
        for the demo's); otherwise `auto` finds no contrast style, its pieces are drawn as without
        the flag, and a warning says so, once."""
        if self._counted or self.vocab.controls is None or self.vocab.controls.get("by_style") \
                or len(self.styles) < 2:
            return
        self._counted = True
        if self.dataset_dir is None:
            print(f"warning: --contrast_style: {self.workdir or 'this model'} was trained before the per-style "
                  "control counts were stored, and its training dataset (config.data.dataset_dir) is not on this "
                  "machine; --contrast_style=auto finds no contrast style, and pieces are drawn without it",
                  file=sys.stderr, flush=True)
            return
        from mgpt.train.data import style_level_counts

        counts = style_level_counts(self.vocab, self.dataset_dir)
        self.vocab = self.vocab.with_controls({**self.vocab.controls, "by_style": counts})

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

    def scorer(self):
        """The (tokens_BxL, unknown_style_id) -> float32 gain_BxL of `rerank.style_evidence` (its
        forward pass the jitted `target_log_probs`):
        at position j, log p(token j + 1) under the row's own STYLE (token 0) minus under
        STYLE:unknown, the rest of the row read alike. Built once per run."""
        if self._scorer is None:
            import jax.numpy as jnp
            from flax import nnx

            from mgpt.model.kinds import target_log_probs

            graphdef, params = nnx.split(self.model)

            def gain(tokens_BxL, unknown):
                twin_BxL = tokens_BxL.at[:, 0].set(unknown)
                next_BxL = jnp.roll(tokens_BxL, -1, axis=1)  # the last position's is never counted
                got_RxL = target_log_probs(graphdef, params, jnp.concatenate([tokens_BxL, twin_BxL]),
                                           jnp.concatenate([next_BxL, next_BxL]))
                styled_BxL, twin_BxL = jnp.split(got_RxL, 2)
                return styled_BxL - twin_BxL

            self._scorer = gain
        return self._scorer

    def sample_ids(
        self,
        prompts: Sequence[np.ndarray],
        seeds: Sequence[int],
        sampling: Sampling = Sampling(),
        *,
        batch_size: int | None = None,
        devices: Sequence | None = None,
        gaps: Sequence | None = None,
        timelines: Sequence[str | None] | None = None,
        piece_ends_s: Sequence[float] | None = None,
    ) -> list[np.ndarray]:
        """prompts[i] continued with seed seeds[i] -> full rows (prompt + new events, no EOS).

        The rows are split evenly over `devices` (default: all local devices); each
        device runs the jitted sampler on its share, `batch_size` rows at a time.
        With `gaps` (mgpt.sample.fim.Gap per prompt) the new events are each gap's middle, whose
        length the gap sets (`Sampling.max_events` still caps its events).
        `timelines`: a --controls text per prompt, in place of `sampling.controls` (its guards and
        mood apply to each); each row follows its own text as it would alone (a larger batch may
        round the model's sums differently, as for any prompt).
        `piece_ends_s` (with `timelines`): where each row's piece ends on its clock, when the rows
        are parts of pieces (`rerank`): the density guard keeps a part from ending the piece short.
        """
        import jax

        from mgpt.sample import continuous, sampler

        if sampling.control_tries > 1 and gaps is None and (sampling.steered or any(timelines or ())
                                                             or sampling.prefer_style):
            from mgpt.sample import rerank

            if sampling.prefer_style and self.config is not None \
                    and not getattr(self.config.data, "style_dropout", 0.0):
                raise UserError("--prefer_style reads how much more likely a draw is under its style than under "
                                "STYLE:unknown, which this model was not trained on (data.style_dropout = 0)")

            texts = timelines if timelines is not None else [sampling.controls] * len(prompts)
            return rerank.sample_by_segment(self, prompts, seeds, sampling, texts, sampling.control_tries,
                                            batch_size=batch_size, devices=devices)
        devices = list(devices) if devices is not None else jax.local_devices()
        devices = devices[: max(1, len(prompts))]
        shares = np.array_split(np.arange(len(prompts)), len(devices))
        if timelines is not None:
            if len(timelines) != len(prompts):
                raise ValueError(f"{len(timelines)} timelines for {len(prompts)} prompts")
            sampling = dataclasses.replace(sampling, controls=next((t for t in timelines if t), sampling.controls))
        sampling = self.sampling(sampling, prompts)
        controls = sampling.timeline(self.vocab)
        if timelines is not None:
            controls = [dataclasses.replace(sampling, controls=t).timeline(self.vocab) for t in timelines]
        if piece_ends_s is not None:
            if timelines is None or len(piece_ends_s) != len(prompts):
                raise ValueError(f"piece_ends_s needs timelines and one end per prompt ({len(prompts)})")
            controls = [dataclasses.replace(c, ends_s=float(e)) for c, e in zip(controls, piece_ends_s)]
        from mgpt.sample.controls import steered_rows

        from mgpt.sample.controls import CONTRAST_AUTO, parse_contrast

        try:
            contrast = parse_contrast(self.vocab, sampling.contrast_style)
        except ValueError as e:
            raise UserError(str(e)) from None
        if contrast == CONTRAST_AUTO and sampling.guidance != 1 and any(steered_rows(self.vocab, prompts, controls)):
            self.count_style_levels()
        if sampling.steered_guidance is not None and sampling.guidance == 1 \
                and any(steered_rows(self.vocab, prompts, controls)):
            raise UserError("--steered_guidance needs style guidance, and here it is off (--guidance=1, or a model "
                            "trained without data.style_dropout)")
        kwargs = dict(
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
            greedy=sampling.greedy, guidance=sampling.guidance, batch_size=batch_size,
            hard_limits=sampling.hard_limits(), controls=controls, steered_guidance=sampling.steered_guidance,
            contrast_style=contrast,
            **(sampling.budget() if gaps is None else {"max_events": sampling.max_events}),
        )
        limits = [self.max_note_seconds(p, sampling) for p in prompts]
        generate_tokens = continuous.generate_tokens if sampling.context == "rolling" else sampler.generate_tokens

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

    def stream(self, sampling: Sampling, *, batch_size: int, device=None) -> "PieceStream":
        """Pieces through the continuous sampler (mgpt.sample.continuous) on `device` (default:
        the model's): `add` prompts, iterate (piece id, row) as they finish. `sampling` should
        be resolved (`Run.sampling`); its guidance and budgets apply to every piece."""
        import jax.numpy as jnp

        from mgpt.sample.continuous import ContinuousSampler
        from mgpt.sample.sampler import budgets, sampling_settings, token_tables

        if sampling.windowed_only():
            raise ValueError("hard limits and controls need the windowed sampler: use Run.sample_ids")
        sampling = self.sampling(sampling)  # guidance None = the run's default, as everywhere else
        model = self.model if device is None or device == _device_of(self.model) else self.replica(device)
        guidance = None if sampling.guidance in (None, 1) else jnp.asarray(sampling.guidance, jnp.float32)
        settings = sampling_settings(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                                     min_p=sampling.min_p, greedy=sampling.greedy)
        sampler = ContinuousSampler(model, self.vocab, batch_size=batch_size, settings=settings,
                                    tables=token_tables(self.vocab), guidance=guidance, context=sampling.context)
        max_events, max_steps = budgets(self.vocab, model.cfg.max_len, **sampling.budget())
        return PieceStream(self, sampling, sampler, max_events, max_steps)

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
        min_p, greedy, max_events, max_seconds, max_note_seconds, guidance, and the hard limits
        pitch_range, max_polyphony, velocity_range, and controls / mood (see `Sampling`).
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
        + the closing events (`mgpt.sample.fim.close`) + the file's events from E. Also, per piece,
        new_events (the middle's) and what the closing did (released, struck, short_steps)."""
        from mgpt.sample import fim

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


@dataclasses.dataclass
class PieceStream:
    """`Run.stream`'s pieces: `add(piece, prompt, seed)`, then iterate (piece, row); more may be
    added while iterating (the copy guard's re-draws). Occupancy: sampler.events / sampler.slot_steps."""

    run: Run
    sampling: Sampling
    sampler: object  # mgpt.sample.continuous.ContinuousSampler
    max_events: int
    max_steps: int

    def add(self, piece: int, prompt: np.ndarray, seed: int) -> None:
        from mgpt.sample.sampler import note_steps

        limit = note_steps(self.run.vocab, self.run.max_note_seconds(prompt, self.sampling))
        self.sampler.add(piece, prompt, seed, max_events=self.max_events, max_steps=self.max_steps,
                         max_note_steps=int(limit))

    def __iter__(self):
        return iter(self.sampler)


def _device_of(model):
    import jax
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model))
    devices = leaves[0].devices() if leaves else set()
    return next(iter(devices)) if len(devices) == 1 else None


def read_run_info(workdir: str, step: int | None = None) -> tuple[Vocabulary, dict, int]:
    """(vocab, config dict, step) of a checkpoint without loading weights (fast; for checking flags)."""
    from mgpt.train import checkpoint as ckpt_lib

    def load(root, at_step):
        config = ckpt_lib.read_json_item(root, at_step, "config")
        vocab = Vocabulary.from_json(ckpt_lib.read_json_item(root, at_step, "vocab"), origin=f"{root}/{at_step}/vocab")
        return vocab, config

    (vocab, config), step = ckpt_lib.load_newest(workdir, step, load)
    return vocab, config, step


def load_run(workdir: str, step: int | None = None) -> Run:
    """A run's checkpoint (latest, or `step`) loaded for sampling."""
    from mgpt.train.checkpoint import restore_model

    _, config, _ = read_run_info(workdir, step)
    kind = config.get("model", {}).get("kind", "gpt")
    if kind != "gpt":  # the sampler's KV-cache decode is mgpt.model.GPT's
        raise UserError(f"{workdir}: model.kind={kind!r}; the sampler supports 'gpt' only")
    model, vocab, config, step = restore_model(workdir, step)
    dataset = local_dataset(config)
    return Run(model=model, vocab=vocab, config=config, step=step, workdir=str(workdir),
               note_seconds=dataset_note_seconds(config), dataset_dir=os.fspath(dataset) if dataset else None)


def keep_compiled(workdir: str, config: dict) -> str | None:
    """Keeps what this process compiles in the run's compilation cache (its config's
    `train.compilation_cache`, where training keeps its steps), so `mgpt.live` or `mgpt.generate`
    started again on the same run loads its sampler instead of compiling it: the live warm-up of
    the demo model falls from about 42 s to 9 s on the 2-core machine (docs/live.md). The sampler
    is many programs that each compile in under a second, so all are kept, not only slow ones
    (unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise).

    Local caches only: a run on object storage (`gs://`) would write each of those programs as an
    object, and a read-only bucket would warn once per program. Returns the cache's path, or None
    where there is none, it is remote, or it cannot be written (a checkpoint on read-only
    storage); jax's settings are then left as they were, and compiling each time is all it costs."""
    import jax

    from mgpt.train import mesh

    directory = (config.get("train") or {}).get("compilation_cache", "")
    if not directory or "://" in directory or "://" in str(workdir):
        return None
    path = os.path.abspath(directory if os.path.isabs(directory) else os.path.join(workdir, directory))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # a user's own threshold stands
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return mesh.use_compilation_cache(path, pathlib.Path(workdir))


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


def _check_primer_seconds(seconds: float | None) -> None:
    if seconds is not None and not seconds >= 0:  # None, as 0, keeps all of the primer
        raise UserError(f"--primer_seconds must be >= 0 (0 keeps all of the primer), got {seconds}")


def decode(vocab: Vocabulary, ids: np.ndarray):
    """Any id row -> a NoteSequence that plays the same in every MIDI player (see render.playable).

    Nothing is cut here: note lengths are the sampler's business (its note-length guard,
    `Sampling.max_note_seconds`), so that pieces sampled with the guard off show the raw model.
    """
    return render.playable(vocab.decode(ids))

