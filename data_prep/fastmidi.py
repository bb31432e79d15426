"""A direct MIDI reader that gives exactly the notes note-seq gets through pretty_midi.

`note_seq.midi_to_note_sequence` parses with mido (one Python object per message),
then pretty_midi pairs notes and maps ticks to seconds, then note-seq copies every
note into a protobuf. That is most of the time of dataset preparation. This module
reads the bytes in one pass and keeps only what the event encoding needs, while
reproducing the semantics of that stack (tested note for note against it):

- mido: running status (also after sysex), message lengths, data bytes <= 127, the
  meta messages mido refuses (short tempo/time/key signature data...), chunk layout;
- pretty_midi: tempo map from track 0 only (repeats ignored, a tick-0 tempo resets
  it), the tick -> seconds arithmetic, MAX_TICK, a note-off closes every open note of
  its pitch and channel that began at an earlier tick, instruments keyed by
  (program, channel, track) in order of first closed note, control changes of a
  channel without that instrument parked on a "straggler" that the next instrument
  adopts, drums on channel 10;
- note-seq: notes listed by instrument, then `apply_sustain_control_changes` (per
  instrument, events ordered by time then sustain-on, sustain-off, note-on, note-off).
"""

from __future__ import annotations

import dataclasses
import operator

import numpy as np

from data_prep.notes import Notes

MAX_TICK = 10_000_000  # pretty_midi.MAX_TICK: beyond it the tick map would thrash memory
_MAX_MESSAGE = 1_000_000  # mido's MAX_MESSAGE_LENGTH
# Lengths (status byte included) of the system messages mido knows; others are errors.
_SYSTEM_LENGTHS = {0xF1: 2, 0xF2: 3, 0xF3: 2, 0xF6: 1, 0xF8: 1, 0xFA: 1, 0xFB: 1, 0xFC: 1, 0xFE: 1}
_SUSTAIN_ON, _SUSTAIN_OFF, _NOTE_ON, _NOTE_OFF = 0, 1, 2, 3  # note-seq's event order


class MidiError(Exception):
    """The file is not MIDI that mido + pretty_midi would read."""


@dataclasses.dataclass
class RawNotes:
    """All notes in note-seq's order, before sustain. Parallel [N] arrays."""

    pitch: np.ndarray  # int64
    velocity: np.ndarray  # int64
    start_s: np.ndarray  # float64
    end_s: np.ndarray  # float64
    instrument: np.ndarray  # int64, note-seq's instrument index
    is_drum: np.ndarray  # bool
    sustain: list  # (time_s, instrument, value) of every CC 64, in note-seq's order

    def pitched_with_sustain(self):
        """Notes as Vocabulary.encode sees them: sustain applied, drums left out."""
        keep = ~self.is_drum
        end_s = self.end_s
        if self.sustain:
            end_s, removed = _apply_sustain(self)
            keep &= ~removed
        return Notes(self.pitch[keep], self.velocity[keep], self.start_s[keep], end_s[keep])


def parse(data: bytes, *, max_tick: int | None = MAX_TICK) -> RawNotes:
    """MIDI file contents -> RawNotes. Raises MidiError where mido/pretty_midi would fail.

    max_tick=None lifts pretty_midi's guard against corrupt tick counts, for MIDI we
    wrote ourselves (music21 uses 10080 ticks per quarter, so long scores pass 1e7).
    """
    try:
        return _parse(data, max_tick)
    except IndexError:
        raise MidiError("unexpected end of file") from None


def _parse(data: bytes, max_tick_allowed: int | None) -> RawNotes:
    resolution, num_tracks, pos = _read_header(data)
    song = _Song()
    max_tick = 0
    for number in range(num_tracks):
        pos, end = _track_bounds(data, pos)
        max_tick = max(max_tick, _read_track(data, pos, end, number, song))
        pos = end
    if max_tick_allowed is not None and max_tick + 1 > max_tick_allowed:
        raise MidiError(f"largest tick {max_tick + 1} is too large, the file is likely corrupt")
    return song.raw_notes(_TickTimes(song.tempos, resolution))


def _read_header(data: bytes) -> tuple[int, int, int]:
    """MThd -> (ticks per quarter, number of tracks, position of the first track)."""
    if data[:4] != b"MThd" or len(data) < 8:
        raise MidiError("no MThd header")
    header_size = int.from_bytes(data[4:8], "big")
    if min(header_size, len(data) - 8) < 6:
        raise MidiError("MThd header too short")
    num_tracks = int.from_bytes(data[10:12], "big", signed=True)
    resolution = int.from_bytes(data[12:14], "big", signed=True)
    if resolution <= 0:
        raise MidiError("SMPTE or zero time division")
    if num_tracks <= 0:
        raise MidiError("no tracks")
    return resolution, num_tracks, 8 + header_size


def _track_bounds(data: bytes, pos: int) -> tuple[int, int]:
    """The MTrk chunk at `pos` -> (start, end) of its messages."""
    if pos + 8 > len(data):
        raise MidiError("unexpected end of file (missing track)")
    if data[pos : pos + 4] != b"MTrk":
        raise MidiError("no MTrk header at start of track")
    start = pos + 8
    end = start + int.from_bytes(data[pos + 4 : pos + 8], "big")
    if start == end:
        raise MidiError("empty track")  # pretty_midi cannot take max() of it
    return start, end


class _Song:
    """What the tracks add up to, in the order pretty_midi builds it: closed notes in order
    of closing, instruments in order of creation, and track 0's tempo changes."""

    def __init__(self):
        self.pitch, self.velocity, self.start, self.end, self.instrument = [], [], [], [], []
        self.inst_drum: list[bool] = []
        self.inst_ccs: list[list] = []  # shared lists, as pretty_midi's stragglers share them
        self.tempos: list[tuple[int, int]] = []

    def raw_notes(self, times: "_TickTimes") -> RawNotes:
        # note-seq lists notes instrument by instrument, each in order of closing.
        inst = np.asarray(self.instrument, np.int64)
        order = np.argsort(inst, kind="stable")
        drum = np.asarray(self.inst_drum, bool)
        # CC 64 of each instrument's (possibly shared) list, instrument by instrument.
        ccs = [(t, i, v) for i, lst in enumerate(self.inst_ccs) for t, v in lst]
        cc_s = times(np.asarray([c[0] for c in ccs], np.int64)).tolist()
        return RawNotes(
            pitch=np.asarray(self.pitch, np.int64)[order],
            velocity=np.asarray(self.velocity, np.int64)[order],
            start_s=times(np.asarray(self.start, np.int64)[order]),
            end_s=times(np.asarray(self.end, np.int64)[order]),
            instrument=inst[order],
            is_drum=drum[inst[order]] if len(inst) else np.zeros(0, bool),
            sustain=[(s, i, v) for s, (_, i, v) in zip(cc_s, ccs, strict=True)],
        )


class _Track:
    """The state pretty_midi keeps while it reads one track."""

    __slots__ = ("number", "program", "open_notes", "inst_map", "stragglers")

    def __init__(self, number: int):
        self.number = number
        self.program = [0] * 16
        self.open_notes: dict[int, list] = {}  # channel << 7 | pitch -> [(start tick, velocity)]
        self.inst_map: dict[int, int] = {}  # program << 4 | channel -> instrument id
        self.stragglers: dict[int, list] = {}  # channel -> control changes before its instrument exists


def _read_track(data: bytes, pos: int, end: int, number: int, song: _Song) -> int:
    """Every message of one track into `song`; returns the track's last tick."""
    track = _Track(number)
    open_notes = track.open_notes
    tick = 0
    last_status = -1
    while pos < end:
        b = data[pos]
        if b < 0x80:  # a one-byte delta time, by far the most common: no call
            tick += b
            pos += 1
        else:
            delta, pos = _varint(data, pos)
            tick += delta
        status = data[pos]
        pos += 1
        running = status < 0x80
        if running:
            if last_status < 0:
                raise MidiError("running status without a previous status")
            status = last_status
            pos -= 1  # that byte was data
        elif status != 0xFF:
            last_status = status
        hi = status & 0xF0

        if hi == 0x90 or hi == 0x80:
            pitch = data[pos]
            vel = data[pos + 1]
            pos += 2
            if (pitch | vel) & 0x80:
                raise MidiError("data byte out of range")
            key = (status & 0x0F) << 7 | pitch
            if hi == 0x90 and vel:  # a note-on opens a note; it is half of all messages, so no call
                started = open_notes.get(key)
                if started is None:
                    open_notes[key] = [(tick, vel)]
                else:
                    started.append((tick, vel))
            elif key in open_notes:
                _note_off(key, tick, track, song)
        elif hi == 0xB0 or hi == 0xE0:
            _control(data, pos, status, tick, track, song)
            pos += 2
        elif hi == 0xC0:
            if data[pos] & 0x80:
                raise MidiError("data byte out of range")
            track.program[status & 0x0F] = data[pos]
            pos += 1
        elif hi == 0xA0:  # aftertouch: checked, not kept (indexing, not slicing: a cut file must fail)
            if (data[pos] | data[pos + 1]) & 0x80:
                raise MidiError("data byte out of range")
            pos += 2
        elif hi == 0xD0:
            if data[pos] & 0x80:
                raise MidiError("data byte out of range")
            pos += 1
        elif status == 0xFF:
            pos = _meta(data, pos, tick, track.number, song)
        elif status == 0xF0 or status == 0xF7:
            pos = _sysex(data, pos, running)
        else:
            pos = _system(data, pos, status, running)
    if pos != end:
        raise MidiError("message runs past the end of its track")
    return tick


def _note_off(key: int, tick: int, track: _Track, song: _Song) -> None:
    """A note-off (or a note-on of velocity 0) of `key` (channel << 7 | pitch) closes, as
    pretty_midi does, every open note of that pitch and channel that began at an earlier tick."""
    open_notes = track.open_notes
    started = open_notes[key]
    if len(started) == 1:
        closing = started if started[0][0] != tick else ()
        keep = ()
    else:
        closing = [s for s in started if s[0] != tick]
        keep = [s for s in started if s[0] == tick]
    if closing and keep:
        open_notes[key] = keep
    else:
        del open_notes[key]
    if not closing:
        return
    pitch, ch = key & 0x7F, key >> 7
    inst = _instrument(track, ch, song)
    for start, v in closing:
        song.pitch.append(pitch)
        song.velocity.append(v)
        song.start.append(start)
        song.end.append(tick)
        song.instrument.append(inst)


def _instrument(track: _Track, ch: int, song: _Song) -> int:
    """The instrument of the channel's current program, created at its first closed note; it
    adopts the control changes its channel saw before it existed (pretty_midi's stragglers)."""
    ik = track.program[ch] << 4 | ch
    inst = track.inst_map.get(ik)
    if inst is None:
        inst = track.inst_map[ik] = len(song.inst_drum)
        song.inst_drum.append(ch == 9)
        ccs = track.stragglers.get(ch)
        song.inst_ccs.append(ccs if ccs is not None else [])
    return inst


def _control(data: bytes, pos: int, status: int, tick: int, track: _Track, song: _Song) -> None:
    """A control change or pitch bend: only the sustain pedal (CC 64) is kept, on the channel's
    instrument or, before that exists, on the channel's straggler list."""
    d1 = data[pos]
    d2 = data[pos + 1]
    if (d1 | d2) & 0x80:
        raise MidiError("data byte out of range")
    ch = status & 0x0F
    inst = track.inst_map.get(track.program[ch] << 4 | ch)
    if inst is not None:
        ccs = song.inst_ccs[inst]
    else:
        ccs = track.stragglers.get(ch)
        if ccs is None:
            ccs = track.stragglers[ch] = []
    if status & 0xF0 == 0xB0 and d1 == 64:
        ccs.append((tick, d2))


def _meta(data: bytes, pos: int, tick: int, track: int, song: _Song) -> int:
    """A meta message (after 0xFF): checked as mido does; track 0's tempos kept. Returns the next position."""
    meta_type = data[pos]
    length, pos = _varint(data, pos + 1)
    if length > _MAX_MESSAGE:
        raise MidiError("message too long")
    meta = data[pos : pos + length]
    pos += length
    if pos > len(data):
        raise MidiError("unexpected end of file")
    _check_meta(meta_type, meta, track)
    if meta_type == 0x51 and track == 0:
        song.tempos.append((tick, meta[0] << 16 | meta[1] << 8 | meta[2]))
    return pos


def _sysex(data: bytes, pos: int, running: bool) -> int:
    """A sysex message (after 0xF0 or 0xF7), skipped. Returns the next position."""
    if running:
        pos += 1  # mido drops the data byte that triggered running status here
    length, pos = _varint(data, pos)
    if length > _MAX_MESSAGE:
        raise MidiError("message too long")
    pos += length
    if pos > len(data):
        raise MidiError("unexpected end of file")
    return pos


def _system(data: bytes, pos: int, status: int, running: bool) -> int:
    """A system common or real-time message, skipped if mido knows it. Returns the next position."""
    size = _SYSTEM_LENGTHS.get(status)
    if size is None:
        raise MidiError(f"undefined status byte 0x{status:02x}")
    if size == 1 and running:
        raise MidiError("wrong number of data bytes")
    for b in data[pos : pos + size - 1]:
        if b & 0x80:
            raise MidiError("data byte out of range")
    pos += size - 1
    if pos > len(data):
        raise MidiError("unexpected end of file")
    return pos


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    while True:
        b = data[pos]
        pos += 1
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, pos


def _check_meta(meta_type: int, meta: bytes, track: int) -> None:
    """Refuse the meta messages that make mido (or pretty_midi/note-seq on track 0) fail."""
    length = len(meta)
    if meta_type == 0x51:
        if length < 3:
            raise MidiError("short set_tempo")
        if track == 0 and not (meta[0] or meta[1] or meta[2]):
            raise MidiError("zero tempo")
    elif meta_type == 0x58:
        if length < 4:
            raise MidiError("short time_signature")
        if track == 0 and (meta[0] == 0 or meta[1] >= 31):
            raise MidiError("invalid time signature")
    elif meta_type == 0x59:
        if length < 2:
            raise MidiError("short key_signature")
        key = meta[0] - 256 if meta[0] > 127 else meta[0]
        if not (-7 <= key <= 7 and meta[1] in (0, 1)):
            raise MidiError("invalid key signature")
    elif meta_type == 0x54:
        if length < 5 or meta[0] >> 5 > 3:
            raise MidiError("invalid smpte_offset")
    elif meta_type == 0x20:
        if length < 1:
            raise MidiError("short channel_prefix")
    elif meta_type == 0x00:
        if length == 1:
            raise MidiError("short sequence_number")


class _TickTimes:
    """pretty_midi's tick -> seconds map, computed only at the ticks asked for."""

    def __init__(self, tempos: list[tuple[int, int]], resolution: int):
        scales = [(0, 60.0 / (120.0 * resolution))]
        for tick, tempo in tempos:
            if tick == 0:
                bpm = 6e7 / tempo
                scales = [(0, 60.0 / (bpm * resolution))]
            else:
                scale = 60.0 / ((6e7 / tempo) * resolution)
                if scale != scales[-1][1]:
                    scales.append((tick, scale))
        self.start = np.asarray([s[0] for s in scales], np.int64)
        self.scale = np.asarray([s[1] for s in scales], np.float64)
        # Seconds at each tempo change, accumulated exactly as pretty_midi does.
        self.offset = np.zeros(len(scales), np.float64)
        for i in range(1, len(scales)):
            self.offset[i] = self.offset[i - 1] + self.scale[i - 1] * np.int64(self.start[i] - self.start[i - 1])

    def __call__(self, ticks: np.ndarray) -> np.ndarray:
        if len(self.start) == 1:
            return self.offset[0] + self.scale[0] * ticks
        i = np.searchsorted(self.start, ticks, side="right") - 1
        return self.offset[i] + self.scale[i] * (ticks - self.start[i])


def _apply_sustain(raw: RawNotes) -> tuple[np.ndarray, np.ndarray]:
    """note-seq's apply_sustain_control_changes on arrays: (new end_s, removed mask)."""
    pitch = raw.pitch.tolist()
    start = raw.start_s.tolist()
    end = raw.end_s.tolist()
    inst = raw.instrument.tolist()
    pitched = np.flatnonzero(~raw.is_drum).tolist()
    events = [(start[i], _NOTE_ON, i) for i in pitched]
    events += [(end[i], _NOTE_OFF, i) for i in pitched]
    events += [(t, _SUSTAIN_ON if v >= 64 else _SUSTAIN_OFF, ins) for t, ins, v in raw.sustain]
    events.sort(key=operator.itemgetter(0, 1))  # stable, as note-seq's sort

    active: dict[int, list[int]] = {}
    pedal: dict[int, bool] = {}
    removed = np.zeros(len(pitch), bool)
    time = 0.0
    for time, kind, x in events:
        if kind == _NOTE_ON:
            ins = inst[x]
            notes = active.get(ins)
            if notes is None:
                active[ins] = [x]
                continue
            if pedal.get(ins):
                # Under the pedal a new note of a pitch ends the sounding one.
                p = pitch[x]
                kept = []
                for i in notes:
                    if pitch[i] == p:
                        end[i] = time
                        if start[i] == time:
                            removed[i] = True  # zero length: note-seq deletes it
                    else:
                        kept.append(i)
                kept.append(x)
                active[ins] = kept
            else:
                notes.append(x)
        elif kind == _NOTE_OFF:
            ins = inst[x]
            if not pedal.get(ins):
                notes = active.get(ins)
                if notes and x in notes:
                    notes.remove(x)
        elif kind == _SUSTAIN_ON:
            pedal[x] = True
        else:
            pedal[x] = False
            notes = active.get(x)
            if notes:
                kept = []
                for i in notes:
                    if end[i] < time:
                        end[i] = time  # held by the pedal until now
                    else:
                        kept.append(i)
                active[x] = kept
    for notes in active.values():  # still held when the piece ends
        for i in notes:
            end[i] = time
    return np.asarray(end, np.float64), removed
