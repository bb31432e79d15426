"""Faults: nothing lost, nothing hung, one line for every mistake (issue 12).

Each test injects one fault (a kill at a bad moment, a corrupt file, a careless flag)
and asserts the outcome a user relies on.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from data_prep import build, synthetic
from mgpt.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(progress=False, verbose=False)


def _midi_folder(folder, count, first=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        (folder / f"p{i:03d}.mid").write_bytes(synthetic.piano_midi(i, num_notes=40))
    return folder


@pytest.fixture(scope="module")
def old_dataset(tmp_path_factory):
    """A complete dataset (12 pieces) that later builds try to replace."""
    base = tmp_path_factory.mktemp("old")
    midis = _midi_folder(base / "midi", 12)
    out = base / "out"
    build.build_dataset([f"midi_dir:{midis}"], out, num_workers=1, **QUIET)
    return out


def _snapshot(output_dir):
    """Every file of the dataset in output_dir with its bytes."""
    path = build.dataset_path(output_dir)
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _loads(output_dir) -> int:
    import tensorflow_datasets as tfds

    return len(tfds.builder_from_directory(str(build.dataset_path(output_dir))).as_data_source("train"))


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- D1: atomic replacement


def test_interrupted_overwrite_keeps_the_old_dataset(old_dataset, tmp_path, monkeypatch):
    out = _copy(old_dataset, tmp_path / "out")
    before = _snapshot(out)
    new_midis = _midi_folder(tmp_path / "new", 8, first=100)
    real_read = build._Spool.read

    def read_then_die(self, split):  # Ctrl-C while TFDS writes the new records
        for i, record in enumerate(real_read(self, split)):
            if i == 3:
                raise KeyboardInterrupt
            yield record

    monkeypatch.setattr(build._Spool, "read", read_then_die)
    with pytest.raises(KeyboardInterrupt):
        build.build_dataset([f"midi_dir:{new_midis}"], out, num_workers=1, overwrite=True, **QUIET)
    assert _snapshot(out) == before, "the old dataset is untouched"
    assert build.is_complete(build.dataset_path(out)) and _loads(out) > 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(old_dataset)), "no work folders are left behind"

    monkeypatch.setattr(build._Spool, "read", real_read)
    build.build_dataset([f"midi_dir:{new_midis}"], out, num_workers=1, overwrite=True, **QUIET)
    summary = json.loads((build.dataset_path(out) / "build.json").read_text())
    assert summary["inputs"] == 8, "the complete new dataset replaced the old one"


def test_a_build_killed_between_two_renames_puts_the_old_dataset_back(old_dataset, tmp_path, monkeypatch):
    # Filesystems without renameat2(RENAME_EXCHANGE) swap by two renames; a kill between them
    # must not lose the old dataset.
    out = _copy(old_dataset, tmp_path / "out")
    before = _snapshot(out)
    monkeypatch.setattr(build, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def die_after_first_rename(src, dst):
        real_rename(src, dst)
        if str(dst).endswith(".replaced"):
            raise KeyboardInterrupt

    monkeypatch.setattr(build.os, "rename", die_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        build.build_dataset([f"midi_dir:{_midi_folder(tmp_path / 'new', 4)}"], out, num_workers=1, overwrite=True,
                            **QUIET)
    monkeypatch.setattr(build.os, "rename", real_rename)
    from mgpt.train import data as data_lib

    # The old dataset is at *.replaced now; training (or the next build) first puts it back.
    assert data_lib.resolve_dataset(str(build.dataset_path(out))) == build.dataset_path(out)
    assert _snapshot(out) == before and _loads(out) > 0
    assert not build.dataset_path(out).with_name("1.0.0.replaced").exists()
    with pytest.raises(ValueError, match="already holds a dataset"):
        build.build_dataset([f"midi_dir:{tmp_path / 'new'}"], out, num_workers=1, **QUIET)
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------- D6, D7: build workers


def test_a_failed_build_stops_its_workers_at_once(tmp_path, monkeypatch):
    midis = _midi_folder(tmp_path / "midi", 40)
    real_add = build._Spool.add
    calls = []

    def interrupt_on_second(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_add(self, *args)

    monkeypatch.setattr(build._Spool, "add", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt) as caught:
        build.build_dataset([f"midi_dir:{midis}"], tmp_path / "out", num_workers=2, **QUIET)
    # The traceback (held by `caught`, as by any error report) must not keep workers alive.
    assert caught.traceback is not None
    assert multiprocessing.active_children() == []


def _descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _build_until_its_workers_run(midis, out, **popen):
    """Starts a 2-worker `data_prep.build` of `midis` into `out` and waits (up to 60 s, while it
    runs) until both workers are seen: (the build's Popen, its two worker processes)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep.build", f"--source=midi_dir:{midis}", f"--output_dir={out}",
         "--num_workers=2", "--overwrite"],
        cwd=ROOT, stdout=subprocess.DEVNULL, **popen,
    )
    workers, deadline = [], time.time() + 60
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = [c for c in _descendants(proc.pid) if "spawn_main" in " ".join(c.cmdline())]
        time.sleep(0.05)
    return proc, workers


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_killing_a_build_takes_its_workers_along(old_dataset, tmp_path, sig):
    out = _copy(old_dataset, tmp_path / "out")
    before = _snapshot(out)
    midis = _midi_folder(tmp_path / "midi", 60, first=200)
    proc, workers = _build_until_its_workers_run(midis, out, stderr=subprocess.DEVNULL)
    children = []
    try:
        children = _descendants(proc.pid)
        assert len(workers) >= 2, "the build ended before its workers could be seen"
        proc.send_signal(sig)  # as the OOM killer (SIGKILL) or a job scheduler (SIGTERM) would
        proc.wait(timeout=10)
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(c) for c in children):
            time.sleep(0.1)
        assert not [c.pid for c in children if _alive(c)], "workers outlived the build"
    finally:
        for c in children:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
    assert _snapshot(out) == before


_INTERRUPT_AFTER_THE_SWAP = (
    "import sys\n"
    "from absl import app\n"
    "from data_prep import build\n"
    "def ctrl_c(*args):\n"
    "    raise KeyboardInterrupt\n"
    "build._print_summary = ctrl_c  # Ctrl-C while the summary prints: the new dataset is in place\n"
    "build._define_flags()\n"
    "app.run(build.main, argv=sys.argv)\n"
)


_INTERRUPT_WHILE_DELETING_THE_OLD = (
    "import shutil, sys\n"
    "from absl import app\n"
    "from data_prep import build\n"
    "swap, rmtree, old = build._swap_in, shutil.rmtree, []\n"
    "def swap_in(new, path):\n"
    "    old.append(swap(new, path))\n"
    "    return old[-1]\n"
    "def rmtree_old(p, *a, **k):\n"
    "    if old and p == old[-1]:\n"
    "        raise KeyboardInterrupt  # Ctrl-C while the replaced dataset is deleted\n"
    "    return rmtree(p, *a, **k)\n"
    "build._swap_in, build.shutil.rmtree = swap_in, rmtree_old\n"
    "build._define_flags()\n"
    "app.run(build.main, argv=sys.argv)\n"
)


@pytest.mark.parametrize("when", ["summary", "deleting the old dataset"])
def test_ctrl_c_after_the_swap_says_the_new_dataset_is_written(tmp_path, when):
    out = tmp_path / "out"
    midi = _midi_folder(tmp_path / "midi", 2)
    script, overwrite = _INTERRUPT_AFTER_THE_SWAP, []
    if when == "deleting the old dataset":
        build.build_dataset([f"midi_dir:{midi}"], str(out), num_workers=1, progress=False, verbose=False)
        script, overwrite = _INTERRUPT_WHILE_DELETING_THE_OLD, ["--overwrite"]
    proc = subprocess.run([sys.executable, "-c", script, f"--source=midi_dir:{midi}", f"--output_dir={out}",
                           "--num_workers=1", *overwrite], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "converting" not in line
             and not line.startswith("writing ")]
    assert proc.returncode == 1
    assert lines == [f"interrupted after the new dataset was complete: {build.dataset_path(out)} holds it"], proc.stderr
    assert build.is_complete(build.dataset_path(out))


# ----------------------------------------------------------------------------- D2 and half-written steps


def _tiny_config(dataset_dir, **train):
    from configs import tiny

    c = tiny.get_config()
    c.data.dataset_dir = str(dataset_dir)
    c.train.update(dict(steps=4, checkpoint_every=2, eval_every=0, log_every=2, warmup_steps=1, keep_checkpoints=3))
    c.train.update(train)
    return c


@pytest.fixture(scope="module")
def tiny_run(old_dataset, tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4."""
    from mgpt.train import loop as train

    workdir = tmp_path_factory.mktemp("run") / "w"
    result = train.train(_tiny_config(build.dataset_path(old_dataset)), str(workdir))
    return workdir, result


def _truncate_params(step_dir):
    """Cut the largest file of a step's params in half, as a full disk or a kill mid-copy would."""
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def test_resume_falls_back_to_the_newest_step_that_restores(old_dataset, tiny_run, tmp_path, capsys):
    from mgpt.train import loop as train

    workdir = _copy(tiny_run[0], tmp_path / "w")
    _truncate_params(workdir / "checkpoints" / "4")
    capsys.readouterr()
    result = train.train(_tiny_config(build.dataset_path(old_dataset), steps=6), str(workdir))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "cannot be restored" in line]
    assert len(lines) == 1 and "step 4" in lines[0] and "using step 2" in lines[0], out
    assert min(result["losses"]) == 3 and result["step"] == 6
    assert result["losses"][3] == tiny_run[1]["losses"][3], "the fallback resumes exactly where step 2 left off"
    assert (workdir / "checkpoints" / "4.unreadable").is_dir(), "the damaged step is kept for inspection"


def test_resume_refuses_in_one_line_when_no_step_restores_and_renames_nothing(old_dataset, tiny_run, tmp_path):
    from mgpt.train import checkpoint as ckpt_lib
    from mgpt.train import loop as train

    workdir = _copy(tiny_run[0], tmp_path / "w")
    for step in ("2", "4"):
        _truncate_params(workdir / "checkpoints" / step)
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint step restores") as e:
        train.train(_tiny_config(build.dataset_path(old_dataset), steps=6), str(workdir))
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"], "a changed config looks alike"


def test_inference_falls_back_and_refuses_only_when_nothing_restores(tiny_run, tmp_path, capsys):
    from mgpt.train import checkpoint as ckpt_lib
    from mgpt import generate

    workdir = _copy(tiny_run[0], tmp_path / "w")
    _truncate_params(workdir / "checkpoints" / "4")
    (workdir / "checkpoints" / "2" / "config" / "metadata").write_text("{not json")
    # Step 2's config is damaged too: nothing of steps 4 and 2 restores.
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt_lib.restore_model(str(workdir))
    assert "\n" not in str(e.value) and "no checkpoint step restores" in str(e.value)

    _copy(tiny_run[0] / "checkpoints" / "2", tmp_path / "good2")
    import shutil

    shutil.rmtree(workdir / "checkpoints" / "2")
    shutil.copytree(tmp_path / "good2", workdir / "checkpoints" / "2")
    capsys.readouterr()
    _, _, _, step = ckpt_lib.restore_model(str(workdir))
    err = capsys.readouterr().err.strip().splitlines()
    assert step == 2 and len(err) == 1 and "step 4" in err[0] and "using step 2" in err[0]
    # The reason is tensorstore's wrapped error, not its spec ("See full TensorStore details: <bound method …").
    assert "Requested byte range" in err[0] and "TensorStore details" not in err[0] and "pybind" not in err[0]
    (workdir / "checkpoints" / "4" / "vocab" / "metadata").write_text('{"tokens": 7}')  # tampered
    assert generate.read_run_info(str(workdir))[2] == 2 and ckpt_lib.restore_model(str(workdir))[3] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocab" in err[0] and "using step 2" in err[0], "said once, though looked up twice"
    with pytest.raises(SystemExit) as e:  # a step asked for by name is never swapped for another
        generate.main(["generate", f"--workdir={workdir}", "--checkpoint_step=4", f"--output_dir={tmp_path}/o",
                       "--num_samples=1", "--max_events=4", "--noprogress"])
    assert "\n" not in str(e.value) and "/4: cannot be restored" in str(e.value)


def test_a_step_orbax_has_not_finalized_is_never_read(tiny_run, tmp_path, monkeypatch):
    # On gs:// orbax writes into the step folder and marks it complete with a commit file.
    # Treat a local folder as such a bucket: step 4 has no commit file (a live or killed save).
    from orbax.checkpoint._src.path import gcs_utils

    from mgpt.train import checkpoint as ckpt_lib

    workdir = _copy(tiny_run[0], tmp_path / "w")
    (workdir / "checkpoints" / "4" / "commit_success.txt").unlink()
    monkeypatch.setattr(gcs_utils, "is_gcs_path", lambda path: True)
    assert ckpt_lib.locate(workdir)[1] == 2
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 4"):
        ckpt_lib.locate(workdir / "checkpoints" / "4")


# ----------------------------------------------------------------------------- D3: the workdir lock

_HOLD_LOCK = (
    "import sys, time\n"
    "from mgpt.train.workdir_lock import WorkdirLock\n"
    "WorkdirLock(sys.argv[1]).__enter__()\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_second_trainer_stops_at_once_naming_the_first(old_dataset, tmp_path):
    import socket

    from mgpt.train.workdir_lock import WorkdirLock

    workdir = tmp_path / "w"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(workdir)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            [sys.executable, "-m", "mgpt.train", "--config=configs/tiny.py", f"--workdir={workdir}",
             f"--config.data.dataset_dir={build.dataset_path(old_dataset)}"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]  # a user error
        assert f"pid {holder.pid} on host {socket.gethostname()}" in lines[0] and f"--workdir={workdir}" in lines[0]
        assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing anything; its lock file (naming it) is still there.
    assert f'"pid": {holder.pid}' in (workdir / "lock").read_text()
    with WorkdirLock(workdir):
        assert f'"pid": {os.getpid()}' in (workdir / "lock").read_text()
    with WorkdirLock(workdir):  # released on exit: the next run takes it again
        pass


def test_a_workdir_that_cannot_be_created_or_locked_is_one_line(old_dataset, tmp_path, capsys):
    from mgpt.train import loop as train
    from mgpt.errors import reported
    from mgpt.train.workdir_lock import WorkdirLock

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = _tiny_config(build.dataset_path(old_dataset))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # as `python -m mgpt.train --workdir=a_file/w` runs it
        reported(train.main)(["train"], config, str(blocker / "w"))
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"--workdir={blocker}/w: cannot write there (Not a directory: {blocker}/w); pick another --workdir"
    ]
    workdir = tmp_path / "w"
    (workdir / "lock").mkdir(parents=True)  # a lock file that cannot be opened (root ignores read-only modes)
    with pytest.raises(UserError, match=f"--workdir={workdir}: cannot write there .*{workdir}/lock") as e:
        WorkdirLock(workdir).__enter__()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- D4, D5: dataset and vocabulary


def test_dataset_dir_may_be_the_build_output_dir_and_anything_else_is_one_line(old_dataset, tmp_path):
    from mgpt.train import data as data_lib

    assert data_lib.resolve_dataset(str(old_dataset)) == build.dataset_path(old_dataset)
    assert data_lib.resolve_dataset(str(old_dataset / build.DATASET_NAME)) == build.dataset_path(old_dataset)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a dataset")
    for bad in (tmp_path / "empty", tmp_path / "file", tmp_path / "missing"):
        with pytest.raises(UserError, match=f"config.data.dataset_dir={bad}: no dataset there"):
            data_lib.resolve_dataset(str(bad))
    _copy(build.dataset_path(old_dataset), tmp_path / "two" / "a")
    _copy(build.dataset_path(old_dataset), tmp_path / "two" / "b")
    with pytest.raises(UserError, match="holds 2 datasets"):
        data_lib.resolve_dataset(str(tmp_path / "two"))
    # '.' (a folder of datasets, or not) is a name like any other, not a traceback.
    with pytest.raises(UserError, match="holds 2 datasets"):
        data_lib.resolve_dataset(str(tmp_path / "two" / "."))
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "empty")
        with pytest.raises(UserError, match=r"config.data.dataset_dir=\.: no dataset there"):
            data_lib.resolve_dataset(".")
    finally:
        os.chdir(cwd)


def _workdir_with_dataset(tiny_run, old_dataset, tmp_path, **vocab_settings):
    """A copy of the tiny run, and a copy of its dataset whose vocab.json has other settings."""
    from data_prep.vocab import Vocabulary

    workdir = _copy(tiny_run[0], tmp_path / "w")
    data = _copy(old_dataset, tmp_path / "data")
    if vocab_settings:
        Vocabulary(**vocab_settings).save(build.dataset_path(data) / "vocab.json")
    return workdir, build.dataset_path(data)


@pytest.mark.parametrize("settings, warm_start, named", [
    (dict(num_velocity_bins=16), False, "num_velocity_bins=16 there, 32 in the run"),
    (dict(steps_per_second=50), False, "steps_per_second=50 there, 100 in the run"),
    (dict(num_velocity_bins=16), True, "num_velocity_bins=16 there, 32 in config.init_from="),
], ids=["resume-velocity", "resume-steps", "warm-start"])
def test_resume_or_warm_start_refuses_a_dataset_whose_ids_mean_other_events(tiny_run, old_dataset, tmp_path, settings,
                                                                             warm_start, named):
    from mgpt.train import loop as train

    workdir, data = _workdir_with_dataset(tiny_run, old_dataset, tmp_path, **settings)
    config = _tiny_config(data, steps=6)
    if warm_start:  # a fresh run that starts from the tiny run's weights
        config.init_from = str(workdir)
        workdir = tmp_path / "fresh"
    with pytest.raises(UserError, match=named) as e:
        train.train(config, str(workdir))
    assert "\n" not in str(e.value)


def test_a_tampered_vocab_json_is_one_line(tiny_run, old_dataset, tmp_path):
    from mgpt.train import loop as train

    workdir, data = _workdir_with_dataset(tiny_run, old_dataset, tmp_path)
    vocab_json = workdir / "vocab.json"
    vocab_json.write_text(vocab_json.read_text().replace('"NOTE_ON:60"', '"NOTE_ON:61"'))
    with pytest.raises(UserError, match=f"{vocab_json}: token list does not match") as e:
        train.train(_tiny_config(data, steps=6), str(workdir))
    assert "\n" not in str(e.value)
    vocab_json.write_text('{"tokens": [')
    with pytest.raises(UserError, match=f"{vocab_json}: not valid JSON"):
        train.train(_tiny_config(data, steps=6), str(workdir))


# ----------------------------------------------------------------------------- one line for every mistake


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a disk that fills up. Needs the right to mount (root in a container)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the disk-full path is not exercised")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_while_training_is_one_line_and_keeps_the_last_checkpoint(old_dataset, small_disk):
    from mgpt.train import checkpoint as ckpt_lib

    workdir = small_disk / "w"  # params + AdamW state are 1.2 MiB a step: the second save fills the disk
    out = subprocess.run(
        [sys.executable, "-m", "mgpt.train", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.data.dataset_dir={build.dataset_path(old_dataset)}", "--config.train.steps=6",
         "--config.train.checkpoint_every=2", "--config.train.eval_every=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == (f"disk full writing {workdir}: nothing complete was lost (last complete checkpoint: step 2); "
                         "free some space and re-run to resume"), out.stderr[-3000:]
    # Nothing else: tensorstore's late writers finding orbax's loop closed (one traceback per
    # thread, interleaved) are dropped by the train command's unraisable hook.
    assert lines == lines[-1:], out.stderr[-3000:]
    assert ckpt_lib.locate(workdir)[1] == 2


def test_after_a_full_disk_is_reported_writes_never_started_say_nothing_at_exit():
    """orbax's queued writes that never started warn at exit that they "were never awaited": CI once
    printed that after the disk-full line. Once the line is reported, they say nothing."""
    code = ("from mgpt import errors\n"
            "async def write_fragment(): pass\n"
            "class Pending: pass\n"
            "pending = Pending(); pending.write = write_fragment()\n"  # collected only at exit
            "errors.quiet_after_disk_full()\n"
            "print('disk full writing out: nothing complete was lost', file=__import__('sys').stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stderr.strip().splitlines() == ["disk full writing out: nothing complete was lost"], out.stderr


def test_disk_full_while_building_is_one_line(small_disk, tmp_path):
    midis = _midi_folder(tmp_path / "midi", 12)
    (small_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 80 * 2**10))  # leave 80 KiB
    out = subprocess.run([sys.executable, "-m", "data_prep.build", f"--source=midi_dir:{midis}",
                          f"--output_dir={small_disk / 'out'}", "--num_workers=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"disk full writing {small_disk / 'out'}: nothing was written")
    assert "Traceback" not in out.stderr


def test_a_misspelled_config_field_names_the_closest_one(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mgpt.train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                          "--config.train.stepz=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2  # a user error
    assert out.stderr.strip().splitlines() == [
        "--config.train.stepz: configs/tiny.py has no field train.stepz; did you mean --config.train.steps?"
    ]


def test_an_output_dir_that_cannot_be_written_is_one_line(tiny_run, tmp_path):
    from mgpt import generate

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=f"--output_dir={blocker}/out: cannot write there"):
        build.build_dataset([f"midi_dir:{_midi_folder(tmp_path / 'midi', 2)}"], blocker / "out", **QUIET)
    with pytest.raises(SystemExit) as e:
        generate.main(["generate", f"--workdir={tiny_run[0]}", f"--output_dir={blocker}/out", "--num_samples=1",
                       "--max_events=4", "--noprogress"])
    assert str(e.value).startswith(f"--output_dir={blocker}/out: cannot write there") and "\n" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_one_line(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    with pytest.raises(ValueError, match="cannot write there"):
        build.build_dataset([f"midi_dir:{_midi_folder(tmp_path / 'midi', 2)}"], read_only / "out", **QUIET)


def test_workdir_json_files_change_only_by_one_rename(tmp_path, monkeypatch):
    from etils import epath

    from mgpt.train import checkpoint as ckpt_lib

    path = epath.Path(tmp_path) / "config.json"
    path.write_text('{"old": true}')

    def crash_before_rename(self, target):
        raise KeyboardInterrupt  # killed after writing, before the rename

    monkeypatch.setattr(type(path), "replace", crash_before_rename)
    monkeypatch.setattr(type(path), "rename", crash_before_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt_lib.write_json(path, {"new": list(range(10_000))})
    assert json.loads(path.read_text()) == {"old": True}, "never truncated or half new"


def test_an_unreadable_subfolder_is_accounted_for_in_skipped_jsonl(tmp_path, monkeypatch):
    midis = _midi_folder(tmp_path / "midi", 3)
    _midi_folder(midis / "locked", 2, first=10)
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission gives (root ignores chmod)
        if isinstance(path, str) and path.endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    path = build.build_dataset([f"midi_dir:{midis}"], tmp_path / "out", num_workers=1, **QUIET)
    skipped = [json.loads(line) for line in (path / "skipped.jsonl").read_text().splitlines()]
    assert [(s["path"], s["reason"]) for s in skipped] == [("locked/", "cannot read folder: Permission denied")]
    assert json.loads((path / "build.json").read_text())["inputs"] == 4


def test_a_huge_file_is_skipped_with_its_real_size(tmp_path):
    from data_prep import midi, sources

    big = tmp_path / "big.mid"
    with open(big, "wb") as f:
        f.write(b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0")
        f.truncate(50 * 10**6)  # sparse: 50 MB on paper, nothing on disk
    item = sources.Item("midi_dir", str(tmp_path), "big.mid", "big.mid", "big.mid")
    with pytest.raises(midi.SkipPiece, match=r"file too large \(47\.7 MiB > 16 MiB\)"):
        sources.load(item)
    with open(big, "r+b") as f:
        f.truncate(16 * 2**20 + 1)  # just over: in MiB both figures would read 16.0
    with pytest.raises(midi.SkipPiece, match=r"file too large \(16,777,217 bytes > 16,777,216 bytes\)"):
        sources.load(item)


def test_generation_retries_when_rotation_deletes_the_step(tiny_run, tmp_path, monkeypatch, capsys):
    import shutil

    from mgpt.train import checkpoint as ckpt_lib

    workdir = _copy(tiny_run[0], tmp_path / "w")
    real_read = ckpt_lib.read_json_item

    def rotated_away(root, step, item):  # a live run deletes step 4 just after it was picked
        if step == 4:
            shutil.rmtree(workdir / "checkpoints" / "4", ignore_errors=True)
        return real_read(root, step, item)

    monkeypatch.setattr(ckpt_lib, "read_json_item", rotated_away)
    _, _, _, step = ckpt_lib.restore_model(str(workdir))
    assert step == 2
    assert "using step 2" in capsys.readouterr().err


def test_generation_takes_the_newer_step_when_rotation_keeps_one(tiny_run, tmp_path, monkeypatch, capsys):
    import shutil

    from mgpt.train import checkpoint as ckpt_lib

    workdir = _copy(tiny_run[0], tmp_path / "w")
    checkpoints = workdir / "checkpoints"
    shutil.rmtree(checkpoints / "2")  # keep_checkpoints=1: step 4 is the only one
    real_read = ckpt_lib.read_json_item

    def saved_and_rotated(root, step, item):  # the live run saves step 6, then rotation deletes step 4
        if step == 4 and (checkpoints / "4").exists():
            shutil.copytree(checkpoints / "4", checkpoints / "6")
            shutil.rmtree(checkpoints / "4")
        return real_read(root, step, item)

    monkeypatch.setattr(ckpt_lib, "read_json_item", saved_and_rotated)
    capsys.readouterr()
    _, _, _, step = ckpt_lib.restore_model(str(workdir))
    err = capsys.readouterr().err.strip().splitlines()
    assert step == 6
    assert len(err) == 1 and "step 4" in err[0] and "using step 6" in err[0], err


def test_a_negative_primer_length_or_a_zero_event_budget_is_refused(tiny_run, tmp_path):
    from mgpt import generate

    for flag, message in [("--primer_seconds=-1", "--primer_seconds must be >= 0"),
                          ("--max_events=0", "--max_events must be >= 1")]:
        with pytest.raises(SystemExit, match=message):
            generate.main(["generate", f"--workdir={tiny_run[0]}", f"--output_dir={tmp_path}/out", "--num_samples=1",
                           "--noprogress", flag])
    assert not (tmp_path / "out").exists()
    primer = tmp_path / "primer.mid"
    primer.write_bytes(synthetic.piano_midi(0, num_notes=40))
    run = generate.load_run(str(tiny_run[0]))
    with pytest.raises(UserError, match=r"^--primer_seconds must be >= 0 \(0 keeps all of the primer\), got -1$"):
        run.generate_ids(primer=primer, primer_seconds=-1, max_events=4)  # the Python API, as the command line


def test_ctrl_c_during_a_build_exits_promptly_with_one_line(old_dataset, tmp_path):
    out = _copy(old_dataset, tmp_path / "out")
    before = _snapshot(out)
    # Enough pieces that the workers are still converting when they are seen, even on a loaded
    # machine (with 60, CI once saw the whole build finish before its workers were found).
    midis = _midi_folder(tmp_path / "midi", 600, first=300)
    # A terminal's Ctrl-C reaches the whole process group: the build and its workers.
    proc, children = _build_until_its_workers_run(
        midis, out, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # As at a terminal: a runner started in the background (`cmd &` in a script) hands its
        # children SIGINT ignored, and a build rightly keeps ignoring it then.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert len(children) == 2 and proc.poll() is None, "the build's two workers were never seen running"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        for c in children + [psutil.Process(proc.pid)] if proc.poll() is None else children:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
    lines = [line for line in err.splitlines() if line.strip() and "converting" not in line]
    assert lines == [f"interrupted: nothing was written to {build.dataset_path(out)} (a dataset there is unchanged)"]
    assert not [c.pid for c in children if _alive(c)]
    assert _snapshot(out) == before
