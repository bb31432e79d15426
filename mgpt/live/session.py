"""A client's session: its `Stream` on a worker thread of its own, and the checks on what it is sent.

The event loop that reads a client's messages only checks them and puts them in the session's
inbox; the worker thread feeds them to the stream and draws the model's events, so sampling
never blocks input. Each outgoing message goes to `send` (a callable that must be safe to call
from the worker thread) the moment it exists. A bad message (not JSON, an unknown type, a note
out of order or in the future, a setting out of range, more than MAX_EVENTS_PER_S notes) gets
one {"type": "error", "line": ...} back and changes nothing; the session goes on.

Times on the wire are the client's milliseconds (performance.now() on the page); `hello` tells
the session the client's clock, and every model note leaves with the client time it is meant to
sound at (`t`), the time it left (`sent`), its answer and the settings version it was drawn with.
"""

from __future__ import annotations

import base64
import collections
import json
import threading
import time
import traceback

from mgpt.errors import UserError
from mgpt.live.stream import Note, Stream

MAX_EVENTS_PER_S = 200  # a player's notes and pedals; a flood past it is dropped, with one line a second
MAX_INBOX = 1000
ALL_SOUND_OFF, ALL_NOTES_OFF = 120, 123  # MIDI's panic CCs: the player's keys are all up
FUTURE_MS = 1000  # a note may be stamped this far ahead of the session's clock (jitter), not more


class Session:
    """One client's stream and worker thread. `send(dict)`; `clock()` seconds (monotonic)."""

    def __init__(self, run, send, clock=time.monotonic, stream: Stream | None = None):
        self.send = send
        self.clock = clock
        self.stream = stream or Stream(run, origin=clock())
        self.offset_ms = 0.0  # client ms + offset_ms = session clock ms
        self.last_t = None
        self.inbox: collections.deque = collections.deque()
        self.wake = threading.Condition()
        self.closed = False
        self.bucket = (float(MAX_EVENTS_PER_S), clock())
        self.dropped = 0
        self.last_drop_report = 0.0
        self.thread = threading.Thread(target=self._work, name="mgpt-live-session", daemon=True)

    def start(self) -> None:
        s = self.stream
        spec = s.vocab.controls
        controls = None if spec is None else {  # what the page offers: each control's levels the model knows
            "seconds": spec["seconds"], "levels": spec["levels"],
            "seen": spec.get("seen") or {}}
        self.send({"type": "ready", "styles": s.styles, "settings": s.settings.to_dict(), "fim": bool(s.vocab.fim),
                   "pitch_range": [s.vocab.min_pitch, s.vocab.max_pitch], "version": s.version,
                   "controls": controls})
        self.thread.start()

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()

    def join(self, timeout=None) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ------------------------------------------------------------------ input (the event loop's side)
    def receive(self, raw) -> None:
        """A message from the client: checked here, applied on the worker thread."""
        try:
            msg = self._check(raw)
        except UserError as e:
            self.send({"type": "error", "line": str(e)})
            return
        if msg is None:
            return
        with self.wake:
            if len(self.inbox) >= MAX_INBOX:
                self.dropped += 1
            else:
                self.inbox.append(msg)
                self.wake.notify()

    def _check(self, raw) -> dict | None:
        if isinstance(raw, bytes):
            raise UserError("messages are JSON text, not binary")
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError):
            raise UserError(f"not JSON: {str(raw)[:60]!r}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise UserError('a message is a JSON object with a "type"')
        kind = msg["type"]
        if kind == "hello":
            now = _number(msg, "now")
            self.offset_ms = self.clock() * 1000 - now
            self.last_t = None
            return None
        if kind in ("note", "cc"):
            t = _number(msg, "t")
            if kind == "note":
                if not isinstance(msg.get("on"), bool):
                    raise UserError('note: "on" must be true or false')
                pitch, vel = _number(msg, "pitch"), _number(msg, "vel", 64)
                if pitch != int(pitch) or not 0 <= pitch <= 127 or not 0 <= vel <= 127:
                    raise UserError(f"note: pitch {pitch!r} and vel {vel!r} must be MIDI numbers 0..127")
            else:
                cc, value = _number(msg, "cc"), _number(msg, "value")
                if not (0 <= cc <= 127 and 0 <= value <= 127):
                    raise UserError(f"cc: cc {cc!r} and value {value!r} must be MIDI numbers 0..127")
            if self.last_t is not None and t < self.last_t:
                raise UserError(f"{kind} at t={t:g} ms is out of order (the last was at {self.last_t:g} ms); dropped")
            if (t + self.offset_ms) - self.clock() * 1000 > FUTURE_MS:
                raise UserError(f"{kind} at t={t:g} ms is {(t + self.offset_ms) / 1000 - self.clock():.1f} s in the "
                                "future of this session's clock; send hello with the page's clock first")
            if not self._allow():
                return None
            self.last_t = t
            return msg
        if kind == "set":
            changes = {k: v for k, v in msg.items() if k != "type"}
            self.stream.settings.updated(changes, self.stream.styles, self.stream.vocab)  # checked now, applied in order
            return msg
        if kind == "infill":
            a, b = _number(msg, "start"), _number(msg, "end")
            if not b > a:
                raise UserError(f"infill: end {b:g} ms must be after start {a:g} ms")
            return msg
        if kind in ("undo", "clear", "export"):
            return msg
        raise UserError(f"{kind!r}: not a message type (hello, note, cc, set, undo, clear, infill, export)")

    def _allow(self) -> bool:
        """A token bucket of MAX_EVENTS_PER_S notes; past it notes are dropped, said once a second."""
        level, at = self.bucket
        now = self.clock()
        level = min(float(MAX_EVENTS_PER_S), level + (now - at) * MAX_EVENTS_PER_S)
        ok = level >= 1
        self.bucket = (level - 1 if ok else level, now)
        if not ok:
            self.dropped += 1
            if now - self.last_drop_report >= 1:
                self.last_drop_report = now
                self.send({"type": "error", "line": f"more than {MAX_EVENTS_PER_S} notes a second: "
                                                    f"{self.dropped} dropped so far"})
        return ok

    # ------------------------------------------------------------------ the worker thread
    def _work(self) -> None:
        s = self.stream
        while True:
            with self.wake:
                while not self.inbox and not self.closed:
                    wake_at = s.next_wake(self.clock())
                    delay = None if wake_at is None else wake_at - self.clock()
                    if delay is not None and delay <= 0:
                        break
                    self.wake.wait(delay)
                if self.closed:
                    return
                batch = list(self.inbox)
                self.inbox.clear()
            try:
                for msg in batch:
                    try:
                        self._apply(msg)
                    except UserError as e:
                        self.send({"type": "error", "line": str(e)})
                s.advance(self.clock(), self._emit, interrupted=lambda: bool(self.inbox) or self.closed)
            except Exception as e:  # our bug: said in one line to the player, in full in the server's log
                traceback.print_exc()
                self.send({"type": "error", "line": f"internal error, the take was cleared: {type(e).__name__}: {e}"})
                s.clear(self.clock())

    def _apply(self, msg: dict) -> None:
        s = self.stream
        kind = msg["type"]
        if kind == "note":
            t = (msg["t"] + self.offset_ms) / 1000
            for item in s.user_note(msg["on"], int(msg["pitch"]), int(msg.get("vel", 64)), t):
                self._emit(item)
        elif kind == "cc":
            t = (msg["t"] + self.offset_ms) / 1000
            if int(msg["cc"]) == s.settings.pedal_cc and msg["value"] >= 64:
                for item in s.pedal(t):
                    self._emit(item)
            elif int(msg["cc"]) in (ALL_NOTES_OFF, ALL_SOUND_OFF):
                for item in s.all_notes_off(t):
                    self._emit(item)
        elif kind == "set":
            s.update({k: v for k, v in msg.items() if k != "type"})
            self.send({"type": "settings", "settings": s.settings.to_dict(), "version": s.version})
        elif kind == "undo":
            answer, out = s.undo()
            for item in out:
                self._emit(item)
            self.send({"type": "undone", "answer": answer})
        elif kind == "clear":
            s.clear(self.clock())
            self.last_t = None
            self.send({"type": "cleared"})
        elif kind == "infill":
            a, b = (msg["start"] + self.offset_ms) / 1000, (msg["end"] + self.offset_ms) / 1000
            s.infill(a, b)
            self.send({"type": "take", "notes": [self._client_note(n) for n in s.take_notes((a, b))],
                       "stretch": [msg["start"], msg["end"]]})
        elif kind == "export":
            self.send({"type": "midi", "data": base64.b64encode(self.midi_bytes()).decode()})

    def midi_bytes(self) -> bytes:
        """The take as a standard MIDI file (written by the project's renderer)."""
        import os
        import tempfile

        from mgpt import render

        ns = render.playable(self.stream.vocab.decode(self.stream.take()))
        with tempfile.TemporaryDirectory() as tmp:
            path = render.write_midi(ns, os.path.join(tmp, "take.mid"))
            return path.read_bytes()

    def _client_ms(self, t: float) -> float:
        return round(t * 1000 - self.offset_ms, 2)

    def _client_note(self, n: dict) -> dict:
        return {**n, "start": self._client_ms(n["start"]), "end": self._client_ms(n["end"])}

    def _emit(self, item) -> None:
        if isinstance(item, Note):
            self.send({"type": "note", "on": item.on, "pitch": item.pitch, "vel": item.velocity,
                       "t": self._client_ms(item.time), "answer": item.answer, "v": item.version,
                       "sent": self._client_ms(self.clock())})
        elif item[0] == "retract":
            self.send({"type": "retract", "after": self._client_ms(item[1])})
        elif item[0] == "answer":
            self.send({"type": "answer", "answer": item[1], "state": item[2], "sent": self._client_ms(self.clock())})


def _number(msg: dict, key: str, default=None) -> float:
    value = msg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) > 1e12:
        raise UserError(f'{msg.get("type")}: "{key}" must be a number, got {value!r}')
    return float(value)
