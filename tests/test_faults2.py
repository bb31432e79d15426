"""Faults of the second campaign (issue 24): nothing hangs, every mistake is one line.

Each test injects one fault and asserts what a user relies on; the ones that need a
subprocess use the tiny fixtures of tests/test_faults.py.
"""

import concurrent.futures
import json
import multiprocessing
import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest

from data_prep import build, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _midi_folder(folder, count, first=0, num_notes=40):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        (folder / f"p{i:03d}.mid").write_bytes(synthetic.piano_midi(i, num_notes=num_notes))
    return folder


# ----------------------------------------------------------------------------- H1: no hang after Ctrl-C


def _sleep(seconds):
    time.sleep(seconds)
    return seconds


def test_stopping_the_pool_ends_a_result_read_cut_off_by_the_kill():
    # What a worker killed halfway through sending its result leaves behind: the executor's
    # manager thread reading a message whose rest never comes. The interpreter joins that
    # thread at exit, so the build hung after printing its last line.
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    pool.submit(_sleep, 30)
    deadline = time.time() + 60
    while not pool._processes and time.time() < deadline:
        time.sleep(0.05)
    manager = pool._executor_manager_thread
    header = struct.pack("!i", 1000)  # a 1000-byte message, of which 10 bytes arrive
    os.write(pool._result_queue._writer.fileno(), header + b"x" * 10)
    time.sleep(0.5)  # the manager thread is now blocked in the read
    start = time.perf_counter()
    build._stop_now(pool)
    manager.join(timeout=10)
    assert not manager.is_alive(), "the executor's manager thread still waits for the rest of the message"
    assert time.perf_counter() - start < 6
    assert multiprocessing.active_children() == []


def _start_build(midis, out, *extra):
    """`data_prep.build` with 2 workers in its own process group, SIGINT as at a terminal."""
    return subprocess.Popen(
        [sys.executable, "-m", "data_prep.build", f"--source=midi_dir:{midis}", f"--output_dir={out}",
         "--num_workers=2", "--overwrite", *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _stderr_lines_timed(proc):
    """A thread collecting (time, line) of proc's stderr as they come."""
    import threading

    lines = []

    def read():
        for line in proc.stderr:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


@pytest.mark.slow
def test_ctrl_c_at_random_moments_of_a_build_never_hangs(tmp_path):
    midis = _midi_folder(tmp_path / "midi", 500, num_notes=300)
    out = tmp_path / "out"
    rng = random.Random(int(time.time()))
    tries, hangs, budget = 0, [], time.time() + 35
    while time.time() < budget or tries < 8:
        delay = rng.uniform(0.5, 3.5)
        proc = _start_build(midis, out)
        lines, reader = _stderr_lines_timed(proc)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
        try:
            proc.wait(timeout=20)
            ended = time.time()
            reader.join(timeout=5)
            last = [t for t, line in lines if line.strip() and "converting" not in line][-1:]
            if last and ended - last[0] > 5:
                hangs.append(f"Ctrl-C at {delay:.2f} s: exited {ended - last[0]:.1f} s after its last line")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            hangs.append(f"Ctrl-C at {delay:.2f} s: still alive 20 s later; last line {lines[-1:]}")
        tries += 1
    print(f"{tries} Ctrl-Cs at random moments of a 2-worker build, {len(hangs)} hangs")
    assert not hangs, hangs


_HANG_AT_EXIT = (
    "import sys, threading, time\n"
    "from absl import app\n"
    "from data_prep import build\n"
    "threading._register_atexit(lambda: time.sleep(120))  # clean-up that never ends, as a stuck pool's\n"
    "build._define_flags()\n"
    "app.run(build.main, argv=sys.argv)\n"
)


def test_a_second_ctrl_c_ends_a_build_stuck_after_its_last_line(tmp_path):
    midis = _midi_folder(tmp_path / "midi", 300, num_notes=300)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANG_AT_EXIT, f"--source=midi_dir:{midis}", f"--output_dir={tmp_path / 'out'}",
         "--num_workers=1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines, reader = _stderr_lines_timed(proc)
    try:
        deadline = time.time() + 60
        while not any("converting" in line for _, line in lines) and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        deadline = time.time() + 30
        while not any(line.startswith("interrupted") for _, line in lines) and time.time() < deadline:
            time.sleep(0.05)
        assert any(line.startswith("interrupted: nothing was written") for _, line in lines), lines[-3:]
        time.sleep(0.5)
        assert proc.poll() is None, "the injected clean-up holds the process"
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
