"""MIDI bytes -> the notes a performance is made of, with note-seq's semantics.

`read_midi` is the one entry point. It rejects unusable files with `SkipPiece` (one
line saying why) and returns the pitched notes after the sustain pedal has been
applied, exactly what `Vocabulary.encode(note_seq.midi_to_note_sequence(data))` sees.

Two readers give the same notes:
- `parser="fast"` (default) reads the bytes directly (see `data_prep.fastmidi`);
- `parser="note_seq"` is the reference: pretty_midi via `note_seq.midi_to_note_sequence`
  and `sequences_lib.apply_sustain_control_changes`.
Tests check they agree note for note.
"""

from __future__ import annotations

import warnings

from data_prep import fastmidi
from data_prep.notes import Notes, from_sequence

# note_seq imports pydub, which warns about ffmpeg (needed only for audio, not by us).
warnings.filterwarnings("ignore", message="Couldn't find ffmpeg")

MAX_FILE_BYTES = 16 * 2**20  # Real MIDI is small; bigger files are junk (or not MIDI).
MAX_SECONDS = 4 * 3600.0  # Longer "performances" are broken tempo maps, not music.


class SkipPiece(Exception):
    """An input that cannot be used; str(e) is the one-line reason for skipped.jsonl."""


def too_large(size: int, limit: int) -> str:
    """"file too large (47.7 MiB > 16 MiB)"; in bytes when the MiB figures would read the same."""
    size_mib, limit_mib = f"{size / 2**20:.1f}", f"{limit / 2**20:.1f}"
    if float(size_mib) <= float(limit_mib) or limit < 2**20:  # 16 MiB + 1 byte would read "16.0 MiB > 16 MiB"
        return f"file too large ({size:,} bytes > {limit:,} bytes)"
    return f"file too large ({size_mib} MiB > {limit_mib.removesuffix('.0')} MiB)"


def check_header(data: bytes, *, max_file_bytes: int = MAX_FILE_BYTES) -> None:
    """Cheap checks that name the common kinds of junk before any parser sees them."""
    if len(data) == 0:
        raise SkipPiece("empty file")
    if len(data) > max_file_bytes:
        raise SkipPiece(too_large(len(data), max_file_bytes))
    if data[:4] != b"MThd" or len(data) < 14:
        raise SkipPiece("not a MIDI file (no MThd header)")
    division = int.from_bytes(data[12:14], "big")
    if division & 0x8000:
        raise SkipPiece("SMPTE time division is not supported (only ticks per quarter)")
    if division == 0:
        raise SkipPiece("corrupt MIDI: zero ticks per quarter note")


def read_midi(
    data: bytes,
    *,
    parser: str = "fast",
    max_file_bytes: int = MAX_FILE_BYTES,
    max_seconds: float = MAX_SECONDS,
    trusted: bool = False,
) -> Notes:
    """MIDI file contents -> pitched notes with sustain applied. Raises SkipPiece.

    trusted=True is for MIDI we wrote ourselves (from scores): always the fast reader,
    without pretty_midi's tick-count guard against corrupt files.
    """
    check_header(data, max_file_bytes=max_file_bytes)
    if parser == "fast" or trusted:
        try:
            raw = fastmidi.parse(data, max_tick=None if trusted else fastmidi.MAX_TICK)
        except fastmidi.MidiError as e:
            raise SkipPiece(f"corrupt MIDI: {e}") from None
        num_notes, num_drum = len(raw.pitch), int(raw.is_drum.sum())
        notes = raw.pitched_with_sustain()
    elif parser == "note_seq":
        import note_seq

        try:
            ns = note_seq.midi_to_note_sequence(data)
        except Exception as e:  # pretty_midi/mido raise anything on junk: all of it is a skip.
            raise SkipPiece(f"corrupt MIDI: {one_line(e)}") from None
        num_notes = len(ns.notes)
        num_drum = sum(n.is_drum for n in ns.notes)
        notes = from_sequence(ns)
    else:
        raise ValueError(f"parser must be 'fast' or 'note_seq', got {parser!r}")

    if num_notes == 0:
        raise SkipPiece("no notes")
    if num_drum == num_notes:
        raise SkipPiece("drums only (no pitched notes)")
    if notes.seconds > max_seconds:
        raise SkipPiece(f"too long ({notes.seconds / 3600:.1f} h > {max_seconds / 3600:.1f} h)")
    return notes


def one_line(e: BaseException) -> str:
    """An exception from a parser we do not own as one line for skipped.jsonl (type: message)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300]
