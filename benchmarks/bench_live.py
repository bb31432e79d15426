"""How `python -m mgpt.live` keeps up: hand-over, steering, real-time factor, and a soak.

    python benchmarks/bench_live.py --workdir=runs/demo                     # about 2 minutes
    python benchmarks/bench_live.py --workdir=runs/demo --soak_seconds=600  # the 10-minute soak

- hand-over: through the real server and a WebSocket client in continue mode (silence 600 ms):
  a phrase, then silence; from the end of the silence threshold (the phrase's last release +
  600 ms, client clock) to the answer's first NOTE_ON arriving. --trials phrases.
- steering: during an answer, a changed temperature: from sending it to the server's
  acknowledgement, after which every event is drawn with it (each note carries the version).
- real-time factor: --dense_seeds dense MAESTRO-like streams (--dense_rate notes/s, overlapping,
  velocities varying: 30+ events/s) fed to a session's stream in accompany mode with 500 ms of lookahead,
  the model playing along (every player's note goes in between the model's events already sent,
  which are re-fed behind it), one event per turn of the session, on a simulated clock as fast as
  the machine goes: seconds of music per second. With --peer (the default), the same players
  through the stream as it was before kept slides, REFILL and draws of 16, as a ratio. --profile=N prints the N
  functions that took longest (cProfile) in one more pass of it.
- browser end to end (--browser_trials, needs Chromium and Playwright): the page in headless
  Chromium with a fake Web MIDI keyboard; after a phrase, the hand-over pedal (a key event on
  the page) to the model's first note scheduled by the page.
- soak: the real server in accompany mode, 500 ms of lookahead, a client playing in real time
  for --soak_seconds; an under-run is a model note that arrives after its time (with how late);
  memory is the process's resident size after the first 10 % and at the end.

The last line, for scripts:
`live: hand-over p50 X ms, p95 Y ms, steering Z ms, real-time factor R x, under-runs U`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def dense_stream(seconds: float, rate: float, seed: int = 0):
    """(t, on, pitch, vel) sorted by time: `rate` notes/s, lengths 50-400 ms, chords now and then."""
    rng = np.random.default_rng(seed)
    events, t = [], 0.0
    held_until = {}
    while t < seconds:
        t += rng.exponential(1 / rate)
        for pitch in {int(rng.integers(36, 90)) for _ in range(1 + int(rng.random() < 0.2) * 2)}:
            if held_until.get(pitch, -1) > t:
                continue
            end = t + rng.uniform(0.05, 0.4)
            held_until[pitch] = end
            vel = int(rng.integers(40, 110))
            events += [(t, True, pitch, vel), (end, False, pitch, 0)]
    return sorted(events, key=lambda e: (e[0], e[1]))


def real_time_factor(run, seconds: float, rate: float, seeds=1, slide: str = "keep", refill: float | None = None,
                     max_draw: int | None = None) -> tuple[float, float, float, int]:
    """Seconds of dense playing per second of wall clock (and per CPU second of this process),
    over players `seeds` (a count, or which: dense_stream seed k, the stream's seed k), accompanied
    with 500 ms of lookahead: (wall factor, CPU factor, player events/s, model note events).
    `slide`, `refill` and `max_draw` (None: mgpt.live.stream's REFILL and MAX_DRAW) are the
    stream's, to measure what each is worth."""
    totals = _dense_totals(run, seconds, rate, range(seeds) if isinstance(seeds, int) else seeds, slide, refill,
                           max_draw)
    return _factors(totals)


def _factors(totals):
    music, wall, cpu, events_in, notes = totals
    return music / wall, music / cpu, events_in / music, notes


def _dense_totals(run, seconds, rate, seeds, slide, refill, max_draw) -> list:
    """[seconds of music, wall seconds, CPU seconds, player events, model note events] over `seeds`."""
    from mgpt.live import stream as stream_lib

    default_refill, default_draw = stream_lib.REFILL, stream_lib.MAX_DRAW
    stream_lib.REFILL = default_refill if refill is None else refill
    stream_lib.MAX_DRAW = default_draw if max_draw is None else max_draw
    totals = [0.0, 0.0, 0.0, 0, 0]
    try:
        for seed in seeds:
            stream = stream_lib.Stream(run, stream_lib.Settings(mode="accompany", guidance=run.default_guidance,
                                                                lookahead_ms=500, answer_seconds=2.0, seed=seed),
                                       origin=0.0, slide=slide)
            events = dense_stream(seconds, rate, seed)
            out = []
            start, cpu_start = time.perf_counter(), time.process_time()
            for t, on, pitch, vel in events:
                stream.user_note(on, pitch, vel, t)
                stream.advance(t, out.append)
            totals[1] += time.perf_counter() - start
            totals[2] += time.process_time() - cpu_start
            totals[0] += events[-1][0]
            totals[3] += len(events)
            totals[4] += sum(1 for x in out if hasattr(x, "on"))
    finally:
        stream_lib.REFILL, stream_lib.MAX_DRAW = default_refill, default_draw
    return totals


class Player:
    def __init__(self, url):
        from websockets.sync.client import connect

        self.ws = connect(url.replace("http://", "ws://") + "ws", origin=url.rstrip("/"), max_size=2**24,
                          max_queue=None)
        assert json.loads(self.ws.recv(timeout=30))["type"] == "ready"
        self.ws.send(json.dumps({"type": "hello", "now": self.now()}))

    @staticmethod
    def now():
        return time.monotonic() * 1000

    def send(self, **msg):
        self.ws.send(json.dumps(msg))

    def recv(self, timeout):
        return json.loads(self.ws.recv(timeout=timeout))

    def until(self, pred, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            m = self.recv(max(0.001, deadline - time.monotonic()))
            if pred(m):
                return m

    def note(self, on, pitch, vel=80):
        t = self.now()
        self.send(type="note", on=on, pitch=pitch, vel=vel, t=t)
        return t


def hand_over(url, trials: int, silence_ms: float = 600) -> list[float]:
    p = Player(url)
    p.send(type="set", mode="continue", silence_ms=silence_ms, answer_seconds=2.0)
    p.until(lambda m: m["type"] == "settings")
    rng = np.random.default_rng(1)
    latencies, silent = [], [0]
    for _ in range(trials):
        last = 0.0
        for _ in range(6):
            pitch = int(rng.integers(55, 80))
            p.note(True, pitch)
            time.sleep(0.12)
            last = p.note(False, pitch)
            time.sleep(0.03)
        m = p.until(lambda m: (m["type"] == "note" and m["on"]) or (m["type"] == "answer" and m["state"] == "end"),
                    timeout=30)
        if m["type"] == "note":  # (an answer that ends before any note has no first note to time)
            latencies.append(p.now() - (last + silence_ms))
            # The rest of this answer must not be taken for the next phrase's first note.
            p.until(lambda m: m["type"] == "answer" and m["state"] == "end", timeout=30)
        else:
            silent[0] += 1
    p.ws.close()
    if silent[0]:
        print(f"hand-over: {silent[0]} of {trials} answers ended before any note", flush=True)
    return latencies


def steering(url, changes: int) -> list[float]:
    p = Player(url)
    p.send(type="set", mode="continue", silence_ms=200, answer_seconds=60.0, lookahead_ms=500)
    p.until(lambda m: m["type"] == "settings")
    def phrase():
        for pitch in (60, 64, 67):
            p.note(True, pitch)
            time.sleep(0.1)
            p.note(False, pitch)
        p.until(lambda m: m["type"] == "note")

    phrase()
    out = []
    for k in range(changes):
        sent = p.now()
        p.send(type="set", temperature=0.8 + 0.1 * (k % 4))
        ack = p.until(lambda m: m["type"] == "settings")
        out.append(p.now() - sent)
        nxt = p.until(lambda m: m["type"] == "note" or (m["type"] == "answer" and m["state"] == "end"), timeout=30)
        if nxt["type"] == "note":
            assert nxt["v"] >= ack["version"], "a note drawn after the change carries its version"
        else:  # the model ended its answer: play again, so that the next change lands in one
            phrase()
        time.sleep(0.05)
    p.ws.close()
    return out


def soak(url, seconds: float) -> tuple[int, int, float, float]:
    p = Player(url)
    p.send(type="set", mode="accompany", lookahead_ms=500, answer_seconds=2.0)
    p.until(lambda m: m["type"] == "settings")
    received, late = [0], []
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            try:
                m = p.recv(0.2)
            except TimeoutError:
                continue
            except Exception:
                return
            if m["type"] == "note":
                received[0] += 1
                if p.now() > m["t"]:
                    late.append(p.now() - m["t"])

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    events = dense_stream(seconds, rate=6.0, seed=2)
    start = time.monotonic()
    mem_early = None
    for t, on, pitch, vel in events:
        delay = start + t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        p.note(on, pitch, vel)
        if mem_early is None and t > seconds * 0.1:
            mem_early = rss_mb()
    time.sleep(3)
    stop.set()
    reader.join(5)
    mem_end = rss_mb()
    p.ws.close()
    return received[0], late, mem_early or mem_end, mem_end


FAKE_KEYBOARD = """
(() => {
  const input = { id: 'in', name: 'bench keyboard', type: 'input', onmidimessage: null, state: 'connected' };
  navigator.requestMIDIAccess = async () => ({ inputs: new Map([['in', input]]), outputs: new Map(), onstatechange: null });
  window.benchKey = (data) => input.onmidimessage({ data: new Uint8Array(data), timeStamp: performance.now() });
})();
"""

TRIALS_JS = """async (trials) => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const out = [];
  while (!window.mgptLive.settings.pedal_cc) await sleep(20);
  for (let k = 0; k < trials; k++) {
    for (const p of [60, 64, 67]) { benchKey([0x90, p, 90]); await sleep(80); benchKey([0x80, p, 0]); await sleep(20); }
    const seen = window.mgptLive.stats.scheduledAt.length;
    const pedal = performance.now();
    benchKey([0xb0, window.mgptLive.settings.pedal_cc, 127]);
    while (window.mgptLive.stats.scheduledAt.length === seen && performance.now() - pedal < 5000) await sleep(0);
    if (window.mgptLive.stats.scheduledAt.length > seen) out.push(window.mgptLive.stats.scheduledAt[seen].at - pedal);
    await sleep(300);
  }
  return out;
}"""


def browser_end_to_end(url, trials: int) -> list[float] | None:
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        exe = None
    if exe is None:
        print("browser end to end: skipped (needs chromium and playwright)", flush=True)
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.add_init_script(FAKE_KEYBOARD)
            page.goto(url)
            page.wait_for_function("window.mgptLive && window.mgptLive.midiIn", timeout=30_000)
            return page.evaluate(TRIALS_JS, trials)
        finally:
            browser.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--dense_seconds", type=float, default=30.0)
    ap.add_argument("--dense_rate", type=float, default=16.0, help="notes/s (each is 2 events)")
    ap.add_argument("--dense_seeds", type=int, default=3, help="players (and stream seeds) the factor is over")
    ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                    help="also the stream as it was before kept slides, REFILL and draws of 16, on the same players")
    ap.add_argument("--soak_seconds", type=float, default=60.0)
    ap.add_argument("--browser_trials", type=int, default=20)
    ap.add_argument("--profile", type=int, default=0, help="print the top N functions of the dense part (0: off)")
    args = ap.parse_args()

    from absl import logging

    from mgpt.sample import run as generate
    from mgpt.live import stream
    from mgpt.live.server import Background

    logging.set_verbosity(logging.ERROR)
    run = generate.load_run(args.workdir)
    cfg = run.model.cfg
    print(f"model: {args.workdir} step {run.step}, {cfg.num_layers} layers, d_model {cfg.d_model}, context "
          f"{cfg.max_len}, guidance {run.default_guidance:g}; {os.cpu_count()} CPUs", flush=True)
    t = time.perf_counter()
    stream.warm_up(run)
    print(f"warm-up (compiling): {time.perf_counter() - t:.1f} s", flush=True)

    # The stream as it is, and (--peer) as it was before kept slides, REFILL and draws of 16 (it still
    # pads feeds as the stream does now): player by player, the two in turn, which first alternating.
    ours, peers = [0.0, 0.0, 0.0, 0, 0], [0.0, 0.0, 0.0, 0, 0]
    for seed in range(args.dense_seeds):
        runs = [(ours, ("keep", None, None))] + ([(peers, ("reprefill", 1.0, 8))] if args.peer else [])
        for totals, how in (runs if seed % 2 == 0 else runs[::-1]):
            for i, x in enumerate(_dense_totals(run, args.dense_seconds, args.dense_rate, [seed], *how)):
                totals[i] += x
    rtf, rtf_cpu, in_rate, model_notes = _factors(ours)
    print(f"real-time factor: {rtf:.1f}x wall clock ({rtf_cpu:.1f}x per CPU second of this process) on "
          f"{args.dense_seeds} x {args.dense_seconds:g} s of dense playing ({in_rate:.1f} player events/s), "
          f"accompany with 500 ms lookahead ({model_notes} model note events); load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    if args.peer:
        peer, _, _, peer_notes = _factors(peers)
        print(f"  the same players, windows re-prefilled at each slide, the lookahead topped up at every "
              f"call, draws of up to 8 events (as before kept slides; feeds padded as now), in turn with the "
              f"above: {peer:.1f}x ({model_notes} / {peer_notes} model note events); ratio {rtf / peer:.2f}",
              flush=True)
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(real_time_factor, run, args.dense_seconds, args.dense_rate)
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)

    with Background(run, max_sessions=4) as server:
        handover = hand_over(server.url, args.trials)
        print(f"hand-over: p50 {np.percentile(handover, 50):.1f} ms, p95 {np.percentile(handover, 95):.1f} ms, "
              f"max {max(handover):.1f} ms over {len(handover)} phrases", flush=True)
        steer = steering(server.url, args.changes)
        print(f"steering: p50 {np.percentile(steer, 50):.1f} ms, p95 {np.percentile(steer, 95):.1f} ms over "
              f"{len(steer)} changes", flush=True)
        e2e = browser_end_to_end(server.url, args.browser_trials) if args.browser_trials else None
        if e2e:
            print(f"browser end to end: p50 {np.percentile(e2e, 50):.1f} ms, p95 {np.percentile(e2e, 95):.1f} ms over "
                  f"{len(e2e)} pedals (pedal key event -> the model's first note scheduled by the page)", flush=True)
        received, late, mem_early, mem_end = soak(server.url, args.soak_seconds)
        lateness = f" (late by p50 {np.median(late):.0f} ms, max {max(late):.0f} ms)" if late else ""
        print(f"soak: {args.soak_seconds:g} s accompanying, {received} model notes, {len(late)} under-runs{lateness}; "
              f"resident memory {mem_early:.0f} MiB after 10 %, {mem_end:.0f} MiB at the end; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    print(f"live: hand-over p50 {np.percentile(handover, 50):.1f} ms, p95 {np.percentile(handover, 95):.1f} ms, "
          f"steering {np.percentile(steer, 95):.1f} ms, real-time factor {rtf:.1f} x, under-runs {len(late)}")


if __name__ == "__main__":
    main()
