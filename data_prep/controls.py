"""Control attributes of music, computed from its notes: the one rule every stage uses.

A piece is cut into segments of `seconds` (a run's config.data.control_seconds) from its start:
segment k is [k * seconds, (k + 1) * seconds). Of each segment (`segment_values`):
- density: notes struck per second (notes struck in the segment / seconds; a chord's notes each count);
- polyphony: the mean, over the distinct onset times in the segment, of the notes sounding there
  (start <= t < end; notes struck before the segment count);
- register: the mean pitch of the notes struck in it;
- loudness: their mean velocity (MIDI 1..127);
- mode: major, minor or none: the duration-weighted pitch-class histogram of what sounds in the
  segment is correlated with the 24 rotations of the Krumhansl-Kessler major and minor profiles;
  the best key's mode, or none when its correlation is below MODE_MIN_CORRELATION or nothing sounds.
The first four become levels 1..K at quantile edges fitted on the training split's segments
(`fit`); a segment with no note struck has no register or loudness level (no token).

The data pipeline (mgpt/train/data.py) writes the levels as tokens (`CONTROL:density=3`,
`CONTROL:mode=minor`; data_prep.vocab) at the start of a piece and right after the TIME_SHIFT
that carries it into each next segment (`insert`); a crop, an evaluation segment or a sampler
window that opens mid-segment carries that segment's tokens after STYLE (`in_force`, through
`Vocabulary.carried_state`). The sampler forces the same tokens at the same places
(mgpt/sample/controls.py), and the evaluation measures generated MIDI with `segment_levels`.
Everything here reads `Notes` or event ids; it imports nothing of mgpt's, so that data prep,
training, sampling and evaluation all call this one module.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from data_prep.notes import Notes

BINNED = ("density", "polyphony", "register", "loudness")
ATTRIBUTES = BINNED + ("mode",)
MODES = ("major", "minor", "none")  # mode levels 1, 2, 3
DEFAULT_LEVELS = 8
# Krumhansl & Kessler (1982) probe-tone ratings, C major and C minor.
KK_MAJOR_12 = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR_12 = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
# Below this best-key correlation a segment is 'none': chromatic, atonal or too few notes to tell.
MODE_MIN_CORRELATION = 0.6


def _key_profiles_24x12() -> np.ndarray:
    rows = [np.roll(KK_MAJOR_12, k) for k in range(12)] + [np.roll(KK_MINOR_12, k) for k in range(12)]
    p = np.asarray(rows)
    p = p - p.mean(axis=1, keepdims=True)
    return p / np.linalg.norm(p, axis=1, keepdims=True)


_PROFILES_24x12 = _key_profiles_24x12()


def mode_of(histogram_12: np.ndarray) -> int:
    """The mode level (1 major, 2 minor, 3 none) of a pitch-class histogram (any non-negative weights)."""
    h = np.asarray(histogram_12, np.float64)
    h = h - h.mean()
    norm = np.linalg.norm(h)
    if norm == 0:
        return 3
    r_24 = _PROFILES_24x12 @ (h / norm)
    best = int(np.argmax(r_24))
    if r_24[best] < MODE_MIN_CORRELATION:
        return 3
    return 1 if best < 12 else 2


def num_segments(end_s: float, seconds: float) -> int:
    """Segments a piece lasting `end_s` seconds has: the one holding its end included."""
    return int(np.floor(end_s / seconds + 1e-9)) + 1


def segment_values(notes: Notes, seconds: float, count: int | None = None) -> dict[str, np.ndarray]:
    """Per segment (count of them; default: up to the last note's end), float64 arrays: density
    (notes struck/s), polyphony (notes sounding per onset), register (mean pitch; NaN with no onset),
    loudness (mean velocity; NaN with no onset) and mode (level 1..3)."""
    pitch = np.asarray(notes.pitch, np.int64)
    velocity = np.asarray(notes.velocity, np.float64)
    start_s = np.asarray(notes.start_s, np.float64)
    end_s = np.asarray(notes.end_s, np.float64)
    count = num_segments(float(end_s.max()) if len(end_s) else 0.0, seconds) if count is None else count
    # Times are on the 10 ms grid: rounding the segment index keeps a note struck exactly on a
    # boundary in the segment that boundary opens, whatever the float error.
    seg_N = np.floor(np.round(start_s / seconds, 9)).astype(np.int64)
    out = {a: np.zeros(count) for a in ATTRIBUTES}
    out["register"][:] = out["loudness"][:] = np.nan
    onsets = np.unique(start_s)
    sorted_start, sorted_end = np.sort(start_s), np.sort(end_s)
    sounding_T = (np.searchsorted(sorted_start, onsets, side="right")
                  - np.searchsorted(sorted_end, onsets, side="right"))
    onset_seg_T = np.floor(np.round(onsets / seconds, 9)).astype(np.int64)
    for k in range(count):
        struck = seg_N == k
        n = int(struck.sum())
        out["density"][k] = n / seconds
        if n:
            out["register"][k] = pitch[struck].mean()
            out["loudness"][k] = velocity[struck].mean()
        here = onset_seg_T == k
        out["polyphony"][k] = sounding_T[here].mean() if here.any() else 0.0
        t0, t1 = k * seconds, (k + 1) * seconds
        overlap = np.clip(np.minimum(end_s, t1) - np.maximum(start_s, t0), 0, None)
        out["mode"][k] = mode_of(np.bincount(pitch % 12, weights=overlap, minlength=12))
    return out


def levels_of(values: dict[str, np.ndarray], spec: dict) -> np.ndarray:
    """Per segment and attribute (ATTRIBUTES order), the level: 1..K for the binned attributes
    (spec['edges']: K - 1 increasing inner edges each), 1..3 for mode; 0 = none (no note struck)."""
    count = len(values["density"])
    out = np.zeros((count, len(ATTRIBUTES)), np.int64)
    for a, name in enumerate(BINNED):
        v = values[name]
        edges, x = np.asarray(spec["edges"][name], np.float64), np.nan_to_num(v)
        # A value tied with edges (a corpus of one velocity, chords of exactly 4) takes the middle of
        # the levels it ties with: its mid-rank, not the top or the bottom one.
        level = 1 + (np.searchsorted(edges, x, side="left") + np.searchsorted(edges, x, side="right")) // 2
        out[:, a] = np.where(np.isnan(v), 0, level)
    out[:, len(BINNED)] = values["mode"].astype(np.int64)
    return out


def segment_levels(notes: Notes, spec: dict, count: int | None = None) -> np.ndarray:
    """int64[S, len(ATTRIBUTES)]: each segment's control levels (0 = none). The one function
    training, sampling and evaluation use."""
    return levels_of(segment_values(notes, spec["seconds"], count), spec)


def fit(pieces: Iterable[Notes], seconds: float, levels: int = DEFAULT_LEVELS,
        styles: Iterable[str] | None = None) -> dict:
    """The control spec of a training split: segment length, K, per binned attribute the K - 1 inner
    edges at its segments' quantiles 1/K .. (K-1)/K (NaNs left out), and per control the levels its
    segments have ('seen'): where values tie with edges (a corpus of one velocity) some levels never
    occur, and a model cannot have learnt what they mean.

    `styles` (one label per piece, in order): also 'by_style', {label: {control: segment counts of
    each level 0..K (0: none; mode 0..3)}}, how often each style's segments have each level (the
    sampler's contrast style, mgpt/sample/controls.py `contrast_styles`)."""
    if not seconds > 0:
        raise ValueError(f"control seconds must be > 0, got {seconds}")
    if not 2 <= levels <= 32:
        raise ValueError(f"control levels must be in 2..32, got {levels}")
    collected = {a: [] for a in ATTRIBUTES}
    labels = []  # one per segment, with `styles`
    for notes, style in zip(pieces, styles if styles is not None else itertools.repeat(None)):
        if not len(notes.pitch):
            continue
        values = segment_values(notes, seconds)
        for a in ATTRIBUTES:
            collected[a].append(values[a])
        labels += [style] * len(values["mode"])
    edges = {}
    for a in BINNED:
        v = np.concatenate(collected[a]) if collected[a] else np.zeros(0)
        v = v[~np.isnan(v)]
        if not len(v):
            raise ValueError("the training split has no notes to fit control levels on")
        edges[a] = [round(float(x), 6) for x in np.quantile(v, np.arange(1, levels) / levels)]
    spec = {"seconds": float(seconds), "levels": int(levels), "edges": edges}
    level_SxA = levels_of({a: np.concatenate(collected[a]) for a in ATTRIBUTES}, spec)
    spec["seen"] = {a: sorted(int(x) for x in set(level_SxA[:, i].tolist()) - {0}) for i, a in enumerate(ATTRIBUTES)}
    if styles is not None:
        spec["by_style"] = style_counts(level_SxA, labels, levels)
    return spec


def style_counts(level_SxA: np.ndarray, styles_S, levels: int) -> dict:
    """{style: {control: how many of its segments have each level 0..K (mode 0..3)}} of segments'
    levels (`levels_of`) and each segment's style label: a spec's 'by_style' (`fit`)."""
    labels_S = np.asarray(list(styles_S), dtype=object)
    level_SxA = np.asarray(level_SxA, np.int64).reshape(len(labels_S), len(ATTRIBUTES))
    top = {a: len(MODES) if a == "mode" else int(levels) for a in ATTRIBUTES}
    return {str(style): {a: np.bincount(level_SxA[labels_S == style, i], minlength=top[a] + 1).tolist()
                         for i, a in enumerate(ATTRIBUTES)}
            for style in sorted(set(labels_S.tolist()))}


def density_bounds(spec: dict, most: int = 4096) -> tuple[list[int], list[int]]:
    """(floors, caps): floors[k] / caps[k], the fewest / most notes a segment may strike and still
    measure density level k (k = 1..K; index 0 unused), by the same rule as `levels_of`. The top
    level has no cap (`most`). A level no count measures (ties can skip one) gets the nearest count
    below it as both bounds."""
    counts = np.arange(most + 1)
    level_N = levels_of({name: (counts / spec["seconds"] if name == "density" else np.zeros(len(counts)))
                         for name in ATTRIBUTES}, spec)[:, 0]
    levels = int(spec["levels"])
    floors, caps = [0], [0]
    for k in range(1, levels + 1):
        at_least = counts[level_N >= k]
        at_most = counts[level_N <= k]
        caps.append((int(at_most.max()) if len(at_most) else 0) if k < levels else most)
        floors.append(min(int(at_least.min()) if len(at_least) else most, caps[-1]))
    return floors, caps


def steps_after(vocab, ids) -> np.ndarray:
    """The time step reached after each id (cumulative TIME_SHIFT steps)."""
    ids = np.asarray(ids, np.int64)
    shift = (ids >= vocab.time_shift_offset) & (ids < vocab.velocity_offset)
    return np.cumsum(np.where(shift, ids - vocab.time_shift_offset + 1, 0))


def segment_steps(vocab) -> int:
    """The segment length in time steps (at least one)."""
    return max(1, int(round(vocab.controls["seconds"] * vocab.steps_per_second)))


def group(vocab, levels_A: np.ndarray, keep_A: np.ndarray | None = None) -> list[int]:
    """The control tokens of one segment's levels (ATTRIBUTES order); level 0 and dropped ones left out."""
    return [vocab.control_id(name, int(level)) for a, (name, level) in enumerate(zip(ATTRIBUTES, levels_A))
            if level > 0 and (keep_A is None or keep_A[a])]


def insert(vocab, ids: np.ndarray, dropout: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Event ids (no control tokens) -> the same with each segment's control tokens: segment 0's
    first, then segment k's right after the TIME_SHIFT that reaches step k * segment_steps (one
    shift that crosses several boundaries is followed by the last one's). Control dropout: with
    `rng`, each token is left out with probability `dropout`. A trailing EOS moves no time."""
    ids = np.asarray(ids, np.int32)
    step_T = steps_after(vocab, ids)
    seg = segment_steps(vocab)
    count = int(step_T[-1]) // seg + 1 if len(ids) else 1
    notes = vocab.decode_notes(ids)
    levels_SxA = segment_levels(notes, vocab.controls, count)
    keep_SxA = rng.random(levels_SxA.shape) >= dropout if rng is not None and dropout > 0 else None
    seg_T = step_T // seg
    before_T = np.concatenate([[0], seg_T[:-1]])
    crossed = np.flatnonzero(seg_T > before_T)  # ids after which a new segment begins
    keep = (lambda k: None) if keep_SxA is None else (lambda k: keep_SxA[k])
    parts, last = [np.asarray(group(vocab, levels_SxA[0], keep(0)), np.int32)], 0
    for i in crossed:
        k = int(seg_T[i])
        parts += [ids[last:i + 1], np.asarray(group(vocab, levels_SxA[k], keep(k)), np.int32)]
        last = i + 1
    parts.append(ids[last:])
    return np.concatenate(parts).astype(np.int32)


def in_force(vocab, ids: np.ndarray, start: int) -> list[int]:
    """The control tokens in force just before ids[start]: those of ids[:start] written in the
    segment that ids[start] falls in (the group `insert` or the sampler put at its opening)."""
    if start == 0:
        return []
    ids = np.asarray(ids[:start], np.int64)
    step_T = steps_after(vocab, ids)
    seg_T = step_T // segment_steps(vocab)
    here = vocab.is_control(ids) & (seg_T == seg_T[-1])
    return ids[here].astype(int).tolist()
