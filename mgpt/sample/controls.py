"""Asking for controls: `--controls` timelines, `--mood`, and the tokens the sampler forces.

A model trained with control tokens (config.data.control_seconds > 0; data_prep/controls.py)
reads, at the start of each segment of its piece, that segment's note density, polyphony,
register, loudness and mode. Sampling writes the tokens a user asks for at those same places,
inside the jitted decode loop: right after the event that carries the row's clock into a new
segment (and once before the first new event), keyed off the row's step clock. They are forced,
not drawn, and move no time; a control not asked for is left out, and the model chooses it.

`--controls="density=6,register=low"` holds for the whole piece;
`--controls="0:density=2;20:density=6,loudness=7"` is a timeline: each entry sets the controls it
names from that time (seconds of the piece) on and keeps the others; `NAME=free` lets the model
choose again. Levels are 1..K (K = the model's data.control_levels; level 1 is the training
split's lowest K-th), or low / mid / high (`level_names`; the nearest level the training split
has), and for mode major / minor / none. A level the training split never has (values tied with
quantile edges leave some empty) is refused: the model cannot have learnt it. A
change takes effect at the first segment boundary at or after its time: the tokens mark whole
segments, as in training.

`--mood=calm|happy|tense|sad` is a point on the valence/arousal plane (Russell's circumplex, the
quadrants EMOPIA labels), turned into controls by MOODS: arousal sets density and loudness
(low for calm and sad, high for happy and tense), valence sets mode (major for calm and happy,
minor for tense and sad). Controls given with --controls override the mood's.
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from data_prep import controls as controls_lib
from data_prep.vocab import Vocabulary

FREE = "free"
MOODS = {  # mood -> controls (levels by name); arousal -> density, loudness; valence -> mode
    "calm": {"density": "low", "loudness": "low", "mode": "major"},
    "happy": {"density": "high", "loudness": "high", "mode": "major"},
    "tense": {"density": "high", "loudness": "high", "mode": "minor"},
    "sad": {"density": "low", "loudness": "low", "mode": "minor"},
}


def level_names(levels: int) -> dict[str, int]:
    """low / mid / high as levels of K: the middle of the lowest, central and highest thirds."""
    third = levels / 3
    return {"low": max(1, math.ceil(third / 2)), "mid": (levels + 1) // 2,
            "high": min(levels, levels - math.ceil(third / 2) + 1)}


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Controls over a piece: (time in seconds, {control: level or None for free}) entries, times
    increasing from 0; each entry changes the controls it names."""

    entries: tuple[tuple[float, tuple[tuple[str, int | None], ...]], ...] = ()
    # The density guard: a segment asked for a density level strikes as many notes as that level
    # holds (`data_prep.controls.density_bounds`): past its most, NOTE_ON is masked until the next
    # segment; short of its fewest, a TIME_SHIFT into the next segment is.
    density_guard: bool = True
    # The register guard (`register_banned`; mgpt.generate turns it on): in a segment asked for a register
    # level, no NOTE_ON leaves the segment's mean pitch more than one level away and further than it was.
    register_guard: bool = False
    # The mode guard (`mode_banned`; mgpt.generate turns it on): in a segment asked for a mode, no NOTE_ON moves
    # the segment's pitch classes further from what the key-finding rule reads as that mode, once they are outside it.
    mode_guard: bool = False
    # The scale guard (`mode_banned`; with the mode guard; mgpt.generate turns it on): the mode is sought inside
    # the seven-note scale that holds most of the piece's notes so far, not through notes outside it.
    scale_guard: bool = False
    # The loudness guard (`loudness_banned`; mgpt.generate turns it on): in a segment asked for a loudness level,
    # no VELOCITY more than one level from it.
    loudness_guard: bool = False
    # The polyphony guard (`polyphony_banned`; mgpt.generate turns it on): in a segment asked for a polyphony
    # level, no onset takes the segment's mean polyphony more than one level away and further than it was.
    polyphony_guard: bool = False
    # Where the piece ends, in seconds on its clock, when a row is one part of it (--control_tries draws
    # a segment at a time): the density guard keeps the row from ending (EOS) before the notes the
    # timeline asks for up to there. None: the row's own budget is the piece's end.
    ends_s: float | None = None

    @property
    def empty(self) -> bool:
        return not any(level is not None for _, changes in self.entries for _, level in changes)

    def segment_levels(self, vocab: Vocabulary, segments: int) -> np.ndarray:
        """int64[segments, len(ATTRIBUTES)]: the level asked for in each segment (0 = free). A change at
        time T first marks the segment that opens at or after T."""
        seconds = vocab.controls["seconds"]
        out = np.zeros((segments, len(controls_lib.ATTRIBUTES)), np.int64)
        for k in range(segments):
            asked = {}  # an entry at T marks segment ceil(T / seconds) on
            for t, changes in self.entries:
                if math.ceil(t / seconds - 1e-9) > k:
                    break
                asked.update(changes)
            for a, name in enumerate(controls_lib.ATTRIBUTES):
                out[k, a] = asked.get(name) or 0
        return out

    def last_change_segment(self, vocab: Vocabulary) -> int:
        return max((math.ceil(t / vocab.controls["seconds"] - 1e-9) for t, _ in self.entries), default=0)

    def to_text(self) -> str:
        """The timeline as --controls reads it (levels as numbers): what a manifest records."""
        def level(name, v):
            return FREE if v is None else controls_lib.MODES[v - 1] if name == "mode" else str(v)
        return ";".join(f"{t:g}:" + ",".join(f"{k}={level(k, v)}" for k, v in changes) for t, changes in self.entries)


def parse(vocab: Vocabulary, text: str | None, mood: str | None = None, flag: str = "--controls",
          density_guard: bool = True, register_guard: bool = False, mode_guard: bool = False,
          polyphony_guard: bool = False, scale_guard: bool = False, loudness_guard: bool = False) -> Timeline:
    """--controls (and --mood) -> a Timeline. ValueError, one line naming the flag and the problem: an
    unknown control or mood, a level out of range, times out of order, or a model without controls."""
    text = (text or "").strip()
    mood = (mood or "").strip().lower()
    if not text and not mood:
        return Timeline(density_guard=density_guard, register_guard=register_guard, mode_guard=mode_guard,
                        polyphony_guard=polyphony_guard, scale_guard=scale_guard, loudness_guard=loudness_guard)
    if vocab.controls is None:
        which = flag if text else "--mood"
        raise ValueError(f"{which}: this model was trained without control tokens (data.control_seconds = 0); "
                         "train one with data.control_seconds > 0")
    if mood and mood not in MOODS:
        raise ValueError(f"--mood={mood}: unknown mood; known moods: {', '.join(MOODS)}")
    levels = vocab.controls["levels"]
    names = level_names(levels)
    seen = vocab.controls.get("seen") or {}
    entries: list[tuple[float, dict]] = []
    for part in [p.strip() for p in text.split(";") if p.strip()]:
        when, _, body = part.partition(":") if ":" in part else ("0", ":", part)
        try:
            t = float(when)
        except ValueError:
            raise ValueError(f"{flag}: '{part}': '{when.strip()}' is not a time in seconds "
                             "(write TIME:NAME=LEVEL,...;TIME:...)") from None
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"{flag}: time {when} must be seconds >= 0")
        if entries and t <= entries[-1][0]:
            raise ValueError(f"{flag}: times must increase: {t:g} s comes after {entries[-1][0]:g} s")
        changes = {}
        for item in [i.strip() for i in body.split(",") if i.strip()]:
            name, eq, value = (s.strip().lower() for s in item.partition("="))
            if name not in controls_lib.ATTRIBUTES:
                raise ValueError(f"{flag}: unknown control '{name}'; known: {', '.join(controls_lib.ATTRIBUTES)}")
            if not eq or not value:
                raise ValueError(f"{flag}: '{item}' needs a level (NAME=LEVEL)")
            changes[name] = _level(flag, name, value, levels, names, seen.get(name))
        if not changes:
            raise ValueError(f"{flag}: the entry '{part}' names no control")
        entries.append((t, changes))
    if mood:  # the mood's controls, under whatever --controls sets at 0 s
        base = {k: _level(f"--mood={mood}", k, v, levels, names, seen.get(k)) for k, v in MOODS[mood].items()}
        if entries and entries[0][0] == 0:
            entries[0] = (0.0, {**base, **entries[0][1]})
        else:
            entries.insert(0, (0.0, base))
    if entries and entries[0][0] > 0:
        entries.insert(0, (0.0, {}))
    return Timeline(tuple((t, tuple(sorted(c.items(), key=lambda kv: controls_lib.ATTRIBUTES.index(kv[0]))))
                          for t, c in entries), density_guard=density_guard,
                    register_guard=register_guard, mode_guard=mode_guard, polyphony_guard=polyphony_guard,
                    scale_guard=scale_guard, loudness_guard=loudness_guard)


def _level(flag: str, name: str, value: str, levels: int, names: dict[str, int],
           seen: list[int] | None = None) -> int | None:
    """One level; `seen`: the levels the model's training split has (None: any), see data_prep.controls.fit."""
    if value == FREE:
        return None
    if name == "mode":
        if value not in controls_lib.MODES:
            raise ValueError(f"{flag}: mode={value} is not a mode; use {', '.join(controls_lib.MODES)} or {FREE}")
        level = controls_lib.MODES.index(value) + 1
    elif value in names:  # a name is the nearest level the model knows
        return names[value] if not seen else min(seen, key=lambda k: (abs(k - names[value]), k))
    elif not value.isdigit() or not 1 <= int(value) <= levels:
        raise ValueError(f"{flag}: {name}={value} is out of range; use a level 1..{levels}, "
                         f"{', '.join(names)} or {FREE}")
    else:
        level = int(value)
    if seen is not None and level not in seen:
        known = ", ".join(controls_lib.MODES[k - 1] if name == "mode" else str(k) for k in seen)
        raise ValueError(f"{flag}: {name}={value} never occurs in this model's training data, so it cannot have "
                         f"learnt it; use one of {known} or {FREE}")
    return level


# ----------------------------------------------------------------------------- in the decode loop


@flax.struct.dataclass
class ControlPlan:
    """The control tokens each row must write (B rows, S segments, A = len(ATTRIBUTES)).

    group_BxSxA: segment k's tokens, in order, -1 after the last (free ones are left out); a row
    past segment S - 1 stays on its last one. offset_B: the row's clock at its first new event,
    in steps from the piece's start (the primer's length). segment_steps: int32 scalar.
    cap_BxS / floor_BxS: the density guard, the most / fewest notes segment k may strike (None: no
    row has a guard, which traces as before; no bound where density is free or the guard is off).
    owed_BxS / end_B: with them, whether a segment after k that opens before the row's piece ends
    has a floor (the row may not end in segment k then), and where it ends, in steps on its clock
    (its `Timeline.ends_s`, else its budget's end; int32 max with neither).
    register_BxS / register_edges_E: the register guard, the level segment k asks for (0: free or
    no guard) and the level edges in pitch-index space (None: no row has one).
    mode_BxS / pitch_class_P: the mode guard, the mode segment k asks for (1 major, 2 minor, 3 none;
    0: free or no guard) and each pitch index's pitch class (None: no row has one).
    scale_B: the scale guard, whether each row's mode guard seeks the mode inside the piece's scale
    (None: no row does).
    loudness_BxS / velocity_level_V: the loudness guard, the level segment k asks for (0: free or no
    guard) and the loudness level of each VELOCITY token's velocity (0 for other tokens; None: no
    row has one).
    polyphony_BxS / polyphony_edges_E: the polyphony guard, the level segment k asks for (0: free or
    no guard) and the level edges (None: no row has one).
    styled_B / guidance_B: under guidance, the rows with a style whose twins read the control tokens
    (guidance then pushes towards the style the controls leave, `steered_twins`), and each row's G
    (None: every twin reads neither the style nor the controls, at the job's G).
    twin_style_B: the STYLE token each twin reads (the contrast style of a styled row,
    `contrast_styles`; STYLE:unknown for the others); None: STYLE:unknown for every twin.
    """

    group_BxSxA: jax.Array
    offset_B: jax.Array
    segment_steps: jax.Array
    cap_BxS: jax.Array | None = None
    floor_BxS: jax.Array | None = None
    owed_BxS: jax.Array | None = None
    end_B: jax.Array | None = None
    register_BxS: jax.Array | None = None
    register_edges_E: jax.Array | None = None
    mode_BxS: jax.Array | None = None
    pitch_class_P: jax.Array | None = None
    scale_B: jax.Array | None = None
    loudness_BxS: jax.Array | None = None
    velocity_level_V: jax.Array | None = None
    polyphony_BxS: jax.Array | None = None
    polyphony_edges_E: jax.Array | None = None
    styled_B: jax.Array | None = None
    guidance_B: jax.Array | None = None
    twin_style_B: jax.Array | None = None


def plan(vocab: Vocabulary, timelines, offsets_steps, batch: int, max_steps: int | None) -> ControlPlan:
    """The ControlPlan of `timelines` (one per row; rows past them are padding), offsets in steps."""
    seg = controls_lib.segment_steps(vocab)
    last = max(t.last_change_segment(vocab) for t in timelines)
    ends = [int(o) + (max_steps if max_steps is not None else 0) for o in offsets_steps]
    pieces = [None if t.ends_s is None else int(round(t.ends_s * vocab.steps_per_second)) for t in timelines]
    segments = max(last, max(ends) // seg if max_steps is not None else 0,
                   max((e for e in pieces if e is not None), default=0) // seg) + 1
    group = np.full((batch, segments, len(controls_lib.ATTRIBUTES)), -1, np.int32)
    for b, t in enumerate(timelines):
        for k, levels_A in enumerate(t.segment_levels(vocab, segments)):
            tokens = controls_lib.group(vocab, levels_A)
            group[b, k, :len(tokens)] = tokens
    offset = np.zeros(batch, np.int32)
    offset[:len(offsets_steps)] = offsets_steps
    floors, caps = (np.asarray(x) for x in controls_lib.density_bounds(vocab.controls))
    cap = np.full((batch, segments), caps[-1], np.int32)
    floor = np.zeros((batch, segments), np.int32)
    density = controls_lib.ATTRIBUTES.index("density")
    for b, t in enumerate(timelines):
        if t.density_guard:
            levels_S = t.segment_levels(vocab, segments)[:, density]
            cap[b] = np.where(levels_S > 0, caps[levels_S], caps[-1])
            floor[b] = np.where(levels_S > 0, floors[levels_S], 0)
    # A segment owes notes if a later one the piece reaches has a floor: a piece asked to open quiet
    # and turn busy may not end in its quiet opening (reached: opening before the piece's end; with
    # no budget and no end given, every segment of the plan).
    opens_S = np.arange(segments) * seg
    end = np.full(batch, np.iinfo(np.int32).max, np.int64)
    for b, piece_end in enumerate(pieces):
        if piece_end is not None or max_steps is not None:
            end[b] = piece_end if piece_end is not None else ends[b]
    reached_BxS = opens_S[None, :] < end[:len(timelines), None]
    owing_BxS = np.zeros((batch, segments), bool)
    owing_BxS[:len(reached_BxS)] = (floor[:len(reached_BxS)] > 0) & reached_BxS
    owed = np.zeros((batch, segments), bool)
    owed[:, :-1] = np.flip(np.logical_or.accumulate(np.flip(owing_BxS[:, 1:], 1), 1), 1)

    def guarded_levels(name: str) -> np.ndarray:
        """[batch, segments]: the level of control `name` each segment asks for, where its guard is on."""
        out = np.zeros((batch, segments), np.int32)
        for b, t in enumerate(timelines):
            if getattr(t, f"{name}_guard"):
                out[b] = t.segment_levels(vocab, segments)[:, controls_lib.ATTRIBUTES.index(name)]
        return out

    register, mode, poly = guarded_levels("register"), guarded_levels("mode"), guarded_levels("polyphony")
    loudness = guarded_levels("loudness")
    loud = bool(np.any(loudness > 0))
    velocity_level_V = np.zeros(vocab.size, np.int32)
    if loud:  # each VELOCITY token's level, by the rule the evaluation reads a segment's mean velocity with
        bins = np.arange(1, vocab.num_velocity_bins + 1)
        velocity_level_V[vocab.velocity_offset + bins - 1] = _binned_level(
            jnp.asarray(vocab.controls["edges"]["loudness"], jnp.float32),
            jnp.asarray(vocab.bin_to_velocity(bins), jnp.float32))
    registered, moded, polyphonic = bool(np.any(register > 0)), bool(np.any(mode > 0)), bool(np.any(poly > 0))
    pitch_class_P = (np.arange(vocab.note_off_offset - vocab.note_on_offset) + vocab.min_pitch) % 12
    scale_B = np.zeros(batch, bool)
    scale_B[:len(timelines)] = [t.mode_guard and t.scale_guard for t in timelines]
    scaled = moded and bool(np.any(scale_B & np.any(mode > 0, axis=1)))
    # Either guard counts the notes of each segment (RowState.segment_notes_B).
    guarded = np.any(cap < caps[-1]) or np.any(floor > 0) or registered
    edges = np.asarray(vocab.controls["edges"]["register"], np.float32) - vocab.min_pitch
    return ControlPlan(group_BxSxA=jnp.asarray(group), offset_B=jnp.asarray(offset),
                       segment_steps=jnp.asarray(seg, jnp.int32),
                       cap_BxS=jnp.asarray(cap) if guarded else None, floor_BxS=jnp.asarray(floor) if guarded else None,
                       owed_BxS=jnp.asarray(owed) if guarded else None,
                       end_B=jnp.asarray(end, jnp.int32) if guarded else None,
                       register_BxS=jnp.asarray(register) if registered else None,
                       register_edges_E=jnp.asarray(edges) if registered else None,
                       mode_BxS=jnp.asarray(mode) if moded else None,
                       pitch_class_P=jnp.asarray(pitch_class_P, jnp.int32) if moded else None,
                       scale_B=jnp.asarray(scale_B) if scaled else None,
                       loudness_BxS=jnp.asarray(loudness) if loud else None,
                       velocity_level_V=jnp.asarray(velocity_level_V) if loud else None,
                       polyphony_BxS=jnp.asarray(poly) if polyphonic else None,
                       polyphony_edges_E=jnp.asarray(vocab.controls["edges"]["polyphony"], jnp.float32)
                       if polyphonic else None)


def steered_rows(vocab: Vocabulary, prompts, timelines) -> list[bool]:
    """Which prompts have a style and ask for controls (`timelines`: one, or one per prompt): the
    rows a steered guidance acts on (`steered_twins`)."""
    if timelines is None:
        return [False] * len(prompts)
    if isinstance(timelines, Timeline):
        timelines = [timelines] * len(prompts)
    return [int(q[0]) != vocab.unknown_style_id and not t.empty for q, t in zip(prompts, timelines)]


def contrast_styles(vocab: Vocabulary, prompts, timelines, segments: int) -> list[int] | None:
    """Per prompt, the STYLE id of its contrast style: of the model's other styles, the one whose
    training segments have the levels the prompt's timeline asks for most often (the product over
    its segments and asked controls of that style's share of training segments at the level, each
    count plus one: `data_prep.controls.fit`'s 'by_style'). It is the style the controls alone
    would suggest, if not the prompt's own: a British/Irish tune asked for a German tune's steady
    single line contrasts with German. STYLE:unknown for prompts without a style or a timeline.
    None when the vocabulary has no per-style counts (a model trained before them)."""
    counts = (vocab.controls or {}).get("by_style")
    if not counts:
        return None
    if isinstance(timelines, Timeline):
        timelines = [timelines] * len(prompts)
    log_share = {}  # style id -> per control, the log share of each level 0..K (count + 1)
    for style, by_control in counts.items():
        sid = vocab.style_id(style)
        if sid != vocab.unknown_style_id:
            log_share[sid] = [np.log((np.asarray(by_control[name], np.float64) + 1)
                                     / (np.sum(by_control[name]) + len(by_control[name])))
                              for name in controls_lib.ATTRIBUTES]
    out = []
    for prompt, t in zip(prompts, timelines):
        own = int(prompt[0])
        others = [sid for sid in log_share if sid != own]
        if own == vocab.unknown_style_id or t is None or t.empty or not others:
            out.append(vocab.unknown_style_id)
            continue
        levels_SxA = t.segment_levels(vocab, segments)
        seg_S, attr_S = np.nonzero(levels_SxA)
        score = {sid: sum(float(log_share[sid][a][levels_SxA[k, a]]) for k, a in zip(seg_S, attr_S))
                 for sid in others}
        out.append(max(others, key=lambda sid: (score[sid], -sid)))
    return out


CONTRAST_AUTO = "auto"


def parse_contrast(vocab: Vocabulary, text: str | None) -> dict[int, int] | str | None:
    """--contrast_style: '' (None: off), 'auto' (`contrast_styles`), or 'STYLE:OTHER,...' pairs, each
    style's contrast, as {STYLE id: STYLE id}. ValueError naming the flag and the problem."""
    text = (text or "").strip()
    if not text:
        return None
    if text.lower() == CONTRAST_AUTO:
        return CONTRAST_AUTO
    known = [s for s in vocab.styles if vocab.style_id(s) != vocab.unknown_style_id]
    out = {}
    for pair in text.split(","):
        style, sep, other = (x.strip() for x in pair.partition(":"))
        if not sep or not style or not other:
            raise ValueError(f"--contrast_style: expected 'auto' or STYLE:OTHER pairs separated by commas, got {pair!r}")
        for name in (style, other):
            if vocab.style_name(name) not in known:
                raise ValueError(f"--contrast_style: unknown style {name!r}; this model knows {', '.join(known)}")
        if vocab.style_id(style) == vocab.style_id(other):
            raise ValueError(f"--contrast_style: {style} is contrasted with itself")
        if vocab.style_id(style) in out:
            raise ValueError(f"--contrast_style: {style} is given twice")
        out[vocab.style_id(style)] = vocab.style_id(other)
    return out


def steered_twins(p: ControlPlan, vocab: Vocabulary, prompts, timelines, guidance: float,
                  steered_guidance: float | None, contrast: dict[int, int] | str | None = None) -> ControlPlan:
    """`p` with its rows' guidance under controls (`ControlPlan.styled_B`, `guidance_B`, `twin_style_B`).

    Neither steered_guidance nor contrast: every twin reads neither the style nor the controls, and
    guidance at the job's G pushes towards both together. A float steered_guidance G_s: a row with a
    style that is asked for controls has a twin that reads the controls (its STYLE alone is
    unknown), and is drawn from l_controls + G_s (l_style,controls - l_controls): the guards and the
    conditioning hold the controls, and guidance pulls towards the style within them. With contrast
    (`parse_contrast`: 'auto', each row's `contrast_styles`, or {style: its contrast}) such a row's
    twin reads its contrast style instead of STYLE:unknown, and the
    row is drawn from l_contrast,controls + G (l_style,controls - l_contrast,controls), at G_s or the
    job's G: away from the style those controls would suggest (docs/controls.md measures each).
    A row with no contrast style (a model of one style, or without per-style counts) keeps the
    twin it would have without contrast. Unconditional rows, and rows asked for nothing, keep the
    job's G and a twin that reads neither."""
    if contrast == CONTRAST_AUTO:
        contrast_ids = contrast_styles(vocab, prompts, timelines, p.group_BxSxA.shape[1])
    elif contrast:
        contrast_ids = [contrast.get(int(q[0]), vocab.unknown_style_id) for q in prompts]
    else:
        contrast_ids = None
    n = len(prompts)
    steered_N = np.asarray(steered_rows(vocab, prompts, timelines), bool)
    contrast_N = np.full(n, vocab.unknown_style_id, np.int32) if contrast_ids is None \
        else np.where(steered_N, np.asarray(contrast_ids, np.int32), vocab.unknown_style_id)
    has_contrast_N = contrast_N != vocab.unknown_style_id
    styled_N = steered_N if steered_guidance is not None else has_contrast_N
    if not np.any(styled_N):
        return p
    batch = p.offset_B.shape[0]
    styled_B = np.zeros(batch, bool)
    styled_B[:n] = styled_N
    twin_style_B = np.full(batch, vocab.unknown_style_id, np.int32)
    twin_style_B[:n] = contrast_N
    g_s = guidance if steered_guidance is None else steered_guidance
    guidance_B = np.where(styled_B, g_s, guidance).astype(np.float32)
    return p.replace(styled_B=jnp.asarray(styled_B), guidance_B=jnp.asarray(guidance_B),
                     twin_style_B=jnp.asarray(twin_style_B) if np.any(has_contrast_N) else None)


def notes_in_last_segment(vocab: Vocabulary, prompt) -> tuple[int, int]:
    """The notes a prompt strikes in the segment it ends in, and the sum of their pitch indices (the
    guards' counts to start from)."""
    ids = np.asarray(prompt, np.int64)
    if not len(ids):
        return 0, 0
    step_T = controls_lib.steps_after(vocab, ids)
    seg = controls_lib.segment_steps(vocab)
    struck = (ids >= vocab.note_on_offset) & (ids < vocab.note_off_offset) & (step_T // seg == step_T[-1] // seg)
    return int(np.sum(struck)), int(np.sum(ids[struck] - vocab.note_on_offset))


def pitch_class_time_in_last_segment(vocab: Vocabulary, prompt) -> np.ndarray:
    """float32[12]: how long each pitch class has sounded (steps, a chord's notes each counted) in the
    segment a prompt ends in: the mode guard's histogram to start from."""
    out = np.zeros(12, np.float32)
    ids = np.asarray(prompt, np.int64)
    if not len(ids):
        return out
    seg = controls_lib.segment_steps(vocab)
    step_T = controls_lib.steps_after(vocab, ids)
    start = int(step_T[-1]) // seg * seg
    sounding = np.zeros(12, np.int64)
    at = 0
    for token, after in zip(ids.tolist(), step_T.tolist()):
        if after > at:  # a TIME_SHIFT: what sounds, for the part of it inside the last segment
            out += sounding * max(0, int(after) - max(at, start))
            at = int(after)
        elif vocab.note_on_offset <= token < vocab.note_off_offset:
            sounding[(token - vocab.note_on_offset + vocab.min_pitch) % 12] += 1
        elif vocab.note_off_offset <= token < vocab.time_shift_offset:
            pc = (token - vocab.note_off_offset + vocab.min_pitch) % 12
            sounding[pc] = max(0, sounding[pc] - 1)
    return out


def onsets_in_last_segment(vocab: Vocabulary, prompt) -> tuple[int, int]:
    """The onsets a prompt has in the segment it ends in before its last step, and the sum of the
    notes sounding at each (`data_prep.controls.segment_values`' polyphony): the polyphony guard's
    counts to start from. An onset at the prompt's last step is the sampler's current one."""
    ids = np.asarray(prompt, np.int64)
    if not len(ids):
        return 0, 0
    seg = controls_lib.segment_steps(vocab)
    step_T = controls_lib.steps_after(vocab, ids)
    start = int(step_T[-1]) // seg * seg
    sounding, struck, at, onsets, total = 0, set(), 0, 0, 0
    for token, after in zip(ids.tolist(), step_T.tolist()):
        if after > at:  # time moves on: an onset at the step it leaves is complete (a note released
            if struck and at >= start:  # at the step it was struck is no note, as in decode_notes)
                onsets, total = onsets + 1, total + sounding
            struck, at = set(), int(after)
        elif vocab.note_on_offset <= token < vocab.note_off_offset:
            sounding += 1
            struck.add(token - vocab.note_on_offset)
        elif vocab.note_off_offset <= token < vocab.time_shift_offset:
            sounding = max(0, sounding - 1)
            struck.discard(token - vocab.note_off_offset)
    return onsets, total


def _asked(p: ControlPlan, levels_BxS, steps_B):
    """The level each row's current segment asks for (a row past the plan: its last segment's)."""
    k_B = jnp.minimum(_segment(p, steps_B), levels_BxS.shape[1] - 1)
    return jnp.take_along_axis(levels_BxS, k_B[:, None], axis=1)[:, 0]


def _binned_level(edges_E, value):
    """`data_prep.controls.levels_of`'s level of a value: ties with edges take the middle of the levels they bound."""
    return 1 + (jnp.sum(edges_E < value[..., None], -1) + jnp.sum(edges_E <= value[..., None], -1)) // 2


def _struck_now(open_BxP, onset_BxP, steps_B):
    """BxP: the pitches sounding that were struck at the row's current step."""
    return (open_BxP > 0) & (onset_BxP == steps_B[:, None])


def _keep_sounding(banned_BxV, keep_BxP, tables):
    """banned_BxV with the NOTE_OFFs of the pitches in keep_BxP masked too."""
    return banned_BxV.at[:, tables["note_off_P"]].set(banned_BxV[:, tables["note_off_P"]] | keep_BxP)


def density_banned(p: ControlPlan | None, notes_B, steps_B, tables, num_pitches: int, open_BxP=None,
                   onset_BxP=None):
    """The density guard's mask (BxV bool), or None: NOTE_ON once the row's current segment has its
    most notes; a TIME_SHIFT that would leave the segment while it has fewer than its fewest, and on
    its last step (no shift left) VELOCITY too, so that the row strikes a note rather than restating
    its loudness without end. Then, and once the segment has its most notes, the NOTE_OFF of a note
    struck at the current step too (open_BxP, onset_BxP: RowState's): a note of no length is no note
    (the MIDI drops it), and the segment would measure a note short of what the guard counted.
    EOS while the segment is short, or a later one the row reaches has a floor (`ControlPlan.owed_BxS`),
    before the piece's end: a piece does not end before the notes its timeline asks for."""
    if p is None or p.cap_BxS is None:
        return None
    k_B = _segment(p, steps_B)
    last = p.cap_BxS.shape[1] - 1
    at_B = jnp.minimum(k_B, last)[:, None]
    cap_B = jnp.take_along_axis(p.cap_BxS, at_B, axis=1)[:, 0]
    floor_B = jnp.take_along_axis(p.floor_BxS, at_B, axis=1)[:, 0]
    next_floor_B = jnp.take_along_axis(p.floor_BxS, jnp.minimum(k_B + 1, last)[:, None], axis=1)[:, 0]
    is_on_V = tables["on_pitch_V"] < num_pitches
    left_B = (k_B + 1) * p.segment_steps - (p.offset_B + steps_B)  # steps to the next segment's opening
    shift_V = tables["shift_steps_V"]
    short_B = notes_B < floor_B
    # Leaving a segment short of its notes, or passing over the next one (shifts of 1 s; shorter segments):
    # a shift may land at most in the next segment, where its own notes are then struck.
    leaves_BxV = (short_B[:, None] & (shift_V[None, :] >= left_B[:, None])) | (
        (next_floor_B > 0)[:, None] & (shift_V[None, :] >= (left_B + p.segment_steps)[:, None]))
    forcing_B = short_B & (left_B <= 1)
    banned_BxV = (((notes_B >= cap_B)[:, None] & is_on_V[None, :])
                  | (leaves_BxV & (shift_V > 0)[None, :])
                  | (forcing_B[:, None] & tables["is_velocity_V"][None, :]))
    owed_B = jnp.take_along_axis(p.owed_BxS, at_B, axis=1)[:, 0]  # past the plan: False
    eos_V = jnp.arange(banned_BxV.shape[1]) == tables["eos_id"]
    before_end_B = p.offset_B + steps_B < p.end_B  # at its end (a budget landing on a segment's opening) it may stop
    banned_BxV = banned_BxV | (((short_B | owed_B) & before_end_B)[:, None] & eos_V[None, :])
    if open_BxP is not None:  # striking is forced, or no note may be struck: the last one stays
        fresh_BxP = (forcing_B | (notes_B >= cap_B))[:, None] & _struck_now(open_BxP, onset_BxP, steps_B)
        banned_BxV = _keep_sounding(banned_BxV, fresh_BxP, tables)
    return banned_BxV


def register_banned(p: ControlPlan | None, notes_B, pitch_sum_B, steps_B, banned_BxV, tables):
    """The register guard's mask (BxV bool), or None. In a segment asked for a register level, a
    NOTE_ON may not leave the segment's mean pitch more than one level from it (by
    `data_prep.controls.levels_of`'s rule) and further than it was (a first note: more than one
    level), unless no NOTE_ON the other masks (`banned_BxV`: sounding pitches, a pitch range) leave
    does better. A line may leave the level for a note, but the segment's notes keep coming back.
    (Holding the mean in the level itself from the first note on measured 0.99 exact, but chords
    lost their bass and the style classifier recognised 0.70 of the pieces following real pieces'
    timelines, against 0.94 unsteered; docs/controls.md compares the rules tried.)"""
    if p is None or p.register_BxS is None:
        return None
    asked_B = _asked(p, p.register_BxS, steps_B)
    edges_E = p.register_edges_E

    def level(mean):
        return _binned_level(edges_E, mean)

    num_pitches = tables["note_off_P"].shape[0]
    count_B = notes_B.astype(jnp.float32)
    after_BxP = level((pitch_sum_B[:, None] + jnp.arange(num_pitches)[None, :]) / (count_B[:, None] + 1))
    miss_BxP = jnp.abs(after_BxP - asked_B[:, None])
    before_B = jnp.where(notes_B > 0, jnp.abs(level(pitch_sum_B / jnp.maximum(count_B, 1)) - asked_B), 1)
    # The best NOTE_ON the other masks leave is always allowed, so that the guard never bans them all.
    strikable_BxP = ~banned_BxV[:, tables["note_off_P"] - num_pitches]  # NOTE_ON ids precede NOTE_OFF ids
    best_B = jnp.min(jnp.where(strikable_BxP, miss_BxP, jnp.iinfo(jnp.int32).max), axis=1)
    allowed_B = jnp.maximum(jnp.maximum(before_B, 1), best_B)
    bad_BxP = (asked_B > 0)[:, None] & (miss_BxP > allowed_B[:, None])
    bad_BxP1 = jnp.pad(bad_BxP, ((0, 0), (0, 1)))  # column P: "not a note token"
    return bad_BxP1[:, tables["on_pitch_V"]]


# A NOTE_ON the mode guard weighs counts as sounding for this share of a segment.
MODE_NOTE_SHARE = 8
_KEYS_24x12 = np.asarray(controls_lib._PROFILES_24x12, np.float32)
# The mode guard keeps a piece in its scale once it has struck this many notes (`piece_scale`).
SCALE_KNOWN_NOTES = 8
# The 12 seven-note scales (a major key's, which its relative minor shares), pitch class by pitch class.
_SCALES_12x12 = np.stack([np.isin(np.arange(12), (np.array([0, 2, 4, 5, 7, 9, 11]) + r) % 12)
                          for r in range(12)]).astype(np.float32)


def piece_scale(notes_Bx12):
    """(in_scale_Bx12 bool, known_B bool): the seven-note scale holding most of the notes a row has
    struck (notes_Bx12: NOTE_ONs per pitch class, `count_pitch_classes`), and whether it is known:
    the row has struck SCALE_KNOWN_NOTES and no other scale holds as many (a B-flat triad alone lies
    in three scales; until then every pitch class counts as in scale)."""
    held_Bx12 = notes_Bx12 @ jnp.asarray(_SCALES_12x12).T  # notes inside each scale
    best_B = jnp.argmax(held_Bx12, axis=1)
    top_Bx2 = jax.lax.top_k(held_Bx12, 2)[0]
    known_B = (jnp.sum(notes_Bx12, axis=1) >= SCALE_KNOWN_NOTES) & (top_Bx2[:, 0] > top_Bx2[:, 1])
    return jnp.asarray(_SCALES_12x12)[best_B] > 0, known_B


def pitch_classes_struck(vocab: Vocabulary, prompt) -> np.ndarray:
    """float32[12]: the NOTE_ONs of a prompt per pitch class (the mode guard's scale to start from)."""
    ids = np.asarray(prompt, np.int64)
    on = ids[(ids >= vocab.note_on_offset) & (ids < vocab.note_off_offset)]
    return np.bincount((on - vocab.note_on_offset + vocab.min_pitch) % 12, minlength=12).astype(np.float32)


def count_pitch_classes(p: ControlPlan | None, notes_Bx12, struck_B, pitch_B):
    """RowState.pitch_class_notes_Bx12 after an event: one more for the pitch class of a note it struck."""
    if p is None or p.scale_B is None:
        return notes_Bx12
    pc_B = p.pitch_class_P[jnp.minimum(pitch_B, p.pitch_class_P.shape[0] - 1)]
    return notes_Bx12 + jax.nn.one_hot(pc_B, 12, dtype=jnp.float32) * struck_B[:, None]


def mode_fit(histogram_Nx12):
    """N x 3: how far inside each mode level a pitch-class histogram is, by
    `data_prep.controls.mode_of`'s rule (best key's mode, 'none' below MODE_MIN_CORRELATION):
    positive where that rule reads the level, negative by how much it misses it otherwise."""
    h = histogram_Nx12 - jnp.mean(histogram_Nx12, axis=-1, keepdims=True)
    norm = jnp.linalg.norm(h, axis=-1, keepdims=True)
    r_Nx24 = jnp.where(norm > 0, h / jnp.where(norm > 0, norm, 1), 0) @ jnp.asarray(_KEYS_24x12).T
    major, minor = jnp.max(r_Nx24[..., :12], -1), jnp.max(r_Nx24[..., 12:], -1)
    least = controls_lib.MODE_MIN_CORRELATION
    return jnp.stack([jnp.minimum(major - minor, major - least), jnp.minimum(minor - major, minor - least),
                      least - jnp.maximum(major, minor)], -1)


def mode_banned(p: ControlPlan | None, time_Bx12, steps_B, banned_BxV, tables, notes_Bx12=None):
    """The mode guard's mask (BxV bool), or None. time_Bx12: how long each pitch class has sounded
    in the row's segment (`pitch_class_time`). In a segment asked for a mode, a NOTE_ON whose pitch
    class (weighed as sounding for 1/MODE_NOTE_SHARE of the segment) would leave the histogram
    outside that mode by `data_prep.controls.mode_of`'s rule and further outside than it is now is
    masked, unless no NOTE_ON the other masks (`banned_BxV`) leave does better.

    The scale guard (p.scale_B; notes_Bx12, the row's NOTE_ONs per pitch class): the mode is sought
    inside the piece's scale (`piece_scale`). A note outside it that would leave the segment outside the mode is
    masked while some note inside it may be struck, and the best note is sought among those: a
    segment asked for minor in a major piece turns to the relative minor's notes, not to a
    chromatic minor key's. (Without this, following real pieces' modes segment by segment made
    the pieces markedly more chromatic than real ones: docs/controls.md.)"""
    if p is None or p.mode_BxS is None:
        return None
    asked_B = _asked(p, p.mode_BxS, steps_B)
    weight = p.segment_steps.astype(jnp.float32) / MODE_NOTE_SHARE
    pick_Bx1 = jnp.maximum(asked_B - 1, 0)[:, None]
    before_B = jnp.take_along_axis(mode_fit(time_Bx12), pick_Bx1, axis=1)[:, 0]
    after_Bx12 = jnp.take_along_axis(mode_fit(time_Bx12[:, None, :] + weight * jnp.eye(12)[None]),
                                     pick_Bx1[:, :, None], axis=2)[..., 0]
    num_pitches = tables["note_off_P"].shape[0]
    after_BxP = after_Bx12[:, p.pitch_class_P]
    strikable_BxP = ~banned_BxV[:, tables["note_off_P"] - num_pitches]  # NOTE_ON ids precede NOTE_OFF ids
    outside_BxP = jnp.zeros_like(strikable_BxP)
    if p.scale_B is not None:
        in_scale_Bx12, known_B = piece_scale(notes_Bx12)
        outside_BxP = (p.scale_B & known_B)[:, None] & ~in_scale_Bx12[:, p.pitch_class_P]
        inside_left_B = jnp.any(strikable_BxP & ~outside_BxP, axis=1)
        outside_BxP = outside_BxP & inside_left_B[:, None]  # no note in scale left: the scale is not held
    best_B = jnp.max(jnp.where(strikable_BxP & ~outside_BxP, after_BxP, -jnp.inf), axis=1)
    bad_BxP = ((asked_B > 0)[:, None] & (after_BxP < 0)
               & (outside_BxP | ((after_BxP < before_B[:, None]) & (after_BxP < best_B[:, None]))))
    bad_BxP1 = jnp.pad(bad_BxP, ((0, 0), (0, 1)))  # column P: "not a note token"
    return bad_BxP1[:, tables["on_pitch_V"]]


def pitch_class_time(p: ControlPlan | None, time_Bx12, open_BxP, steps_B, new_steps_B):
    """RowState.segment_pitch_time_Bx12 after an event: what sounded (open_BxP, before it) for the
    steps it moved the clock, counted from the segment's opening when it carried the clock into a
    new one (a chord's notes each counted, as `data_prep.controls.segment_values` weighs them)."""
    if p is None or p.mode_BxS is None:
        return time_Bx12
    crossed_B = _segment(p, new_steps_B) > _segment(p, steps_B)
    opened_B = _segment(p, new_steps_B) * p.segment_steps - p.offset_B  # the new segment's opening, on the row's clock
    since_B = jnp.where(crossed_B, new_steps_B - opened_B, new_steps_B - steps_B).astype(jnp.float32)
    sounding_Bx12 = open_BxP.astype(jnp.float32) @ jax.nn.one_hot(p.pitch_class_P, 12, dtype=jnp.float32)
    return jnp.where(crossed_B[:, None], 0.0, time_Bx12) + sounding_Bx12 * since_B[:, None]


def loudness_banned(p: ControlPlan | None, steps_B, banned_BxV):
    """The loudness guard's mask (BxV bool), or None. Loudness is a segment's mean velocity. In a
    segment asked for a loudness level, a VELOCITY whose velocity lies more than one level from it is
    masked, unless the other masks (`banned_BxV`: a velocity range) leave no VELOCITY within one level.
    The velocity in force when the segment opens is the model's to change: the guard only keeps it
    from changing to a loudness nobody asked for."""
    if p is None or p.loudness_BxS is None:
        return None
    asked_B = _asked(p, p.loudness_BxS, steps_B)
    far_BxV = (p.velocity_level_V > 0)[None, :] & (jnp.abs(p.velocity_level_V[None, :] - asked_B[:, None]) > 1)
    near_left_B = jnp.any((p.velocity_level_V > 0)[None, :] & ~far_BxV & ~banned_BxV, axis=1)
    return (asked_B > 0)[:, None] & near_left_B[:, None] & far_BxV


def polyphony_banned(p: ControlPlan | None, onsets_B, polyphony_sum_B, open_BxP, onset_BxP, steps_B, banned_BxV,
                     tables):
    """The polyphony guard's mask (BxV bool), or None. onsets_B / polyphony_sum_B: the onsets the
    row's segment has had before the current step, and the notes sounding at each
    (`count_onsets`). Polyphony is the mean, over a segment's onsets, of the notes sounding there
    (`data_prep.controls.segment_values`). In a segment asked for a polyphony level: a NOTE_ON is
    masked when the onset it makes (or adds to) would take that mean more than one level above the
    asked one and further than it is, unless no TIME_SHIFT is left either (the density guard, short
    of its notes on a segment's last step: the note is struck); a TIME_SHIFT (and VELOCITY) when the
    onset at the current step is too thin to close by that rule, while some NOTE_ON may still be
    struck, so that the chord grows. A line or a chord may stray; the segment's onsets keep coming
    back."""
    if p is None or p.polyphony_BxS is None:
        return None
    asked_B = _asked(p, p.polyphony_BxS, steps_B)
    edges_E = p.polyphony_edges_E
    n_B, total_B = onsets_B.astype(jnp.float32), polyphony_sum_B.astype(jnp.float32)
    sounding_B = jnp.sum(open_BxP, axis=1).astype(jnp.float32)
    struck_BxP = _struck_now(open_BxP, onset_BxP, steps_B)
    here_B = jnp.any(struck_BxP, axis=1)  # an onset at the current step

    def miss(value_B):
        return jnp.abs(_binned_level(edges_E, value_B) - asked_B)

    closed_B = jnp.where(n_B > 0, miss(total_B / jnp.maximum(n_B, 1)), 1)  # the onsets before this step
    now_B = jnp.where(here_B, miss((total_B + sounding_B) / (n_B + 1)), closed_B)
    struck_B = (total_B + sounding_B + 1) / (n_B + 1)  # a chord grows one note at a time: only too thick is masked
    moving_V = tables["shift_steps_V"] > 0
    shift_left_B = jnp.any(~banned_BxV & moving_V[None, :], axis=1)
    no_on_B = ((asked_B > 0) & (miss(struck_B) > jnp.maximum(now_B, 1))
               & (_binned_level(edges_E, struck_B) > asked_B) & shift_left_B)
    num_pitches = open_BxP.shape[1]
    is_on_V = tables["on_pitch_V"] < num_pitches
    strikable_B = jnp.any(~banned_BxV & is_on_V[None, :], axis=1) & ~no_on_B
    thin_B = _binned_level(edges_E, (total_B + sounding_B) / (n_B + 1)) < asked_B
    hold_B = (asked_B > 0) & here_B & thin_B & (now_B > jnp.maximum(closed_B, 1)) & strikable_B
    shift_or_velocity_V = moving_V | tables["is_velocity_V"]
    banned_BxV = (no_on_B[:, None] & is_on_V[None, :]) | (hold_B[:, None] & shift_or_velocity_V[None, :])
    # With no note to add, the note struck at this step is not released at it either (a note of no
    # length is no note: decode_notes drops it); time moves on, or an older note ends.
    return _keep_sounding(banned_BxV, no_on_B[:, None] & struck_BxP, tables)


def count_onsets(p: ControlPlan | None, onsets_B, polyphony_sum_B, open_BxP, onset_BxP, steps_B, new_steps_B):
    """(RowState.segment_onsets_B, segment_polyphony_sum_B) after an event: a TIME_SHIFT completes the
    onset at the step it leaves (the notes sounding then counted), in the segment that step is in;
    counts restart when it carries the clock into a new segment."""
    if p is None or p.polyphony_BxS is None:
        return onsets_B, polyphony_sum_B
    moved_B = new_steps_B > steps_B
    close_B = moved_B & jnp.any(_struck_now(open_BxP, onset_BxP, steps_B), axis=1)
    onsets_B = onsets_B + close_B
    polyphony_sum_B = polyphony_sum_B + jnp.where(close_B, jnp.sum(open_BxP, axis=1), 0)
    crossed_B = _segment(p, new_steps_B) > _segment(p, steps_B)
    return jnp.where(crossed_B, 0, onsets_B), jnp.where(crossed_B, 0, polyphony_sum_B)


def sum_pitches(p: ControlPlan | None, sum_B, steps_B, new_steps_B, struck_B, pitch_B):
    """RowState.segment_pitch_sum_B after an event: reset when it carried the clock into a new
    segment, plus the pitch index of a note it struck."""
    if p is None or p.register_BxS is None:
        return sum_B
    crossed_B = _segment(p, new_steps_B) > _segment(p, steps_B)
    return jnp.where(crossed_B, 0, sum_B + jnp.where(struck_B, pitch_B, 0))


def count_notes(p: ControlPlan | None, notes_B, steps_B, new_steps_B, struck_B):
    """RowState.segment_notes_B after an event: reset when it carried the clock into a new segment,
    one more when it struck a note."""
    if p is None or p.cap_BxS is None:
        return notes_B
    crossed_B = _segment(p, new_steps_B) > _segment(p, steps_B)
    return jnp.where(crossed_B, 0, notes_B + struck_B.astype(jnp.int32))


def _segment(p: ControlPlan, steps_B):
    return (p.offset_B + steps_B) // p.segment_steps


def forced(p: ControlPlan | None, steps_B, next_B):
    """(forced_B, token_B): whether each row must write a control token now, and which.
    next_B: the index of the next one in its segment's group (RowState.control_B)."""
    if p is None:
        return None, None
    k_B = jnp.minimum(_segment(p, steps_B), p.group_BxSxA.shape[1] - 1)  # past the plan: its last segment's
    group_BxA = jnp.take_along_axis(p.group_BxSxA, k_B[:, None, None], axis=1)[:, 0]
    a = group_BxA.shape[1]
    token_B = jnp.take_along_axis(group_BxA, jnp.minimum(next_B, a - 1)[:, None], axis=1)[:, 0]
    forced_B = (next_B < a) & (token_B >= 0)
    return forced_B, token_B


def advance(p: ControlPlan | None, next_B, steps_B, new_steps_B, emit_B, forced_B):
    """RowState.control_B after an event: the next token of the group, or 0 (the new segment's first)
    when the event carried the clock into a new segment."""
    if p is None:
        return next_B
    crossed_B = emit_B & (_segment(p, new_steps_B) > _segment(p, steps_B))
    return jnp.where(crossed_B, 0, jnp.where(emit_B & forced_B, next_B + 1, next_B))
