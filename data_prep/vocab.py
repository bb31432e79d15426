"""The event vocabulary: token ids <-> readable events <-> NoteSequences.

One vocabulary describes a dataset and every model trained on it. It is saved as
`vocab.json` (a list where index = token id) beside the dataset and each checkpoint,
and every stage reads it from there.

Layout (ids are positions in `tokens`):

    PAD, EOS,
    NOTE_ON:{min_pitch..max_pitch}, NOTE_OFF:{min_pitch..max_pitch},
    TIME_SHIFT:{1..max_shift_steps}      (value in 10 ms steps by default),
    VELOCITY:{1..num_velocity_bins}      (value is the bin),
    STYLE:unknown, STYLE:{label}...      (conditioning tokens, sorted)
    FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_END   (only in a vocabulary made `with_fim()`)
    CONTROL:density=1..K, CONTROL:polyphony=1..K, CONTROL:register=1..K, CONTROL:loudness=1..K,
    CONTROL:mode=major|minor|none                 (only in a vocabulary made `with_controls()`)

The performance events follow note-seq's `performance_lib.Performance` exactly
(same quantisation, event order and velocity binning); tests check the two agree.
Conditioning tokens come after the events so that event ids do not move when labels
change. The fill-in-the-middle markers (mgpt/sample/fim.py) are appended after everything, so
a model trained with them reads every other id as an older model does, and a vocab.json
written before they existed still loads (without them). The control tokens
(data_prep/controls.py) are appended after those in the same way, and their spec (segment
seconds, K, the quantile edges) is saved in vocab.json under "controls" only when they exist,
so a vocabulary without them writes and reads exactly as before.

It lives in data_prep, not mgpt, because it is part of the dataset format that
data_prep writes: mgpt reads that format, and data_prep imports nothing of mgpt's but its
one user-error type (mgpt.errors, which imports nothing heavy). The import
is cheap (numpy only; note-seq when a NoteSequence is converted), and both packages
ship together.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from data_prep import notes as notes_lib
from data_prep.notes import Notes

PAD = "PAD"
EOS = "EOS"
UNKNOWN_STYLE = "unknown"
# Fill-in-the-middle markers (Bavarian et al. 2022), in this order at the end of the vocabulary.
FIM_TOKENS = ("FIM_PREFIX", "FIM_SUFFIX", "FIM_MIDDLE", "FIM_END")
_MIN_MIDI_VELOCITY = 1
_MAX_MIDI_VELOCITY = 127


MODE_NAMES = ("major", "minor", "none")  # data_prep.controls.MODES
CONTROL_NAMES = ("density", "polyphony", "register", "loudness", "mode")  # data_prep.controls.ATTRIBUTES


def _control_tokens(levels: int) -> list[str]:
    return ([f"CONTROL:{name}={k}" for name in CONTROL_NAMES[:-1] for k in range(1, levels + 1)]
            + [f"CONTROL:mode={m}" for m in MODE_NAMES])


def _check_controls(spec: dict) -> dict:
    """A control spec as vocab.json stores it: {'seconds', 'levels', 'edges': {name: K - 1 numbers}}."""
    levels = int(spec["levels"])
    edges = {name: [float(x) for x in spec["edges"][name]] for name in CONTROL_NAMES[:-1]}
    if not float(spec["seconds"]) > 0 or not 2 <= levels <= 32 or any(len(e) != levels - 1 for e in edges.values()):
        raise ValueError(f"controls: not a valid control spec ({spec!r:.200})")
    out = {"seconds": float(spec["seconds"]), "levels": levels, "edges": edges}
    if "seen" in spec:  # the levels the training split has (data_prep.controls.fit); older specs lack it
        out["seen"] = {name: [int(x) for x in spec["seen"][name]] for name in CONTROL_NAMES}
    if "by_style" in spec:  # each style's segment counts per level (data_prep.controls.fit); older specs lack it
        out["by_style"] = {str(style): {name: [int(x) for x in counts[name]] for name in CONTROL_NAMES}
                           for style, counts in spec["by_style"].items()}
    return out


class Sounding(NamedTuple):
    """The notes sounding at a cut (`Vocabulary.sounding_at`); arrays have one entry per pitch."""

    pitch: np.ndarray
    count: np.ndarray
    velocity: np.ndarray
    onset_step: np.ndarray
    now: int


def normalize_label(label: str) -> str:
    """'J. S. Bach' -> 'j_s_bach': labels become safe, stable token suffixes."""
    label = re.sub(r"[^0-9a-z]+", "_", label.strip().lower()).strip("_")
    return label or UNKNOWN_STYLE


class Vocabulary:
    """Maps performance events and conditioning labels to token ids."""

    def __init__(
        self,
        styles: Iterable[str] = (),
        *,
        min_pitch: int = 21,
        max_pitch: int = 108,
        max_shift_steps: int = 100,
        num_velocity_bins: int = 32,
        steps_per_second: int = 100,
        fim: bool = False,
        controls: dict | None = None,
    ):
        if not 0 <= min_pitch <= max_pitch <= 127:
            raise ValueError(f"pitch range {min_pitch}..{max_pitch} must lie within 0..127")
        if max_shift_steps < 1:
            raise ValueError(f"max_shift_steps must be >= 1, got {max_shift_steps}")
        if not 1 <= num_velocity_bins <= 127:
            raise ValueError(f"num_velocity_bins must be in 1..127, got {num_velocity_bins}")
        if steps_per_second < 1:
            raise ValueError(f"steps_per_second must be >= 1, got {steps_per_second}")
        self.min_pitch = min_pitch
        self.max_pitch = max_pitch
        self.max_shift_steps = max_shift_steps
        self.num_velocity_bins = num_velocity_bins
        self.steps_per_second = steps_per_second
        self.styles = [UNKNOWN_STYLE] + sorted({normalize_label(s) for s in styles} - {UNKNOWN_STYLE})

        num_pitches = max_pitch - min_pitch + 1
        self.pad_id = 0
        self.eos_id = 1
        self.note_on_offset = 2
        self.note_off_offset = self.note_on_offset + num_pitches
        self.time_shift_offset = self.note_off_offset + num_pitches
        self.velocity_offset = self.time_shift_offset + max_shift_steps
        self.style_offset = self.velocity_offset + num_velocity_bins
        self.fim = bool(fim)
        self.fim_offset = self.style_offset + len(self.styles)  # = size when there are no FIM tokens
        self.control_offset = self.fim_offset + (len(FIM_TOKENS) if self.fim else 0)
        self.controls = None if controls is None else _check_controls(controls)
        control_tokens = [] if self.controls is None else _control_tokens(self.controls["levels"])
        self.size = self.control_offset + len(control_tokens)

        pitches = range(min_pitch, max_pitch + 1)
        self.tokens: list[str] = (
            [PAD, EOS]
            + [f"NOTE_ON:{p}" for p in pitches]
            + [f"NOTE_OFF:{p}" for p in pitches]
            + [f"TIME_SHIFT:{s}" for s in range(1, max_shift_steps + 1)]
            + [f"VELOCITY:{b}" for b in range(1, num_velocity_bins + 1)]
            + [f"STYLE:{s}" for s in self.styles]
            + (list(FIM_TOKENS) if self.fim else [])
            + control_tokens
        )
        self._index = {t: i for i, t in enumerate(self.tokens)}
        self._velocity_bin_size = math.ceil(
            (_MAX_MIDI_VELOCITY - _MIN_MIDI_VELOCITY + 1) / num_velocity_bins
        )

    # ----------------------------------------------------------------- persistence
    def to_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "min_pitch": self.min_pitch,
            "max_pitch": self.max_pitch,
            "max_shift_steps": self.max_shift_steps,
            "num_velocity_bins": self.num_velocity_bins,
            "steps_per_second": self.steps_per_second,
            **({} if self.controls is None else {"controls": self.controls}),
        }

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def from_json(cls, data: dict, *, origin: str = "vocab.json") -> "Vocabulary":
        try:
            styles = [t.split(":", 1)[1] for t in data["tokens"] if t.startswith("STYLE:")]
            vocab = cls(
                styles,
                min_pitch=int(data["min_pitch"]),
                max_pitch=int(data["max_pitch"]),
                max_shift_steps=int(data["max_shift_steps"]),
                num_velocity_bins=int(data["num_velocity_bins"]),
                steps_per_second=int(data["steps_per_second"]),
                fim=FIM_TOKENS[0] in data["tokens"],
                controls=data.get("controls"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{origin}: not a valid mgpt vocabulary ({e})") from None
        if vocab.tokens != list(data["tokens"]):
            raise ValueError(f"{origin}: token list does not match its own settings")
        return vocab

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.json")
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no vocab.json here (build the dataset first)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(data, origin=path)

    def with_fim(self) -> "Vocabulary":
        """The same vocabulary with the FIM tokens appended (every other event and style id unchanged)."""
        return Vocabulary(self.styles, min_pitch=self.min_pitch, max_pitch=self.max_pitch,
                          max_shift_steps=self.max_shift_steps, num_velocity_bins=self.num_velocity_bins,
                          steps_per_second=self.steps_per_second, fim=True, controls=self.controls)

    def with_controls(self, spec: dict) -> "Vocabulary":
        """The same vocabulary with control tokens appended after everything (`data_prep.controls.fit`'s spec)."""
        return Vocabulary(self.styles, min_pitch=self.min_pitch, max_pitch=self.max_pitch,
                          max_shift_steps=self.max_shift_steps, num_velocity_bins=self.num_velocity_bins,
                          steps_per_second=self.steps_per_second, fim=self.fim, controls=spec)

    def control_id(self, name: str, level: int | str) -> int:
        """The token of control `name` at `level` (1..K; for mode 1..3 or major/minor/none)."""
        if self.controls is None:
            raise ValueError("this vocabulary has no control tokens (a model trained without data.control_seconds)")
        if name == "mode" and not isinstance(level, str):
            level = MODE_NAMES[int(level) - 1]
        return self.id_of(f"CONTROL:{name}={level}")

    def is_control(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return ids >= self.control_offset

    @property
    def fim_prefix_id(self) -> int:
        return self._fim_id(0)

    @property
    def fim_suffix_id(self) -> int:
        return self._fim_id(1)

    @property
    def fim_middle_id(self) -> int:
        return self._fim_id(2)

    @property
    def fim_end_id(self) -> int:
        return self._fim_id(3)

    def _fim_id(self, k: int) -> int:
        if not self.fim:
            raise ValueError("this vocabulary has no FIM tokens (a model trained with data.fim_rate = 0)")
        return self.fim_offset + k

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.to_json() == other.to_json()

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Vocabulary(size={self.size}, styles={self.styles})"

    # ----------------------------------------------------------------- lookups
    def id_of(self, token: str) -> int:
        try:
            return self._index[token]
        except KeyError:
            raise KeyError(f"unknown token {token!r}") from None

    def token_of(self, token_id: int) -> str:
        return self.tokens[int(token_id)]

    def style_id(self, label: str | None) -> int:
        """The conditioning token for a label; unseen or empty labels map to STYLE:unknown."""
        name = normalize_label(label) if label else UNKNOWN_STYLE
        return self._index.get(f"STYLE:{name}", self.style_offset)

    def style_name(self, label: str | None) -> str:
        """The style a label conditions on, as `styles` names it ('unknown' for unseen or empty labels)."""
        return self.styles[self.style_id(label) - self.style_offset]

    @property
    def unknown_style_id(self) -> int:
        return self.style_offset

    def is_style(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.style_offset) & (ids < self.fim_offset)

    def is_event(self, ids: np.ndarray) -> np.ndarray:
        """True for NOTE_ON/NOTE_OFF/TIME_SHIFT/VELOCITY ids."""
        ids = np.asarray(ids)
        return (ids >= self.note_on_offset) & (ids < self.style_offset)

    def is_velocity(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.velocity_offset) & (ids < self.style_offset)

    def velocity_at(self, ids: np.ndarray, index: int) -> int | None:
        """The VELOCITY id in force just before ids[index] (the last one earlier in ids), or None.

        A window cut from the middle of a piece starts with this token so that the
        model, and the decoder, know the loudness the cut-off part had set.
        """
        earlier = np.asarray(ids)[:index]
        found = np.flatnonzero(self.is_velocity(earlier))
        return int(earlier[found[-1]]) if found.size else None

    def sounding_at(self, ids: np.ndarray, index: int) -> Sounding:
        """The notes still sounding just before ids[index], from the event prefix ids[:index].

        Returns Sounding(pitch_N, count_N, velocity_id_N, onset_step_N, now_step): each
        sounding pitch in ascending order, how many of its notes sound (a unison struck
        twice gives NOTE_ON, NOTE_ON, NOTE_OFF, NOTE_OFF: encode_notes, like note-seq, keeps
        overlapping notes of one pitch), the VELOCITY id in force at its latest NOTE_ON, the
        time step of that NOTE_ON, and the time step at the cut, all counted in TIME_SHIFT
        steps from ids[0]. A pitch sounds when its NOTE_ONs outnumber its NOTE_OFFs.
        Vectorised: a training crop of a 30k-event piece costs a few passes over the prefix.
        """
        prefix = np.asarray(ids, np.int64)[:index]
        on = (prefix >= self.note_on_offset) & (prefix < self.note_off_offset)
        off = (prefix >= self.note_off_offset) & (prefix < self.time_shift_offset)
        num_pitches = self.max_pitch - self.min_pitch + 1
        open_P = np.bincount(prefix[on] - self.note_on_offset, minlength=num_pitches) - np.bincount(
            prefix[off] - self.note_off_offset, minlength=num_pitches)
        sounding = np.flatnonzero(open_P > 0)
        shift = (prefix >= self.time_shift_offset) & (prefix < self.velocity_offset)
        step_T = np.cumsum(np.where(shift, prefix - self.time_shift_offset + 1, 0))
        now = int(step_T[-1]) if len(step_T) else 0
        if not len(sounding):
            empty = np.zeros((0,), np.int64)
            return Sounding(empty, empty, empty, empty, now)
        # The latest NOTE_ON of each sounding pitch, and the VELOCITY in force there.
        on_at = np.flatnonzero(on)
        latest_P = np.full(num_pitches, -1)
        np.maximum.at(latest_P, prefix[on_at] - self.note_on_offset, on_at)
        at = latest_P[sounding]
        is_vel = self.is_velocity(prefix)
        last_vel_T = np.maximum.accumulate(np.where(is_vel, np.arange(len(prefix)), -1))
        vel_at = last_vel_T[at]
        default = self.velocity_offset + int(self.velocity_to_bin(64)) - 1  # the decoder's default
        velocity = np.where(vel_at >= 0, prefix[np.maximum(vel_at, 0)], default)
        return Sounding(sounding + self.min_pitch, open_P[sounding], velocity, step_T[at], now)

    def carried_state(self, ids: np.ndarray, start: int, limit: int | None = None) -> list[int]:
        """What a window opening at ids[start] carries before it, so that it reads as the piece did.

        For a mid-piece start: the VELOCITY in force, then a NOTE_ON for each note still
        sounding (ascending pitch, as many as sound of a pitch; a VELOCITY before any whose
        own velocity differs), then
        the VELOCITY in force again if a carried note changed it. Without the notes, a
        window shows NOTE_OFFs of notes it never saw begin, and a model trained on such
        windows learns that NOTE_ONs need not be closed. [] at the piece's start. When
        ids[start] is itself a VELOCITY, no trailing VELOCITY is needed (and none is
        carried at all when nothing sounds). Training crops, evaluation segments and the
        sampler's windows all use this one rule. `limit` caps the tokens carried (whole
        notes, the lowest pitches first), so that a pathological chord cannot fill a window.
        With control tokens (data_prep/controls.py) the controls in force come first, given as
        the segment's opening wrote them (`controls.in_force`).
        """
        if start == 0:
            return []
        ids = np.asarray(ids)
        opens_on_velocity = start < len(ids) and bool(self.is_velocity(ids[start]))
        in_force = self.velocity_at(ids, start)
        pitch, count, velocity, _, _ = self.sounding_at(ids, start)
        out: list[int] = []
        if self.controls is not None:
            from data_prep import controls

            out += controls.in_force(self, ids, start)
        current = None
        if in_force is not None and (len(pitch) or not opens_on_velocity):
            out.append(in_force)
            current = in_force
        for p, k, v in zip(pitch.tolist(), count.tolist(), velocity.tolist()):
            note = ([v] if v != current else []) + [self.note_on_offset + p - self.min_pitch] * k
            restore = 1 if in_force is not None and v != in_force and not opens_on_velocity else 0
            if limit is not None and len(out) + len(note) + restore > limit:
                break  # whole notes only, and room to restore the velocity in force
            out += note
            current = v
        if in_force is not None and current != in_force and not opens_on_velocity:
            out.append(in_force)
        return out

    def note_lengths(self, ids: np.ndarray) -> np.ndarray:
        """Seconds from each NOTE_ON to the NOTE_OFF that closes it (first in, first out, as
        `decode_notes` pairs them); notes never closed are left out."""
        ids = np.asarray(ids, np.int64)
        shift = (ids >= self.time_shift_offset) & (ids < self.velocity_offset)
        step_T = np.cumsum(np.where(shift, ids - self.time_shift_offset + 1, 0))
        on = (ids >= self.note_on_offset) & (ids < self.note_off_offset)
        off = (ids >= self.note_off_offset) & (ids < self.time_shift_offset)
        pitch_on, pitch_off = ids[on] - self.note_on_offset, ids[off] - self.note_off_offset
        step_on, step_off = step_T[on], step_T[off]
        # The k-th NOTE_ON of a pitch pairs with its k-th NOTE_OFF: sort each kind by (pitch, order).
        order_on, order_off = np.argsort(pitch_on, kind="stable"), np.argsort(pitch_off, kind="stable")
        pitch_on, step_on = pitch_on[order_on], step_on[order_on]
        pitch_off, step_off = pitch_off[order_off], step_off[order_off]
        rank_on = np.arange(len(pitch_on)) - np.searchsorted(pitch_on, pitch_on)
        rank_off = np.arange(len(pitch_off)) - np.searchsorted(pitch_off, pitch_off)
        key_on = pitch_on * (len(ids) + 1) + rank_on
        key_off = pitch_off * (len(ids) + 1) + rank_off
        common, i_on, i_off = np.intersect1d(key_on, key_off, assume_unique=True, return_indices=True)
        return (step_off[i_off] - step_on[i_on]) / float(self.steps_per_second)

    def velocity_to_bin(self, velocity: np.ndarray) -> np.ndarray:
        velocity = np.clip(np.asarray(velocity), _MIN_MIDI_VELOCITY, _MAX_MIDI_VELOCITY)
        return (velocity - _MIN_MIDI_VELOCITY) // self._velocity_bin_size + 1

    def bin_to_velocity(self, velocity_bin: np.ndarray) -> np.ndarray:
        return _MIN_MIDI_VELOCITY + (np.asarray(velocity_bin) - 1) * self._velocity_bin_size

    # ----------------------------------------------------------------- encoding
    def encode_notes(
        self,
        pitch: np.ndarray,
        velocity: np.ndarray,
        start_s: np.ndarray,
        end_s: np.ndarray,
    ) -> np.ndarray:
        """Notes (parallel arrays, seconds) -> int32 event ids, as note-seq's Performance.

        Notes whose pitch lies outside the vocabulary's range are dropped. Vectorised:
        this is the hot path of dataset preparation.
        """
        pitch = np.asarray(pitch, np.int64)
        velocity = np.asarray(velocity, np.int64)
        start_s = np.asarray(start_s, np.float64)
        end_s = np.asarray(end_s, np.float64)
        keep = (pitch >= self.min_pitch) & (pitch <= self.max_pitch)
        pitch, velocity, start_s, end_s = pitch[keep], velocity[keep], start_s[keep], end_s[keep]
        n = len(pitch)
        if n == 0:
            return np.zeros((0,), np.int32)

        sps = self.steps_per_second
        # note-seq quantises with a 0.5 cutoff (round half up) and never makes a note zero-length.
        start_step = np.floor(start_s * sps + 0.5).astype(np.int64)
        end_step = np.floor(end_s * sps + 0.5).astype(np.int64)
        end_step = np.maximum(end_step, start_step + 1)

        order = np.lexsort((pitch, start_s))  # note-seq sorts notes by (start_time, pitch)
        pitch, velocity = pitch[order], velocity[order]
        start_step, end_step = start_step[order], end_step[order]

        # Events sorted by (step, note index, is_offset), exactly note-seq's tuple sort.
        idx = np.arange(n)
        ev_step = np.concatenate([start_step, end_step])
        ev_idx = np.concatenate([idx, idx])
        ev_off = np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64)])
        ev_order = np.lexsort((ev_off, ev_idx, ev_step))
        ev_step, ev_idx, ev_off = ev_step[ev_order], ev_idx[ev_order], ev_off[ev_order]
        ev_pitch = pitch[ev_idx]

        # Velocity events: before an onset whose bin differs from the previous onset's bin.
        onset = ev_off == 0
        bins = self.velocity_to_bin(velocity[ev_idx])
        onset_bins = bins[onset]
        changed = np.ones(len(onset_bins), bool)
        changed[1:] = onset_bins[1:] != onset_bins[:-1]
        has_vel = np.zeros(len(ev_step), bool)
        has_vel[np.flatnonzero(onset)[changed]] = True

        # Time shifts: a gap d > 0 becomes (d-1)//max shifts of `max` plus one remainder.
        gap = np.diff(ev_step, prepend=0)
        m = self.max_shift_steps
        n_shift = np.where(gap > 0, (gap - 1) // m + 1, 0)

        per_event = n_shift + has_vel + 1
        end = np.cumsum(per_event)
        begin = end - per_event
        out = np.empty(end[-1], np.int64)

        # Fill the shifts: every shift token is `max` except the last of its run.
        shift_event = np.repeat(np.arange(len(ev_step)), n_shift)
        if len(shift_event):
            run_start = np.repeat(begin, n_shift)
            pos = np.arange(len(shift_event)) - np.repeat(np.cumsum(n_shift) - n_shift, n_shift)
            last = pos == n_shift[shift_event] - 1
            value = np.where(last, gap[shift_event] - (n_shift[shift_event] - 1) * m, m)
            out[run_start + pos] = self.time_shift_offset + value - 1

        vel_pos = (begin + n_shift)[has_vel]
        out[vel_pos] = self.velocity_offset + bins[has_vel] - 1

        note_pos = end - 1
        out[note_pos] = np.where(
            ev_off == 1,
            self.note_off_offset + ev_pitch - self.min_pitch,
            self.note_on_offset + ev_pitch - self.min_pitch,
        )
        return out.astype(np.int32)

    def encode(self, ns, *, apply_sustain: bool = True) -> np.ndarray:
        """NoteSequence -> int32 event ids. Drum notes are left out; sustain is applied first."""
        return self.encode_notes(*notes_lib.from_sequence(ns, apply_sustain=apply_sustain))

    # ----------------------------------------------------------------- decoding
    def decode_notes(
        self, ids: Sequence[int], *, min_dangling_steps: int = 10, max_note_seconds: float | None = None
    ) -> Notes:
        """Any id sequence -> the Notes (pitch, velocity, start_s, end_s) it describes, well-formed.

        Garbage is tolerated: PAD/EOS/STYLE tokens and unknown ids are ignored, a NOTE_OFF
        with no open note is dropped, a zero-length note is dropped, and a NOTE_ON still
        open at the end is closed at the last time step (at least `min_dangling_steps`
        after its onset). Repeated NOTE_ONs of one pitch are closed first-in, first-out.
        `max_note_seconds` cuts longer notes short, as Magenta's `max_note_duration` does:
        a sampled NOTE_ON whose NOTE_OFF never comes would otherwise drone to the end.
        """
        step = 0
        vel_bin = int(self.velocity_to_bin(64))
        open_notes: dict[int, list[tuple[int, int]]] = {}
        notes: list[tuple[int, int, int, int]] = []  # pitch, velocity bin, start, end
        for t in np.asarray(ids, np.int64).tolist():
            if self.note_on_offset <= t < self.note_off_offset:
                p = t - self.note_on_offset + self.min_pitch
                open_notes.setdefault(p, []).append((step, vel_bin))
            elif self.note_off_offset <= t < self.time_shift_offset:
                p = t - self.note_off_offset + self.min_pitch
                stack = open_notes.get(p)
                if stack:
                    start, vb = stack.pop(0)
                    if step > start:
                        notes.append((p, vb, start, step))
            elif self.time_shift_offset <= t < self.velocity_offset:
                step += t - self.time_shift_offset + 1
            elif self.velocity_offset <= t < self.style_offset:
                vel_bin = t - self.velocity_offset + 1
        for p, stack in open_notes.items():
            for start, vb in stack:
                notes.append((p, vb, start, max(step, start + min_dangling_steps)))
        notes.sort(key=lambda n: (n[2], n[0]))
        arr = np.asarray(notes, np.int64).reshape(-1, 4)
        if max_note_seconds is not None:
            longest = max(1, round(max_note_seconds * self.steps_per_second))
            arr[:, 3] = np.minimum(arr[:, 3], arr[:, 2] + longest)
        sps = float(self.steps_per_second)
        return Notes(arr[:, 0], self.bin_to_velocity(arr[:, 1]), arr[:, 2] / sps, arr[:, 3] / sps)

    def decode(self, ids: Sequence[int], *, program: int = 0, qpm: float = 120.0, max_note_seconds: float | None = None):
        """Any id sequence -> a NoteSequence that writes as valid MIDI (see decode_notes)."""
        from note_seq.protobuf import music_pb2

        pitch, velocity, start_s, end_s = self.decode_notes(ids, max_note_seconds=max_note_seconds)
        ns = music_pb2.NoteSequence()
        ns.ticks_per_quarter = 220
        ns.tempos.add(time=0.0, qpm=qpm)
        for p, v, s, e in zip(pitch.tolist(), velocity.tolist(), start_s.tolist(), end_s.tolist()):
            ns.notes.add(pitch=p, velocity=v, start_time=s, end_time=e, program=program, instrument=0)
        ns.total_time = float(end_s.max()) if len(end_s) else 0.0
        return ns

    def describe(self, ids: Iterable[int]) -> list[str]:
        """Readable tokens, e.g. ['STYLE:bach', 'VELOCITY:16', 'NOTE_ON:60', ...]."""
        return [self.tokens[i] if 0 <= i < self.size else f"<bad id {i}>" for i in map(int, ids)]

    def transpose(self, ids: np.ndarray, semitones: int) -> np.ndarray:
        """Shift every NOTE_ON/NOTE_OFF by `semitones`; notes pushed out of range are dropped.

        Works on any id array (a whole piece or a crop). Both the onset and the offset of a
        dropped note go, so the remaining notes keep their timing; nothing wraps around.
        """
        ids = np.asarray(ids)
        if semitones == 0:
            return ids.copy()
        on = (ids >= self.note_on_offset) & (ids < self.note_off_offset)
        off = (ids >= self.note_off_offset) & (ids < self.time_shift_offset)
        note = on | off
        base = np.where(on, self.note_on_offset, self.note_off_offset)
        new_pitch = ids - base + self.min_pitch + semitones
        in_range = (new_pitch >= self.min_pitch) & (new_pitch <= self.max_pitch)
        out = np.where(note, ids + semitones, ids)
        return out[~note | in_range].astype(ids.dtype)

    def seconds(self, ids: Iterable[int]) -> float:
        """Duration covered by the TIME_SHIFT events in `ids`, in seconds."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64)
        shifts = ids[(ids >= self.time_shift_offset) & (ids < self.velocity_offset)]
        return float((shifts - self.time_shift_offset + 1).sum()) / self.steps_per_second
