"""Fill-in-the-middle (FIM) on performance events: the row layout, shared by training and sampling.

A piece's events are cut at two time boundaries i < j into prefix body[:i], middle
body[i:j] and suffix body[j:], and rearranged as code models do (Bavarian et al. 2022,
"PSM" order):

    STYLE FIM_PREFIX  carried(start) prefix
          FIM_SUFFIX  gap  carried(j) suffix
          FIM_MIDDLE  carried(i) middle  FIM_END

- `carried(k)` is `Vocabulary.carried_state`: the one rule for what a window opening
  mid-piece states (the VELOCITY in force, a NOTE_ON per sounding note). The suffix opens
  with the state at its cut, exactly as a crop does, so its NOTE_OFFs close notes it has
  seen begin, and those carried NOTE_ONs are what the middle must leave sounding at its end.
- The middle opens with the state carried at its own cut i, as any window opening mid-piece
  does: what sounds when it begins is then in front of the model, not behind the whole
  suffix. (Without it the demo model wrote middles as if nothing sounded: 30 notes per
  middle were left for the sampler to release at E, and the middle's NLL was worse with the
  suffix than without it.)
- `gap` is the middle's duration as TIME_SHIFT tokens. Music, unlike code, has a clock: the
  model is told how much time the middle must fill (the sampler enforces it regardless).
- Cuts are event boundaries right after a TIME_SHIFT, i.e. at a time step, because that
  is what a cut at a time S (in seconds) gives at sampling time: all events before S in the
  prefix, the middle starting at S and ending when its clock reaches E.

The middle is the prefix's continuation (its sounding state is the prefix's), written
after the suffix so that the model has read both when it writes it.

Loss (data.py's `loss` flag): prefix, suffix and middle events and FIM_END are targets, as
in a plain crop; the markers FIM_PREFIX/FIM_SUFFIX/FIM_MIDDLE, the gap and the carried states
of the suffix and the middle are given (the sampler always writes them: predicting where a random cut falls,
or chords struck before a suffix begins, would teach nothing the sampler uses).

Sampling (`Gap`, `prompt`, `join`): a file's events are cut at S and E seconds; notes
sounding at S stay sounding into the middle; notes sounding at E are the suffix's stated
state; a note sounding through the whole gap is held (the sampler may not release it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from data_prep.vocab import Vocabulary


def _shift_steps(vocab: Vocabulary, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    is_shift = (ids >= vocab.time_shift_offset) & (ids < vocab.velocity_offset)
    return np.where(is_shift, ids - vocab.time_shift_offset + 1, 0)


def time_cuts(vocab: Vocabulary, body: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Indices k in [lo, hi] with body[k - 1] a TIME_SHIFT: event boundaries at a time step."""
    k = np.arange(max(lo, 1), hi + 1)
    k = k[k <= len(body)]
    return k[_shift_steps(vocab, np.asarray(body)[k - 1]) > 0]


def gap_tokens(vocab: Vocabulary, steps: int) -> list[int]:
    """`steps` time steps as TIME_SHIFT tokens (full shifts, then the remainder, as encode_notes writes them)."""
    m = vocab.max_shift_steps
    full, rest = divmod(int(steps), m)
    return [vocab.time_shift_offset + m - 1] * full + ([vocab.time_shift_offset + rest - 1] if rest else [])


def training_row(vocab: Vocabulary, style: int, body: np.ndarray, start: int, end: int, i: int, j: int,
                 carried: Callable[[np.ndarray, int], list[int]], seq_len: int,
                 predict_carried: bool = True) -> dict | None:
    """The FIM row of the crop body[start:end] cut at i < j: {'tokens', 'loss'}, at most seq_len + 1 tokens.

    The suffix is shortened at its end to make room for the markers, the gap and its carried
    state; None when nothing of it would be left (the caller then keeps the plain crop).
    """
    if not start <= i < j < end:
        raise ValueError(f"FIM cuts must satisfy start <= i < j < end, got {start}, {i}, {j}, {end}")
    c_start, c_i, c_j = carried(body, start), carried(body, i), carried(body, j)
    gap = gap_tokens(vocab, int(_shift_steps(vocab, body[i:j]).sum()))
    fixed = 4 + len(c_start) + (i - start) + len(gap) + len(c_j) + len(c_i) + (j - i) + 1  # all but the suffix's events
    room = seq_len + 1 - fixed
    if room < 1:
        return None
    suffix = body[j:min(end, j + room)]
    lead = [1] if predict_carried and c_start and vocab.is_velocity(c_start[0]) else [0]
    parts = [  # (tokens, loss flag per token)
        ([style, vocab.fim_prefix_id], [0, 0]),
        (c_start, lead + [0] * (len(c_start) - 1)),
        (body[start:i], 1),
        ([vocab.fim_suffix_id], 0),
        (gap, 0),
        (c_j, 0),
        (suffix, 1),
        ([vocab.fim_middle_id], 0),
        (c_i, 0),
        (body[i:j], 1),
        ([vocab.fim_end_id], 1),
    ]
    tokens = np.concatenate([np.asarray(t, np.int32).reshape(-1) for t, _ in parts])
    loss = np.concatenate([np.broadcast_to(np.asarray(w, np.int32), (len(t),)) for t, w in parts]).astype(np.int32)
    return {"tokens": tokens, "loss": loss}


def join(vocab: Vocabulary, row: np.ndarray) -> np.ndarray:
    """A FIM row -> the plain row it rearranges: STYLE, carried(start), prefix, middle, suffix.

    The carried states of the middle and the suffix are recognised by the rule that made
    them (`carried_state` of what precedes them), so nothing but the row itself is needed.
    """
    row = np.asarray(row, np.int32)
    at = {t: np.flatnonzero(row == t) for t in (vocab.fim_prefix_id, vocab.fim_suffix_id, vocab.fim_middle_id,
                                               vocab.fim_end_id)}
    if any(len(v) != 1 for v in at.values()) or at[vocab.fim_prefix_id][0] != 1:
        raise ValueError("not a FIM row: each marker must occur once, FIM_PREFIX right after the STYLE token")
    suf, mid, end = at[vocab.fim_suffix_id][0], at[vocab.fim_middle_id][0], at[vocab.fim_end_id][0]
    head = row[2:suf]
    middle = _after_state(vocab, head, row[mid + 1:end], "middle")
    rest = row[suf + 1:mid]
    gap = gap_tokens(vocab, int(_shift_steps(vocab, middle).sum()))
    if list(rest[:len(gap)]) != gap:
        raise ValueError("FIM row: the suffix does not open with the middle's duration")
    stream = np.concatenate([head, middle])
    suffix = _after_state(vocab, stream, rest[len(gap):], "suffix")
    return np.concatenate([row[:1], stream, suffix]).astype(np.int32)


def _after_state(vocab: Vocabulary, stream: np.ndarray, rest: np.ndarray, part: str) -> np.ndarray:
    """`rest` without the state carried at the end of `stream` that opens it."""
    # carried_state looks at the token after the cut (a VELOCITY there changes what is carried).
    # Tried with a plain token first: with nothing sounding the VELOCITY-led reading could
    # otherwise mistake the carried VELOCITY for the part's own first event.
    for probe in (vocab.eos_id, vocab.velocity_offset):
        state = vocab.carried_state(np.concatenate([stream, [probe]]), len(stream))
        follows_velocity = len(rest) > len(state) and bool(vocab.is_velocity(rest[len(state)]))
        if list(rest[:len(state)]) == state and follows_velocity == (probe == vocab.velocity_offset):
            return rest[len(state):]
    raise ValueError(f"FIM row: the {part} does not open with the state carried at its cut")


# ----------------------------------------------------------------------------- sampling


def cut_at_step(vocab: Vocabulary, ids: np.ndarray, step: int) -> tuple[np.ndarray, int]:
    """(ids', k): ids with the TIME_SHIFT that spans `step` split in two, and the index k of the
    first token at time >= step, so that ids'[:k] holds every event before `step` and exactly
    `step` steps of time."""
    ids = np.asarray(ids, np.int32)
    shift = _shift_steps(vocab, ids)
    before = np.cumsum(shift) - shift  # time at which each token happens (a shift: where it starts)
    k = int(np.searchsorted(before, step, side="left"))  # before is non-decreasing
    if k > 0 and before[k - 1] + shift[k - 1] > step:  # the shift at k - 1 passes step: split it
        first = step - int(before[k - 1])
        head = gap_tokens(vocab, first)
        tail = gap_tokens(vocab, int(shift[k - 1]) - first)
        ids = np.concatenate([ids[:k - 1], head, tail, ids[k:]]).astype(np.int32)
        k = k - 1 + len(head)
    return ids, k


@dataclasses.dataclass(frozen=True)
class Gap:
    """A piece cut for infilling at steps [start_step, end_step) (10 ms steps by default).

    prefix: events before S (notes ending at S ended); suffix: events from E on; middle: the
    original events in between (for scoring). suffix_state: `carried_state` at E.
    target_P: notes per pitch sounding at E (the middle must leave exactly these sounding);
    hold_P: notes per pitch sounding through the whole gap, which the middle may not release.
    velocity_at_end: the VELOCITY id in force at E in the original, or None.
    """

    prefix: np.ndarray
    middle: np.ndarray
    suffix: np.ndarray
    suffix_state: list
    target_P: np.ndarray
    hold_P: np.ndarray
    target_velocity_P: np.ndarray
    velocity_at_end: int | None
    steps: int

    @classmethod
    def cut(cls, vocab: Vocabulary, ids: np.ndarray, start_step: int, end_step: int) -> "Gap":
        if not 0 <= start_step < end_step:
            raise ValueError(f"a gap needs 0 <= start < end, got steps {start_step}, {end_step}")
        ids, i = cut_at_step(vocab, ids, start_step)
        # NOTE_OFFs at S end notes that lie wholly before the gap: they stay in the prefix
        # (at a time step encode_notes writes the NOTE_OFFs before the onsets).
        while i < len(ids) and vocab.note_off_offset <= ids[i] < vocab.time_shift_offset:
            i += 1
        ids, j = cut_at_step(vocab, ids, end_step)
        num_pitches = vocab.max_pitch - vocab.min_pitch + 1
        at_s, at_e = vocab.sounding_at(ids, i), vocab.sounding_at(ids, j)
        target_P = np.zeros(num_pitches, np.int32)
        target_P[at_e.pitch - vocab.min_pitch] = at_e.count
        velocity_P = np.full(num_pitches, vocab.velocity_offset + int(vocab.velocity_to_bin(64)) - 1, np.int32)
        velocity_P[at_e.pitch - vocab.min_pitch] = at_e.velocity
        # Held through the gap: sounding at S and at E as the same note, i.e. not closed in between.
        off_in_gap_P = np.bincount(ids[i:j][(ids[i:j] >= vocab.note_off_offset) & (ids[i:j] < vocab.time_shift_offset)]
                                   - vocab.note_off_offset, minlength=num_pitches)
        sounding_s_P = np.zeros(num_pitches, np.int32)
        sounding_s_P[at_s.pitch - vocab.min_pitch] = at_s.count
        hold_P = np.minimum(np.maximum(sounding_s_P - off_in_gap_P, 0), target_P).astype(np.int32)
        return cls(prefix=ids[:i], middle=ids[i:j], suffix=ids[j:], suffix_state=vocab.carried_state(ids, j),
                   target_P=target_P, hold_P=hold_P, target_velocity_P=velocity_P,
                   velocity_at_end=vocab.velocity_at(ids, j), steps=int(end_step - start_step))


def prompt(vocab: Vocabulary, style: int, before: np.ndarray, gap: Gap, steps_left: int, budget: int) -> list[int]:
    """The FIM prompt, at most `budget` tokens: STYLE FIM_PREFIX, the state carried into the latest
    events of `before` (the prefix plus the middle so far), FIM_SUFFIX, the time left, the suffix's
    state and its first events (EOS when the whole suffix fits), FIM_MIDDLE and the state carried
    at the end of `before`, where the middle goes on.

    Half the room goes to each side; a side that needs less leaves the rest to the other.
    The prefix side is cut as the sampler's windows are (`carried_state` with a limit).
    """
    before = np.asarray(before, np.int32)
    gap_ids = gap_tokens(vocab, steps_left)
    now = vocab.carried_state(before, len(before), limit=budget // 8)  # what sounds where the middle goes on
    room = budget - 4 - len(gap_ids) - len(now)  # STYLE FIM_PREFIX FIM_SUFFIX ... FIM_MIDDLE
    if room < 8:
        raise ValueError(f"a FIM prompt of {budget} tokens leaves no room for the music around the gap")
    suffix = list(gap.suffix) + [vocab.eos_id]
    state = gap.suffix_state if len(gap.suffix_state) <= room // 4 else []  # a pathological chord is dropped
    want_prefix, want_suffix = len(before), len(state) + len(suffix)
    if want_prefix + want_suffix <= room:
        prefix_room, suffix_room = want_prefix, want_suffix
    elif want_suffix <= room // 2:
        prefix_room, suffix_room = room - want_suffix, want_suffix
    elif want_prefix <= room // 2:
        prefix_room, suffix_room = want_prefix, room - want_prefix
    else:
        prefix_room, suffix_room = room // 2, room - room // 2
    head = _tail_with_state(vocab, before, prefix_room)
    tail = state + suffix[:max(0, suffix_room - len(state))]
    return [style, vocab.fim_prefix_id, *head, vocab.fim_suffix_id, *gap_ids, *tail, vocab.fim_middle_id, *now]


def _tail_with_state(vocab: Vocabulary, ids: np.ndarray, room: int) -> list[int]:
    """The latest events of ids with the state carried at their start, at most `room` tokens."""
    if len(ids) <= room:
        return [int(t) for t in ids]
    start = len(ids) - room
    while True:  # the carried state's length depends on the start; the start only moves later
        carried = vocab.carried_state(ids, start, limit=room // 2)
        need = len(ids) - room + len(carried)
        if need <= start:
            return [*carried, *(int(t) for t in ids[start:])]
        start = need


def close(vocab: Vocabulary, gap: Gap, events: np.ndarray) -> tuple[list[int], dict]:
    """The events that take a sampled middle to E in the state the suffix states, and what they did.

    `events` is the prefix plus the sampled middle. Returns (tail, counts): TIME_SHIFTs to E if
    the middle stopped short of it (its event budget ran out), a NOTE_OFF for each note sounding
    at E that the suffix does not state (it would dangle across E: nothing would close it),
    a NOTE_ON (with its VELOCITY) for each stated note not sounding, and the VELOCITY in force
    at E, so that the suffix's notes keep their loudness. counts: short_steps, released, struck.
    """
    middle_steps = int(_shift_steps(vocab, events[len(gap.prefix):]).sum())
    tail = gap_tokens(vocab, max(0, gap.steps - middle_steps))
    stream = np.concatenate([np.asarray(events, np.int32), np.asarray(tail, np.int32)])
    now = vocab.sounding_at(stream, len(stream))
    open_P = np.zeros_like(gap.target_P)
    open_P[now.pitch - vocab.min_pitch] = now.count
    released = struck = 0
    for p in np.flatnonzero(open_P > gap.target_P):
        k = int(open_P[p] - gap.target_P[p])
        tail += [vocab.note_off_offset + int(p)] * k
        released += k
    velocity = vocab.velocity_at(stream, len(stream))
    for p in np.flatnonzero(gap.target_P > open_P):
        k = int(gap.target_P[p] - open_P[p])
        if int(gap.target_velocity_P[p]) != velocity:
            velocity = int(gap.target_velocity_P[p])
            tail.append(velocity)
        tail += [vocab.note_on_offset + int(p)] * k
        struck += k
    if gap.velocity_at_end is not None and velocity != gap.velocity_at_end:
        tail.append(gap.velocity_at_end)
    return tail, {"short_steps": max(0, gap.steps - middle_steps), "released": released, "struck": struck}


def across(vocab: Vocabulary, ids: np.ndarray, step: int) -> np.ndarray:
    """Notes per pitch index of the decoded piece `ids` that sound from time `step` on: begun at or
    before it and ending after it (start <= step < end; a note ending exactly there has ended)."""
    notes = vocab.decode_notes(ids)
    sps = vocab.steps_per_second
    start = np.round(notes.start_s * sps).astype(np.int64)
    end = np.round(notes.end_s * sps).astype(np.int64)
    crossing = (start <= step) & (end > step)
    return np.bincount(notes.pitch[crossing] - vocab.min_pitch,
                       minlength=vocab.max_pitch - vocab.min_pitch + 1).astype(np.int64)


def dangling(vocab: Vocabulary, original: np.ndarray, joined: np.ndarray, end_step: int) -> tuple[int, int]:
    """(dangling, missing) at E of a joined piece against its original, as decoded notes.

    A note dangles across E when the joined piece has it sounding at E (begun at or before E,
    ending after it) beyond the notes of that pitch the original has sounding there: a note
    begun (or kept) in the middle that the suffix never closes, so it drones on into the
    suffix. A note is missing when the original sounds at E and the joined piece does not.
    Both are 0 for a join that keeps the suffix's stated state.
    """
    have_P, want_P = across(vocab, joined, end_step), across(vocab, original, end_step)
    return int(np.maximum(have_P - want_P, 0).sum()), int(np.maximum(want_P - have_P, 0).sum())


def kept_outside(original, joined, start_s: float, end_s: float, tol_s: float = 0.0105) -> list[int]:
    """Indices of the original notes (data_prep.notes.Notes, seconds) that the joined piece does
    not keep, to within tol_s (one 10 ms step plus rounding):

    - a note begun before S keeps its onset; one that ends by S, or sounds through the whole
      gap, keeps its end as well; one that ends inside the gap may end anywhere in it;
    - a note begun at or after E keeps its onset and end;
    - a note begun inside the gap that sounds past E keeps its end, sounding from E at the latest.
    Notes wholly inside the gap are the middle's to replace.
    """
    eps = 1e-6  # classification is exact on the grid; matching allows tol_s
    out = []
    jp, js, je = np.asarray(joined.pitch), np.asarray(joined.start_s), np.asarray(joined.end_s)
    for k, (p, s, e) in enumerate(zip(np.asarray(original.pitch), np.asarray(original.start_s),
                                      np.asarray(original.end_s))):
        same = jp == p
        if s < start_s - eps:
            ok = same & (np.abs(js - s) <= tol_s)
            if e <= start_s + eps or e >= end_s - eps:
                ok &= np.abs(je - e) <= tol_s
            else:
                ok &= je >= start_s - tol_s
        elif s >= end_s - eps:
            ok = same & (np.abs(js - s) <= tol_s) & (np.abs(je - e) <= tol_s)
        elif e > end_s + eps:
            ok = same & (js <= end_s + tol_s) & (np.abs(je - e) <= tol_s)
        else:
            continue
        if not ok.any():
            out.append(k)
    return out
