"""The notes of a piece as parallel arrays, and the one NoteSequence -> notes conversion.

Every stage that looks at notes rather than event ids uses `Notes`: the MIDI readers
(`data_prep.midi`, `data_prep.fastmidi`), `Vocabulary.encode_notes`/`decode_notes`, the
musical features, the style classifier, the copy search and the evaluation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Notes(NamedTuple):
    """Notes of one piece: parallel [N] arrays, seconds.

    A tuple so that `pitch, velocity, start_s, end_s = notes` and
    `vocab.encode_notes(*notes)` read as what they are; `len(notes)` is the number of
    notes (N), not 4, because that is what every caller means by it.
    """

    pitch: np.ndarray  # int64 MIDI pitch
    velocity: np.ndarray  # int64 1..127
    start_s: np.ndarray  # float64 seconds
    end_s: np.ndarray  # float64 seconds

    def __len__(self) -> int:
        return len(self.pitch)

    @property
    def seconds(self) -> float:
        """When the last note ends (0 for no notes)."""
        return float(self.end_s.max()) if len(self) else 0.0

    def stretched(self, factor: float) -> "Notes":
        """The same notes played `factor` times as long (factor > 1 is slower)."""
        return Notes(self.pitch, self.velocity, self.start_s * factor, self.end_s * factor)

    def with_velocity(self, velocity: int) -> "Notes":
        return Notes(self.pitch, np.full_like(self.velocity, velocity), self.start_s, self.end_s)

    def select(self, keep: np.ndarray) -> "Notes":
        """The notes where the bool [N] mask `keep` is set."""
        return Notes(self.pitch[keep], self.velocity[keep], self.start_s[keep], self.end_s[keep])


def empty() -> Notes:
    return Notes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))


def from_sequence(ns, *, apply_sustain: bool = True, drop_drums: bool = True) -> Notes:
    """NoteSequence -> Notes, by default as `Vocabulary.encode` sees it: sustain pedal applied
    (note-seq's `apply_sustain_control_changes`), drums left out. Notes keep the sequence's order."""
    if apply_sustain and any(cc.control_number == 64 for cc in ns.control_changes):
        from note_seq import sequences_lib

        ns = sequences_lib.apply_sustain_control_changes(ns)
    notes = [n for n in ns.notes if not n.is_drum] if drop_drums else list(ns.notes)
    return Notes(
        np.fromiter((n.pitch for n in notes), np.int64, len(notes)),
        np.fromiter((n.velocity for n in notes), np.int64, len(notes)),
        np.fromiter((n.start_time for n in notes), np.float64, len(notes)),
        np.fromiter((n.end_time for n in notes), np.float64, len(notes)),
    )


def crop(notes: Notes, seconds: float | None) -> Notes:
    """The notes starting in the first `seconds`, ends clipped there; None or 0 = all."""
    if not seconds:
        return notes
    keep = notes.start_s < seconds
    return Notes(notes.pitch[keep], notes.velocity[keep], notes.start_s[keep], np.minimum(notes.end_s[keep], seconds))
