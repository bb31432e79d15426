"""The quick scaling ladder: with the recipe's settings, a bigger GPT learns more from the same tokens."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_two_smallest_sizes_of_the_ladder_are_monotone(tmp_path):
    """A kink here (the larger size no better) means the recipe regressed: the start, the
    optimizer or the schedule, long before a pod run would show it."""
    from data_prep import build, synthetic

    midis = tmp_path / "midi"
    midis.mkdir()
    for i in range(60):
        (midis / f"p{i:02d}.mid").write_bytes(synthetic.piano_midi(i, num_notes=80 + 3 * i))
    dataset = build.build_dataset([f"midi_dir:{midis}"], tmp_path / "data", num_workers=1, progress=False,
                                  verbose=False, split_percents=(80, 10, 10), parser="fast")
    out = subprocess.run([sys.executable, "benchmarks/scaling.py", "--sizes=xs,s", "--steps=60", "--batch_size=8",
                          "--seq_len=128", f"--dataset_dir={dataset}", f"--out={tmp_path / 'ladder'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("scaling: alpha ") and "sizes 2" in last, out.stdout
    assert "monotone yes" in last, out.stdout
