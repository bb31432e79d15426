"""`python -m mgpt.live --workdir=runs/demo`: play with a trained model in the browser.

Starts a local server and prints its address; open it, play on the keyboard (mouse, touch, the
computer keyboard, or a MIDI device through Web MIDI), and the model answers. `--midi_in` and
`--midi_out` run the same session on OS MIDI ports instead (mido + python-rtmidi: the `live`
extra). It binds 127.0.0.1; `--host` changes that (with a warning: anyone who can reach it can
play on your machine).
"""

from __future__ import annotations

import sys
import warnings

from mgpt.errors import UserError, parse_command_flags, reported


@reported
def main(argv=None) -> None:
    from absl import flags, logging

    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Training run directory.", flag_values=fv)
    flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to load (default: the latest).", flag_values=fv)
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (default loopback only).", flag_values=fv)
    flags.DEFINE_integer("port", 8765, "Port to bind (0: any free one).", flag_values=fv)
    flags.DEFINE_integer("max_sessions", 4, "Players at once.", flag_values=fv)
    flags.DEFINE_string("midi_in", None, "Play from this OS MIDI input port instead of the page.", flag_values=fv)
    flags.DEFINE_string("midi_out", None, "Send the model's notes to this OS MIDI output port.", flag_values=fv)
    flags.DEFINE_string("mode", "continue", "MIDI ports: continue (call and response) or accompany.", flag_values=fv)
    flags.DEFINE_string("style", "unconditional", "MIDI ports: the style to play in.", flag_values=fv)
    argv = list(sys.argv if argv is None else argv)
    if not parse_command_flags(fv, argv, "mgpt.live", __doc__.rstrip()):
        return
    if not fv.workdir:
        raise UserError("usage: python -m mgpt.live --workdir=RUN [--port=8765] [--midi_in=NAME --midi_out=NAME]")
    if not 1 <= fv.max_sessions <= 64:
        raise UserError(f"--max_sessions={fv.max_sessions}: must be in 1..64")
    if not 0 <= fv.port <= 65535:
        raise UserError(f"--port={fv.port}: must be in 0..65535")
    logging.set_verbosity(logging.ERROR)
    warnings.filterwarnings("ignore", "Couldn't find ffmpeg", RuntimeWarning)
    ports = None
    if fv.midi_in or fv.midi_out:
        from mgpt.live import ports as ports_lib

        ports = ports_lib.open_ports(fv.midi_in, fv.midi_out)  # a missing extra or port: one line, before loading
    from mgpt.sample import run as generate
    from mgpt.live import stream

    _, config, _ = generate.read_run_info(fv.workdir, fv.checkpoint_step)  # a wrong workdir: one line, before the weights
    generate.keep_compiled(fv.workdir, config)  # a second start loads the warm-up's programs
    run = generate.load_run(fv.workdir, fv.checkpoint_step)
    print("warming up (compiling the sampler)...", flush=True)
    stream.warm_up(run)
    if ports is not None:
        from mgpt.live import ports as ports_lib

        ports_lib.play(run, *ports, settings={"mode": fv.mode, "style": fv.style})
        return
    _serve(run, fv.host, fv.port, fv.max_sessions)


def _serve(run, host: str, port: int, max_sessions: int) -> None:
    import asyncio

    from mgpt.live.server import Server

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host={host}: anyone who can reach this address can play through this machine",
              file=sys.stderr, flush=True)

    async def serve():
        server = Server(run, host=host, port=port, max_sessions=max_sessions)
        try:
            await server.start()
        except OSError as e:
            raise UserError(f"--port={port}: cannot listen on {host}:{port} ({e.strerror or e}); pick another "
                            "--port") from None
        print(f"mgpt live: open {server.url} (Ctrl-C stops)", flush=True)
        await asyncio.Future()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
