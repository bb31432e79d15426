"""The same sessions on OS MIDI ports, for a DAW or a hardware instrument (no browser).

mido with the python-rtmidi backend (`pip install -e '.[live]'`), imported only here. Notes
and CCs from the input port go into a `Session` as the page's would; the model's notes are held
on a scheduler thread and written to the output port at the time they are meant to sound, and
a `retract` drops the ones not yet due.
"""

from __future__ import annotations

import heapq
import json
import threading
import time

from mgpt.errors import UserError

INSTALL = "pip install -e '.[live]' (mido and python-rtmidi)"


def open_ports(midi_in: str | None, midi_out: str | None):
    """(input port, output port) by name, or a UserError naming the flag."""
    try:
        import mido

        mido.set_backend("mido.backends.rtmidi", load=True)
    except ImportError:
        raise UserError(f"--midi_in/--midi_out need python-rtmidi: {INSTALL}") from None
    if not midi_in or not midi_out:
        raise UserError("--midi_in and --midi_out go together (the model listens on one and plays on the other)")
    if midi_in not in mido.get_input_names():
        raise UserError(f"--midi_in={midi_in}: no such input port; ports: {', '.join(mido.get_input_names()) or 'none'}")
    if midi_out not in mido.get_output_names():
        raise UserError(f"--midi_out={midi_out}: no such output port; ports: "
                        f"{', '.join(mido.get_output_names()) or 'none'}")
    return mido.open_input(midi_in), mido.open_output(midi_out)


class Scheduler:
    """Writes (time, message) pairs to `out` when due; `retract(after)` drops those after a time."""

    def __init__(self, out, clock=time.monotonic, channel: int = 1):
        self.out, self.clock, self.channel = out, clock, channel
        self.heap: list = []
        self.seq = 0
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="mgpt-live-midi-out")
        self.thread.start()

    def handle(self, msg: dict) -> None:
        """A session's outgoing message (times are its clock's ms: the session's offset is 0)."""
        import mido

        with self.cond:
            if msg["type"] == "note":
                kind = "note_on" if msg["on"] else "note_off"
                self.seq += 1
                heapq.heappush(self.heap, (msg["t"] / 1000, self.seq, mido.Message(
                    kind, note=msg["pitch"], velocity=msg["vel"], channel=self.channel)))
            elif msg["type"] == "retract":
                keep = [e for e in self.heap if e[0] <= msg["after"] / 1000 or e[2].type == "note_off"]
                self.heap = keep
                heapq.heapify(self.heap)
            elif msg["type"] == "error":
                print(f"live: {msg['line']}", flush=True)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join(5)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopped and (not self.heap or self.heap[0][0] > self.clock()):
                    self.cond.wait(None if not self.heap else self.heap[0][0] - self.clock())
                if self.stopped:
                    return
                _, _, message = heapq.heappop(self.heap)
            self.out.send(message)


def play(run, port_in, port_out, settings: dict | None = None) -> None:
    """Run one session between two open ports until Ctrl-C."""
    from mgpt.live.session import Session

    scheduler = Scheduler(port_out)
    session = Session(run, scheduler.handle)
    if settings:
        session.receive(json.dumps({"type": "set", **settings}))
    session.start()

    def listen(message) -> None:
        t = session.clock() * 1000  # the session's own clock: offset 0
        if message.type in ("note_on", "note_off"):
            on = message.type == "note_on" and message.velocity > 0
            session.receive(json.dumps({"type": "note", "on": on, "pitch": message.note, "vel": message.velocity,
                                        "t": t}))
        elif message.type == "control_change":
            session.receive(json.dumps({"type": "cc", "cc": message.control, "value": message.value, "t": t}))

    port_in.callback = listen
    print(f"mgpt live: listening on {port_in.name}, playing on {port_out.name} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        port_in.callback = None
        session.close()
        session.join(5)
        scheduler.stop()
        port_out.reset()
