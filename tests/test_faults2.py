"""Faults of the second campaign (issue 24): nothing hangs, every mistake is one line.

Each test injects one fault and asserts what a user relies on; the ones that need a
subprocess use the tiny fixtures of tests/test_faults.py.
"""

import concurrent.futures
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
from test_faults import _tiny_config  # the first campaign's tiny config

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
    tries, hangs, budget = 0, [], time.time() + 20
    while time.time() < budget or tries < 6:
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


# ----------------------------------------------------------------------------- H2, H3: what cannot fit


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A complete 12-piece dataset (train, validation and test splits)."""
    base = tmp_path_factory.mktemp("data")
    midis = _midi_folder(base / "midi", 12)
    return build.build_dataset([f"midi_dir:{midis}"], base / "out", num_workers=1, split_percents=(60, 20, 20),
                               progress=False, verbose=False)


@pytest.mark.timeout(180)
def test_a_model_too_large_for_the_device_is_refused_before_initialising(dataset, tmp_path):
    from mgpt.train import loop as train
    from mgpt.errors import UserError

    config = _tiny_config(dataset)
    config.model.d_model = 200_000  # 3.5 TiB of weights and AdamW state
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"^config\.model: [\d,]+ parameters need 3\.5 TiB per device .* "
                                        r"more than the [\d.,]+ [GMT]iB of (host RAM|the container)") as e:
        train.train(config, str(tmp_path / "w"))
    assert "\n" not in str(e.value) and time.perf_counter() - start < 60
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.timeout(180)
def test_a_batch_too_large_for_the_device_is_refused_before_training(dataset, tmp_path):
    from mgpt.train import loop as train
    from mgpt.errors import UserError

    with pytest.raises(UserError, match=r"^config\.train\.batch_size=100000000: a train step needs at least "
                                        r"[\d.,]+ TiB per device \(100,000,000 rows x .* of activations") as e:
        train.train(_tiny_config(dataset, batch_size=100_000_000), str(tmp_path / "w"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_the_activation_estimate_grows_with_the_context_and_shrinks_with_remat():
    import jax

    from configs import tiny
    from mgpt.train import config as config_lib
    from mgpt.train import loop as train

    def per_row(seq_len, remat="none"):
        c = tiny.get_config()
        c.model.update(max_len=256, remat=remat)
        mesh, table = config_lib.validate_devices(c, jax.device_count(), 1)
        return train.activation_bytes_per_row(train.setup(c, 250, mesh, table), seq_len)

    short, long_ = per_row(64), per_row(128)
    # Logits alone are 4 bytes x 250 ids per event; attention scores grow with the square.
    assert short > 64 * 250 * 4 and long_ > 2 * short
    assert per_row(128, remat="full") < long_ / 2


# ----------------------------------------------------------------------------- T1: values of the wrong type


@pytest.mark.parametrize("flag, line", [
    ("--config.train.steps=abc", "--config.train.steps=abc: must be an integer"),
    ("--config.train.steps=2.5", "--config.train.steps=2.5: must be an integer"),
    ("--config.train.learning_rate=fast", "--config.train.learning_rate=fast: must be a number"),
])
def test_a_config_value_of_the_wrong_type_is_one_line(tmp_path, flag, line):
    out = subprocess.run([sys.executable, "-m", "mgpt.train", "--config=configs/tiny.py", f"--workdir={tmp_path}/w",
                          flag], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [line], out.stderr[-2000:]
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- T2: a bad config.init_from


@pytest.fixture(scope="module")
def tiny_run(dataset, tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4."""
    from mgpt.train import loop as train

    workdir = tmp_path_factory.mktemp("run") / "w"
    train.train(_tiny_config(dataset), str(workdir))
    return workdir


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, named", [
    ("a file", "no checkpoints there"),
    ("no vocab item", "checkpoint step 4 has no vocab item"),
    ("no config item", "checkpoint step 4 has no readable config item"),
])
def test_a_bad_init_from_is_one_line(dataset, tiny_run, tmp_path, damage, named):
    import shutil

    from mgpt.train import loop as train
    from mgpt.errors import UserError

    source = tmp_path / "a_file"
    if damage == "a file":
        source.write_text("not a run")
    else:
        source = _copy(tiny_run, tmp_path / "source")
        shutil.rmtree(source / "checkpoints" / "2")
        shutil.rmtree(source / "checkpoints" / "4" / ("vocab" if damage == "no vocab item" else "config"))
    config = _tiny_config(dataset)
    config.init_from = str(source)
    with pytest.raises(UserError, match=f"^config.init_from={source}: {named}") as e:
        train.train(config, str(tmp_path / "fresh"))
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "fresh").glob("checkpoints/*")) and not (tmp_path / "fresh" / "config.json").exists()


# ----------------------------------------------------------------------------- T3, T4: evaluation's inputs and outputs


def test_evaluate_into_a_folder_it_cannot_write_is_one_line(tiny_run, tmp_path, capsys):
    from mgpt import evaluate

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["evaluate", f"--workdir={tiny_run}", f"--output_dir={blocker}/out", "--num_samples=1",
                       "--noprogress"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"--output_dir={blocker}/out: cannot write there (Not a directory); pick another dir"]


@pytest.mark.parametrize("content, named", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text file"),
    (b"{}", "not a complete report of mgpt.evaluate (no 'likelihood')"),
    (b"[1, 2, 3]", "holds a JSON list, not a report"),
    (b'{"likelihood": 3}', "not a complete report of mgpt.evaluate (TypeError"),
])
def test_comparing_a_malformed_report_is_one_line(tmp_path, capsys, content, named):
    from mgpt import evaluate
    from mgpt.eval import compare

    bad = tmp_path / "bad" / "report.json"
    bad.parent.mkdir()
    bad.write_bytes(content)
    for main, argv in [(compare.main, ["compare", str(bad.parent), str(bad)]),
                       (evaluate.main, ["evaluate", "--compare", str(bad.parent), str(bad)])]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1 and named in err[0] and str(bad) in err[0], err


def _generated(tiny_run, tmp_path):
    from mgpt import generate

    out = tmp_path / "generated"
    generate.main(["generate", f"--workdir={tiny_run}", f"--output_dir={out}", "--num_samples=2", "--max_events=16",
                   "--noprogress"])
    return out


def test_evaluate_with_no_readable_generated_piece_is_one_line(tiny_run, tmp_path, capsys):
    from mgpt import evaluate

    generated = _generated(tiny_run, tmp_path)
    for mid in generated.glob("*.mid"):
        mid.write_bytes(b"MThd\x00\x00")  # cut short: no piece parses
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["evaluate", f"--workdir={tiny_run}", f"--output_dir={tmp_path}/eval",
                       f"--generated_dir={generated}"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err == [
        f"--generated_dir={generated}: none of the 2 pieces its manifest lists is a readable MIDI file with notes; "
        "regenerate them (python -m mgpt.generate)"]


# ----------------------------------------------------------------------------- W1: evaluation's vocabulary


def test_evaluate_refuses_a_dataset_whose_ids_mean_other_events(tiny_run, tmp_path, capsys):
    from mgpt import evaluate

    other = build.build_dataset([f"midi_dir:{_midi_folder(tmp_path / 'midi', 12)}"], tmp_path / "other",
                                num_workers=1, max_shift_steps=50, progress=False, verbose=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["evaluate", f"--workdir={tiny_run}", f"--output_dir={tmp_path}/eval", f"--dataset_dir={other}",
                       "--num_samples=1", "--noprogress"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"--dataset_dir={other}: its event vocabulary differs (max_shift_steps=50 there, 100 in "
                             f"the model in {tiny_run}")
    assert not (tmp_path / "eval" / "generated").exists(), "refused before generating anything"


# ----------------------------------------------------------------------------- T7: a damaged config.json


@pytest.mark.parametrize("content", ["", '{"model": {"d_mod', "[1, 2]"], ids=["empty", "truncated", "a list"])
def test_a_damaged_config_json_in_the_run_is_one_line(dataset, tiny_run, tmp_path, content):
    from mgpt.train import loop as train
    from mgpt.errors import UserError

    workdir = _copy(tiny_run, tmp_path / "w")
    (workdir / "config.json").write_text(content)
    with pytest.raises(UserError, match=f"^{workdir}/config.json: not a run config .*copy the newest over it") as e:
        train.train(_tiny_config(dataset, steps=6), str(workdir))
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


# ----------------------------------------------------------------------------- T6: damaged shards


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_shard_is_one_line_at_start_up(dataset, tmp_path, split, damage):
    from mgpt.train import loop as train
    from mgpt.errors import UserError

    data = _copy(dataset, tmp_path / "data")
    shard = next(data.glob(f"*-{split}.array_record-*"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2] if damage == "truncated" else b"")
    with pytest.raises(UserError, match=f"the {split} shard {shard} is damaged or truncated") as e:
        train.train(_tiny_config(data, eval_every=2), str(tmp_path / "w"))
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "w").glob("checkpoints/*")), "refused before training"


@pytest.mark.slow
def test_a_failed_evaluation_saves_a_checkpoint_before_it_stops(dataset, tmp_path, monkeypatch):
    from mgpt.train import checkpoint as ckpt_lib
    from mgpt.train import data as data_lib
    from mgpt.train import loop as train

    def unreadable(*args, **kwargs):
        raise IndexError("list index out of range")  # what a shard damaged after start-up gives

    monkeypatch.setattr(data_lib, "eval_batches", unreadable)
    workdir = tmp_path / "w"
    with pytest.raises(IndexError) as e:
        train.train(_tiny_config(dataset, eval_every=3, checkpoint_every=100, steps=6), str(workdir))
    assert ckpt_lib.finalized_steps(workdir / "checkpoints") == [3], "the three trained steps are kept"
    assert any("checkpoint" in note and "/3 was saved first" in note for note in e.value.__notes__)


# ----------------------------------------------------------------------------- W2: MFU never above 100 %


def test_mfu_never_reads_above_100_percent_when_the_peak_was_measured_on_busy_cores(capsys):
    import re

    from mgpt.train import monitor

    metrics = dict(loss=1.0, nats_per_event=1.0, events=10.0, grad_norm=1.0, param_norm=1.0, lr=1e-3)
    log = monitor.TrainLog(monitor.MetricWriter(None), total_steps=10, log_every=1, tokens_per_step=1000,
                           flops_per_token=1e6, peak_flops=1e6, peak_measured=True)  # a peak measured far too low
    for step, pause in enumerate([0.0, 0.01, 0.01, 0.2]):
        time.sleep(pause)
        log.add(step, metrics)
    out = capsys.readouterr().out
    mfu = [float(x) for x in re.findall(r"MFU ([\d.]+)%", out)]
    assert len(mfu) == 3 and max(mfu) <= 100.0 and mfu[-1] < 50, out
    assert out.count("note: training ran at") == 1, "said once, when the peak is first raised"
    # A datasheet peak is a fact, not a measurement: it is never raised.
    log = monitor.TrainLog(monitor.MetricWriter(None), total_steps=10, log_every=1, tokens_per_step=1000,
                           flops_per_token=1e6, peak_flops=1e6)
    log.add(0, metrics)
    time.sleep(0.01)
    log.add(1, metrics)
    assert "note:" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- O1, C2, C3, C4: the trainer's processes


def _start_training(dataset, workdir, *extra):
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "mgpt.train", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.data.dataset_dir={dataset}", "--config.train.steps=100000", "--config.train.eval_every=0",
         "--config.train.checkpoint_every=100000", "--config.train.log_every=1", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    out, err = [], []
    for stream, lines in ((proc.stdout, out), (proc.stderr, err)):
        threading.Thread(target=lambda s=stream, l=lines: l.extend(s), daemon=True).start()
    return proc, out, err


def _wait_for(lines, text, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if any(text in line for line in lines):
            return True
        time.sleep(0.05)
    return False


def _workers(pid):
    import psutil

    return [c for c in psutil.Process(pid).children(recursive=True) if "multiprocessing" in " ".join(c.cmdline())]


def _finish(proc, seconds=60):
    try:
        proc.wait(timeout=seconds)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_kill_9_of_a_trainer_takes_its_grain_workers_and_resource_tracker_along(dataset, tmp_path):
    import psutil

    proc, out, _ = _start_training(dataset, tmp_path / "w", "--config.data.workers=2")
    try:
        assert _wait_for(out, "step      3/", proc), out[-5:]
        children = _workers(proc.pid)
        assert len(children) >= 2, "a resource tracker and grain workers"
        proc.kill()
        proc.wait()
        deadline = time.time() + 15
        alive = children
        while alive and time.time() < deadline:
            alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.2)
        assert not alive, [" ".join(c.cmdline())[:80] for c in alive]
    finally:
        _finish(proc, 1)


@pytest.mark.slow
def test_ctrl_c_with_grain_workers_saves_and_no_worker_prints_a_traceback(dataset, tmp_path):
    proc, out, err = _start_training(dataset, tmp_path / "w", "--config.data.workers=2")
    try:
        assert _wait_for(out, "step      3/", proc), out[-5:]
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the workers too
        _finish(proc)
    finally:
        _finish(proc, 1)
    time.sleep(0.5)
    assert proc.returncode == 0 and "received SIGINT: saved checkpoint" in out[-1], (out[-2:], err[-5:])
    assert not [line for line in err if "Traceback" in line or "KeyboardInterrupt" in line], "".join(err)[-3000:]


@pytest.mark.slow
def test_a_killed_grain_worker_is_one_line_that_says_the_run_resumes(dataset, tmp_path):
    from mgpt.train import checkpoint as ckpt_lib

    workdir = tmp_path / "w"
    proc, out, err = _start_training(dataset, workdir, "--config.data.workers=2")
    try:
        assert _wait_for(out, "step      3/", proc), out[-5:]
        worker = [c for c in _workers(proc.pid) if "spawn_main" in " ".join(c.cmdline())][-1]
        worker.kill()
        _finish(proc)
    finally:
        _finish(proc, 1)
    time.sleep(0.5)
    lines = [line.strip() for line in err if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, "".join(err)[-3000:]
    assert "a data worker process (one of config.data.workers=2 per shard) died (killed by signal 9" in lines[0]
    assert lines[0].endswith("re-run the same command to resume")
    step = int(lines[0].split(":")[0].split()[1])
    assert ckpt_lib.finalized_steps(workdir / "checkpoints") == [step], "the steps trained so far are saved"


def _ctrl_c_training(dataset, workdir, after: str, delay: float = 0.0, twice: bool = False):
    """A trainer sent Ctrl-C `delay` s after its line containing `after` (twice: again 20 ms later),
    once it has ended: (process, stdout lines, stderr lines)."""
    proc, out, err = _start_training(dataset, workdir)
    try:
        assert _wait_for(out, after, proc), out[-5:]
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        if twice:
            time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGINT)
        _finish(proc)
    finally:
        _finish(proc, 1)
    time.sleep(0.5)  # the reader threads drain the pipes
    return proc, out, err


@pytest.mark.parametrize("when", ["start-up", pytest.param("second Ctrl-C", marks=pytest.mark.slow)])
def test_a_ctrl_c_that_cannot_save_is_one_line_saying_what_is_kept(dataset, tmp_path, when):
    if when == "start-up":
        proc, out, err = _ctrl_c_training(dataset, tmp_path / "w", "mesh:")
    else:
        proc, out, err = _ctrl_c_training(dataset, tmp_path / "w", "step      3/", twice=True)
    lines = [line.strip() for line in err if line.strip()]
    if when == "start-up":
        assert proc.returncode == 1 and lines == [f"interrupted: nothing was trained in {tmp_path / 'w'} "
                                                  "(no checkpoint yet)"], "".join(err)[-3000:]
    else:  # the second Ctrl-C either came after the save, or it says what it left out
        saved = proc.returncode == 0 and "received SIGINT: saved checkpoint" in out[-1]
        abandoned = proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("interrupted:")
        assert saved or abandoned, (out[-2:], "".join(err)[-3000:])
        assert "Traceback" not in "".join(err)


@pytest.mark.slow
def test_a_ctrl_c_anywhere_in_start_up_is_one_line_never_a_crash(dataset, tmp_path):
    # Raised as KeyboardInterrupt inside jax's compile of the initial state, a Ctrl-C printed its
    # line and then the interpreter died of SIGSEGV (or hung) on its way out, about half the time.
    interrupted_start_up = 0
    for i, delay in enumerate((0.4, 0.8, 1.2, 1.6, 2.0, 2.6, 3.4)):
        proc, out, err = _ctrl_c_training(dataset, tmp_path / f"w{i}", "mesh:", delay)
        lines = [line.strip() for line in err if line.strip()]
        if proc.returncode == 0:  # it had reached the loop (maybe its first step, not yet logged): the stop saved
            assert "received SIGINT: saved checkpoint" in out[-1], (delay, out[-2:])
        else:
            assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("interrupted: "), (
                delay, proc.returncode, "".join(err)[-2000:])
            interrupted_start_up += 1
    assert interrupted_start_up >= 3, "most of the moments must fall in start-up, or the test tests nothing"


# ----------------------------------------------------------------------------- B1: bench_input


def test_bench_input_measures_its_workers_before_they_are_reaped(dataset, monkeypatch):
    import importlib.util
    import math

    from configs import tiny
    from data_prep.vocab import Vocabulary
    from mgpt.train import data as data_lib

    spec = importlib.util.spec_from_file_location("bench_input", os.path.join(ROOT, "benchmarks", "bench_input.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # As on a fresh run: the worker exits after the iterator closes, so RUSAGE_CHILDREN has not counted it yet.
    monkeypatch.setattr(bench, "_children_cpu", lambda: 0.0)
    source = data_lib.open_source(dataset, "train", training_only=True)
    lengths = data_lib.piece_lengths(source)
    rate, main_rate, per_worker = bench.measure(source, Vocabulary.load(dataset), lengths, tiny.get_config(), 1, 0.5)
    assert rate > 0 and main_rate > 0 and math.isfinite(per_worker) and per_worker > 0


# ----------------------------------------------------------------------------- C5: a full disk while generating


def test_a_full_disk_while_generating_is_one_line_and_keeps_the_manifest(tiny_run, tmp_path, monkeypatch, capsys):
    import errno
    import sys as sys_

    from mgpt import generate
    from mgpt.sample import corpus

    real_write = corpus._write_piece
    written = []

    def fill_after_one(*args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(1)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(corpus, "_write_piece", fill_after_one)
    hooks = sys_.unraisablehook, threading_excepthook()
    out = tmp_path / "out"
    try:
        with pytest.raises(SystemExit) as e:
            generate.main(["generate", f"--workdir={tiny_run}", f"--output_dir={out}", "--num_samples=3",
                           "--max_events=8", "--batch_size=1", "--noprogress"])
    finally:  # the command quiets this process's hooks once the disk is full: put them back for other tests
        import threading

        from mgpt import errors

        sys_.unraisablehook, threading.excepthook = hooks
        errors._disk_full_reported.clear()
    assert str(e.value) == (f"disk full writing {out}: every piece its manifest.jsonl lists is complete; free some "
                            "space and re-run the same command to write the rest")
    entries = generate.read_all_manifests(out)
    assert len(entries) == 1 and (out / entries[0]["file"]).exists()


def threading_excepthook():
    import threading

    return threading.excepthook


# ----------------------------------------------------------------------------- C6: a long primer


@pytest.mark.slow
def test_a_long_primer_is_announced_once_even_without_progress(tiny_run, tmp_path, capsys):
    from mgpt import generate

    primer = tmp_path / "long.mid"
    primer.write_bytes(synthetic.piano_midi(0, num_notes=50_000))
    from mgpt.sample import run as sample_run

    assert primer.stat().st_size > sample_run.LONG_PRIMER_BYTES
    generate.main(["generate", f"--workdir={tiny_run}", f"--output_dir={tmp_path}/out", f"--primer={primer}",
                   "--primer_seconds=2", "--num_samples=1", "--max_events=4", "--noprogress"])
    err = capsys.readouterr().err.splitlines()
    said = [line for line in err if line.startswith("note: reading a long primer")]
    assert said == [f"note: reading a long primer, {primer} ({primer.stat().st_size / 2**20:.1f} MiB); "
                    "its first 2 s are kept"], err


# ----------------------------------------------------------------------------- C7: libtpu's start-up noise


def test_with_the_tpu_extra_installed_an_error_on_a_machine_without_a_tpu_is_still_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("the tpu extra (libtpu) is not installed: nothing could print its start-up errors")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-m", "mgpt.train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                          "--config.train.steps=abc"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["--config.train.steps=abc: must be an integer"]
    # and a command that does reach jax: the devices it lists, nothing from libtpu
    probe = subprocess.run([sys.executable, "-c", "import mgpt, jax; print(jax.devices()[0].platform)"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() in ("cpu", "gpu") and probe.stderr.strip() == "", probe.stderr[-500:]


# ----------------------------------------------------------------------------- C1: a damaged step in generate


@pytest.mark.slow
def test_falling_back_from_a_damaged_step_leaves_only_the_notice(tmp_path):
    """orbax abandons its other array reads when one fails; Python used to print each of them
    ("Exception ignored in: <coroutine ...>", 60-800 lines) after the one-line notice. It takes
    a model of a few dozen arrays (the small config's shape) for reads to be in flight."""
    import shutil

    from data_prep.vocab import Vocabulary
    from runs import save_untrained_run

    run = tmp_path / "w"
    save_untrained_run(str(run), Vocabulary(["bach", "chopin"]), 256, steps=(2, 4), num_layers=4, num_heads=4,
                       d_model=192, mlp_dim=512, scan_layers=False)
    shutil.rmtree(next((run / "checkpoints" / "4" / "params").glob("ocdbt.process_*")) / "d")
    out = subprocess.run([sys.executable, "-m", "mgpt.generate", f"--workdir={run}", f"--output_dir={tmp_path}/out",
                          "--num_samples=1", "--max_events=8", "--noprogress", "--max_copy_seconds=0",
                          "--max_note_seconds=8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[:3000]
    assert lines[0].startswith(f"checkpoint step 4 in {run}/checkpoints cannot be restored")
    assert lines[0].endswith("using step 2, the newest that restores")


def test_only_orbaxs_abandoned_reads_are_silenced_after_a_failed_restore(monkeypatch):
    """The same, without the race: coroutines that fail as they are closed, one with orbax's code
    file, one with ours. After a failed restore attempt only orbax's is dropped."""
    import gc

    from mgpt.train import checkpoint

    def abandoned_read(filename):
        scope = {}
        exec(compile("async def read(wait):\n    try:\n        await wait\n    finally:\n"
                     "        raise RuntimeError('array read failed')\n", filename, "exec"), scope)

        class Wait:
            def __await__(self):
                yield

        coroutine = scope["read"](Wait())
        coroutine.send(None)  # suspended mid-read; collecting it runs the finally
        return coroutine

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)

    def damaged():
        raise ValueError("OUT_OF_RANGE: a damaged step")

    assert checkpoint._attempt(damaged) == (None, "ValueError: OUT_OF_RANGE: a damaged step")
    ours, theirs = abandoned_read("/x/mgpt/sample/read.py"), abandoned_read("/x/orbax/checkpoint/read.py")
    del ours, theirs
    gc.collect()
    assert [u.object.cr_code.co_filename for u in seen] == ["/x/mgpt/sample/read.py"]
