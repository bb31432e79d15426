"""`python -m mgpt.live`: a local page that listens to what you play and answers in real time.

    stream.py   one musician's event stream: the model's KV cache fed event by event, the
                sampler's own per-event rule (mgpt.sample.sampler.choose_event), hand-over, accompaniment,
                undo and infilling; driven by an explicit clock, so tests and benchmarks can use it
    session.py  a stream on its own worker thread, with the input checks (one line per bad message)
    server.py   the HTTP + WebSocket server on the asyncio loop (loopback, same-origin only)
    ports.py    the same sessions on OS MIDI ports (mido + python-rtmidi, the `live` extra)
    static/     the page: keyboard, Web MIDI, Web Audio synth, piano roll, controls

May import mgpt.sample (the sampler, fill-in-the-middle and the `Run` API), mgpt.render and
mgpt.errors; never a command, training or evaluation. Nothing imports it.
"""
