"""Synthetic MIDI files for the data-prep tests and the tokenizer benchmark: piano pieces and junk."""

from __future__ import annotations

import io
import os

import mido
import numpy as np


def piano_midi(seed: int, *, num_notes: int = 120, sustain: bool = True, tempo_changes: bool = True) -> bytes:
    """A piano-range, non-drum type-1 MIDI file: chords and runs, pedal, tempo changes.

    Notes of one pitch never overlap (a piano key cannot sound twice), so every note
    survives a MIDI -> events -> MIDI round trip.
    """
    rng = np.random.default_rng(seed)
    tpq = int(rng.choice([220, 384, 480, 960]))
    events = []  # (tick, order, message)
    free_at = {}  # pitch -> first tick it may start again
    tick = 0
    for _ in range(num_notes):
        tick += int(rng.choice([0, 0, tpq // 8, tpq // 4, tpq // 2, tpq]))
        pitch = int(rng.integers(21, 109))
        start = max(tick, free_at.get(pitch, 0))
        length = int(rng.integers(tpq // 16, 2 * tpq))
        velocity = int(rng.integers(1, 128))
        events.append((start, 1, mido.Message("note_on", note=pitch, velocity=velocity, channel=0)))
        # Alternate the two spellings of note-off (a note_on with velocity 0 is one).
        off = (
            mido.Message("note_off", note=pitch, velocity=64, channel=0)
            if rng.random() < 0.5
            else mido.Message("note_on", note=pitch, velocity=0, channel=0)
        )
        events.append((start + length, 0, off))
        free_at[pitch] = start + length + tpq // 8
    end = max(t for t, _, _ in events)
    if sustain:
        t = 0
        while t < end:
            down = t + int(rng.integers(0, tpq))
            up = down + int(rng.integers(tpq // 2, 4 * tpq))
            events.append((down, 0, mido.Message("control_change", control=64, value=int(rng.integers(64, 128)))))
            events.append((up, 0, mido.Message("control_change", control=64, value=int(rng.integers(0, 64)))))
            t = up + int(rng.integers(0, 2 * tpq))
    conductor = [(0, 0, mido.MetaMessage("set_tempo", tempo=int(rng.integers(300_000, 900_000))))]
    if tempo_changes:
        for t in sorted(rng.integers(1, end + 1, 3).tolist()):
            conductor.append((t, 0, mido.MetaMessage("set_tempo", tempo=int(rng.integers(300_000, 900_000)))))
    return _write(tpq, [conductor, [(0, 0, mido.Message("program_change", program=0))] + events])


def mixed_midi(seed: int) -> bytes:
    """Several tracks and channels, program changes, drums, same-pitch overlaps, junk CCs.

    The awkward parts of real collections (Lakh) that a MIDI reader must treat exactly
    as pretty_midi does.
    """
    rng = np.random.default_rng(seed)
    tpq = 480
    tracks = [[(0, 0, mido.MetaMessage("set_tempo", tempo=500_000)), (0, 0, mido.MetaMessage("time_signature"))]]
    for t in sorted(rng.integers(1, 20 * tpq, 2).tolist()):
        tracks[0].append((t, 0, mido.MetaMessage("set_tempo", tempo=int(rng.integers(300_000, 900_000)))))
    for track in range(3):
        events = []
        for _ in range(60):
            channel = int(rng.choice([0, 1, 9])) if track else 0
            start = int(rng.integers(0, 20 * tpq))
            length = int(rng.integers(0, tpq))  # zero-length notes too
            pitch = int(rng.integers(0, 128))  # outside the piano range too
            if rng.random() < 0.1:
                events.append(
                    (start, 2, mido.Message("program_change", channel=channel, program=int(rng.integers(0, 128))))
                )
            if rng.random() < 0.3 and events:  # stack a second note of the same pitch
                events.append((start, 1, mido.Message("note_on", channel=channel, note=pitch, velocity=100)))
            events.append(
                (start, 1, mido.Message("note_on", channel=channel, note=pitch, velocity=int(rng.integers(1, 128))))
            )
            events.append((start + length, 0, mido.Message("note_off", channel=channel, note=pitch)))
            if rng.random() < 0.3:
                events.append(
                    (
                        start,
                        0,
                        mido.Message("control_change", channel=channel, control=64, value=int(rng.integers(0, 128))),
                    )
                )
            if rng.random() < 0.1:
                events.append(
                    (start, 0, mido.Message("pitchwheel", channel=channel, pitch=int(rng.integers(-8192, 8192))))
                )
        events.append((5 * tpq, 3, mido.Message("note_on", channel=2, note=60, velocity=90)))  # never closed: dropped
        tracks.append(events)
    return _write(tpq, tracks)


def drum_midi() -> bytes:
    events = []
    for i in range(16):
        events.append((i * 240, 1, mido.Message("note_on", channel=9, note=36 + i % 10, velocity=100)))
        events.append((i * 240 + 120, 0, mido.Message("note_off", channel=9, note=36 + i % 10)))
    return _write(480, [events])


def _write(tpq: int, tracks) -> bytes:
    mf = mido.MidiFile(type=1, ticks_per_beat=tpq)
    for events in tracks:
        track = mido.MidiTrack()
        last = 0
        for t, _, msg in sorted(events, key=lambda e: (e[0], e[1])):
            track.append(msg.copy(time=t - last))
            last = t
        mf.tracks.append(track)
    buf = io.BytesIO()
    mf.save(file=buf)
    return buf.getvalue()


def junk_files(folder: str) -> dict[str, str]:
    """Write one file of each kind of junk; returns {relative path: expected reason prefix}."""
    valid = piano_midi(0, num_notes=20)
    smpte = bytearray(valid)
    smpte[12:14] = (0xE7, 0x28)  # -25 fps, 40 ticks per frame
    files = {
        "empty.mid": (b"", "empty file"),
        "text.mid": (b"this is not a MIDI file at all\n" * 10, "not a MIDI file"),
        "truncated.mid": (valid[: len(valid) // 2], "corrupt MIDI"),
        "garbage.MIDI": (b"MThd\x00\x00\x00\x06\x00\x01\x00\x02\x01\xe0" + bytes(range(256)) * 4, "corrupt MIDI"),
        "drums.mid": (drum_midi(), "drums only"),
        "smpte.mid": (bytes(smpte), "SMPTE"),
        "silent.mid": (_write(480, [[(0, 0, mido.MetaMessage("set_tempo", tempo=500_000))]]), "no notes"),
        "deep/high.mid": (_high_only(), "no notes in the pitch range"),
    }
    for rel, (data, _) in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, rel)) or folder, exist_ok=True)
        with open(os.path.join(folder, rel), "wb") as f:
            f.write(data)
    return {rel: reason for rel, (_, reason) in files.items()}


def _high_only() -> bytes:
    events = [(0, 1, mido.Message("note_on", note=120, velocity=80)), (480, 0, mido.Message("note_off", note=120))]
    return _write(480, [events])
