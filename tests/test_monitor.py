"""Training telemetry (mgpt/train/monitor.py): the peak FLOP/s that MFU divides by."""

import types

import pytest

from mgpt.train import monitor


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("TPU v5", 459),  # v5p reports "TPU v5": a substring table gave it v5e's 197
        ("TPU v5 lite", 197),
        ("TPU v4", 275),
        ("TPU v6 lite", 918),
        ("NVIDIA H100 PCIe", 756),  # not the SXM part's 989
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA L4", 121),
        ("NVIDIA L40S", 362),
    ],
)
def test_peak_flops_come_from_the_exact_device_kind(kind, tflops):
    assert monitor.known_peak_flops(types.SimpleNamespace(device_kind=kind)) == tflops * 1e12


def test_an_unknown_device_kind_is_measured_not_guessed():
    for kind in ("TPU v5 something new", "NVIDIA H100 something", "cpu"):
        assert monitor.known_peak_flops(types.SimpleNamespace(device_kind=kind)) is None
