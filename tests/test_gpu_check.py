"""benchmarks/gpu_check.py: its CPU dry run takes the same path the GPU run does."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The GPU image has no TFDS, grain or music21: the check must not import them.
_WITHOUT_DATA_LIBRARIES = textwrap.dedent(
    """
    import runpy, sys

    # As if not installed: importing them fails, and importlib.util.find_spec says None (which is how
    # torch, on the GPU image, asks whether tensorflow is there).
    for name in ("grain", "tensorflow_datasets", "music21", "tensorflow", "note_seq"):
        sys.modules[name] = None
    sys.argv = ["gpu_check.py", *sys.argv[1:]]
    runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
    """
)


@pytest.mark.slow
def test_dry_run_trains_and_samples_without_the_data_libraries(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", _WITHOUT_DATA_LIBRARIES, "--dry-run", f"--out={out}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    t = result["train"]
    assert result["dry_run"] and t["config"] == "tiny" and t["remat"] == "none"
    assert t["batch"] == 4 and [x["batch"] for x in t["tried"]] == [2, 4], "the largest batch that fits"
    assert t["tokens_per_s"] > 0 and 0 < t["mfu"] < 1 and 0 < t["loss"] < 10
    assert [s["batch"] for s in result["sampling"]] == [1, 2]
    assert all(s["ours_events_per_s"] > 0 for s in result["sampling"])
    assert "tokens/s, MFU" in r.stdout and "ours / HF" in r.stdout
    # The corpus figure: the continuous sampler against the previous one, on a tiny plan.
    c = result["corpus"]
    assert "error" not in c, c
    assert c["events_per_s"] > 0 and c["previous_events_per_s"] > 0 and 0 < c["occupancy"] <= 1, c
    assert "x the previous sampler" in r.stdout
    # The packed-piece check: the second piece scores as if alone, and would not without its segment ids.
    k = result["packed"]
    assert k["scores_as_if_alone"] and k["max_logit_gap_without_segment_ids"] > 0.5, k
    assert "scores as if alone" in r.stdout
    # The attention check ran on its packed batch; on a CPU it compares XLA with the float32 reference.
    a = result["attention"]
    assert a["matches"] and a["xla_out_gap_vs_f32"] < 0.05, a


@pytest.mark.slow
def test_the_time_budget_stops_the_batch_search_and_skips_late_sampling(tmp_path):
    """A device loan is 8 minutes: past its budget the check keeps what it measured and says what it skipped."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--budget_s=0", f"--out={out}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    t = result["train"]
    assert t["batch"] == 2 and t["tokens_per_s"] > 0, "the first batch that fits is still measured"
    assert t["tried"][-1] == {"batch": 4, "fits": None, "why": "not tried: the check's time budget"}
    first, second = result["sampling"]
    assert first["ours_events_per_s"] > 0 and second["ours_events_per_s"] is None
    assert "time budget" in second["hf_params"] and "time budget" in r.stdout
