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
    with pytest.raises(ValueError, match="already holds a dataset"):  # the next build first restores it
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


def test_kill_9_of_a_build_takes_its_workers_along(old_dataset, tmp_path):
    out = _copy(old_dataset, tmp_path / "out")
    before = _snapshot(out)
    midis = _midi_folder(tmp_path / "midi", 60, first=200)
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep.build", f"--source=midi_dir:{midis}", f"--output_dir={out}",
         "--num_workers=2", "--overwrite"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    children = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            children = _descendants(proc.pid)
            workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
            if len(workers) >= 2:
                break
            assert proc.poll() is None, "the build ended before its workers could be seen"
            time.sleep(0.05)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGKILL)  # as the OOM killer would
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
