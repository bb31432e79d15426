"""tpu/*.sh against a fake `gcloud` first on PATH: the commands, their order and their quoting."""

import json
import re
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Records each call as one JSON line. `ssh --command=C` also runs C with bash in a fake
# worker's home when FAKE_WORKER is set, as the workers' shell would.
_FAKE_GCLOUD = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:2] == ["config", "get-value"]:
    print("fake-project")
command = [a.split("=", 1)[1] for a in args if a.startswith("--command=")]
worker = os.environ.get("FAKE_WORKER")
if worker and "ssh" in args and command:
    sys.exit(subprocess.run(["bash", "-c", command[0]], cwd=worker, env={{**os.environ, "HOME": worker}}).returncode)
"""

# What the workers' venv python sees: its argv, as JSON.
_FAKE_PYTHON = """#!/usr/bin/env bash
exec {python} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@"
"""


@pytest.fixture
def gcloud(tmp_path):
    if shutil.which("bash") is None or shutil.which("git") is None:
        pytest.skip("needs bash and git")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(_FAKE_GCLOUD.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "gcloud.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(log),
           "TPU_NAME": "my tpu", "ZONE": "us-east5-a", "ACCELERATOR_TYPE": "v5litepod-16"}
    env.pop("PROJECT", None)
    env.pop("RUNTIME_VERSION", None)

    def run(script, *args, **extra_env):
        r = subprocess.run(["bash", str(ROOT / "tpu" / script), *args], cwd=ROOT, env={**env, **extra_env},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r

    def calls():
        lines = log.read_text().splitlines() if log.exists() else []
        return [json.loads(line) for line in lines if not json.loads(line)[:1] == ["config"]]

    run.calls = calls
    return run


def _verb(call):
    """('create' | 'scp' | 'ssh' | ...) of a `gcloud compute tpus tpu-vm VERB ...` call."""
    assert call[:3] == ["compute", "tpus", "tpu-vm"], call
    return call[3]


def _flag(call, name):
    return next(a.split("=", 1)[1] for a in call if a.startswith(f"--{name}="))


def test_the_lifecycle_runs_create_scp_ssh_launch_stop_delete_in_order(gcloud):
    gcloud("create.sh", "--spot")
    gcloud("install.sh")
    gcloud("copy_data.sh", "gs://bucket/data set/1.0.0", "data/maestro")
    gcloud("launch.sh", "gs://bucket/runs/large", "--config=configs/large.py")
    gcloud("logs.sh")
    gcloud("stop.sh")
    gcloud("delete.sh")
    calls = gcloud.calls()
    assert [_verb(c) for c in calls] == ["create", "describe", "scp", "ssh", "ssh", "ssh", "ssh", "ssh", "delete"]
    create = calls[0]
    assert create[4] == "my tpu" and "--spot" in create and _flag(create, "project") == "fake-project"
    # v5e has its own runtime; its python3 is 3.10, so install.sh brings a 3.11 and pins jax.
    assert _flag(create, "version") == "v2-alpha-tpuv5-lite" and _flag(create, "accelerator-type") == "v5litepod-16"
    install = _flag(calls[3], "command")
    assert "uv venv -q --python 3.11 .venv" in install and "'jax[tpu]==0.10.2'" in install and "'.[tpu]'" in install
    for call in calls[2:8]:
        if _verb(call) == "ssh" and call is not calls[6]:
            assert "--worker=all" in call, "every worker runs it"
    assert "--worker=0" in calls[6], "the log is worker 0's"
    assert "gcloud storage cp -r gs://bucket/data\\ set/1.0.0/\\*" in _flag(calls[4], "command")
    assert "kill -TERM" in _flag(calls[7], "command")


@pytest.mark.parametrize("accelerator, runtime", [("v4-32", "tpu-ubuntu2204-base"), ("v5p-32", "v2-alpha-tpuv5"),
                                                  ("v6e-8", "v2-alpha-tpuv6e")])
def test_each_generation_gets_its_runtime(gcloud, accelerator, runtime):
    gcloud("create.sh", ACCELERATOR_TYPE=accelerator)
    assert _flag(gcloud.calls()[0], "version") == runtime


def test_launch_passes_every_argument_through_unchanged(gcloud, tmp_path):
    worker = tmp_path / "worker"
    venv_bin = worker / "mgpt" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text(_FAKE_PYTHON.format(python=sys.executable))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    args = ["--config=configs/large.py", "--config.data.dataset_dir=data/my dataset",
            "--config.init_from=gs://b/run's $HOME", '--config.train.steps=10 ; rm -rf "/"', "--config.seed=3"]
    gcloud("launch.sh", "gs://bucket/runs/a b", *args, FAKE_WORKER=str(worker))
    pid = worker / "train.pid"
    for _ in range(100):  # the launch backgrounds the run, as on the workers
        if pid.exists() and (worker / "train.log").read_text().strip():
            break
        time.sleep(0.1)
    received = json.loads((worker / "train.log").read_text())
    assert received == ["-m", "mgpt.train", "--workdir=gs://bucket/runs/a b", *args]


def test_launch_sets_the_libtpu_flags_and_keeps_the_users_own_last(gcloud, tmp_path):
    worker = tmp_path / "worker"
    venv_bin = worker / "mgpt" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text(f"#!/usr/bin/env bash\nexec {sys.executable} -c 'import json, os; "
                      "print(json.dumps(os.environ.get(\"LIBTPU_INIT_ARGS\")))'\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    gcloud("launch.sh", "gs://bucket/runs/a", "--config=configs/large.py", FAKE_WORKER=str(worker),
           LIBTPU_INIT_ARGS="--xla_mine=1 --xla_other='a b'")
    log = worker / "train.log"
    for _ in range(100):
        if log.exists() and log.read_text().strip():
            break
        time.sleep(0.1)
    flags = json.loads(log.read_text()).split()
    launch = (ROOT / "tpu" / "launch.sh").read_text()
    array = re.search(r"^MGPT_LIBTPU_FLAGS=\(([^)]*)\)", launch, re.M).group(1)
    ours = [f for f in array.split() if not f.startswith("#")]
    assert flags[:len(ours)] == ours, (flags, ours)
    assert flags[len(ours):] == ["--xla_mine=1", "--xla_other='a", "b'"], "the user's own come last, as typed"
