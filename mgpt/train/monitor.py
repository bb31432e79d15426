"""Training telemetry: device peak FLOP/s for MFU, and a stdout + TensorBoard writer."""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per jax device (vendor datasheets), by exact `device_kind`.
# Exact, not substrings: TPU v5p reports "TPU v5" and v5e "TPU v5 lite", and an H100
# PCIe has 3/4 of the SXM part's rate, so a substring table in any order gets one wrong.
# TPU v2/v3 devices are single TensorCores (half a chip); v4 and later are whole chips.
# A kind not listed here is measured (`measure_matmul_flops`). MFU is reported against
# these; with float32 compute on GPU it is an underestimate.
_PEAK_FLOPS = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "Tesla V100-SXM2-16GB": 125e12,
    "Tesla V100-SXM2-32GB": 125e12,
}


def known_peak_flops(device: jax.Device) -> float | None:
    return _PEAK_FLOPS.get(device.device_kind)


def measure_matmul_flops(dtype: str = "float32", n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of one device doing n x n matmuls: the honest peak for MFU on a CPU.

    The best of several short bursts, so that a moment of load from other processes
    does not lower the peak (and inflate MFU). On CPU it is also the better of XLA's
    default matmul and the one the train step compiles with (mgpt.train.mesh.compiler_options),
    so the peak holds whichever of the two a jaxlib makes faster (in jaxlib 0.10.2 they
    measured alike at n = 1024).
    """
    from mgpt.train import mesh as mesh_lib  # mesh imports flax; keep this module light

    a = jnp.ones((n, n), dtype)
    train_options = mesh_lib.compiler_options()
    variants = [{}, train_options] if train_options else [{}]
    best = 0.0
    for options in variants:
        f = jax.jit(lambda x: x @ x * (1.0 / n), compiler_options=options)
        f(a).block_until_ready()
        deadline, timed = time.perf_counter() + seconds / len(variants), False
        while not timed or time.perf_counter() < deadline:
            timed = True
            start = time.perf_counter()
            x = a
            for _ in range(2):
                x = f(x)
            x.block_until_ready()
            best = max(best, 2 * 2.0 * n**3 / (time.perf_counter() - start))
    return best


def peak_flops(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of all devices, where the figure comes from)."""
    device = jax.devices()[0]
    flops = known_peak_flops(device)
    if flops is not None:
        return flops * jax.device_count(), f"{device.device_kind} datasheet"
    measured = measure_matmul_flops(dtype, seconds=1.0)
    # All local CPU "devices" share the same cores: the measured rate is the whole host's.
    return measured * jax.process_count(), f"measured {dtype} matmul ({measured / 1e9:.0f} GFLOP/s/host)"


class MetricWriter:
    """Readable stdout lines plus TensorBoard event files (tensorboardX; process 0 only)."""

    def __init__(self, logdir: str | None):
        self._tb = None
        if logdir is not None and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            if "://" not in logdir:
                os.makedirs(logdir, exist_ok=True)
            self._tb = SummaryWriter(logdir=logdir, flush_secs=30)

    def write(self, step: int, prefix: str, metrics: dict[str, float], line: str | None = None) -> None:
        if jax.process_index() != 0:
            return
        if self._tb is not None:
            for k, v in metrics.items():
                if np.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", float(v), step)
        if line is not None:
            print(line, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class TrainLog:
    """Host side of training steps: averages over each log window, tokens/s, MFU and ETA.

    `add(step, metrics)` takes one step's host metrics (loss, nats_per_event, events,
    grad_norm, param_norm, lr); every `log_every` steps it writes a line and TensorBoard
    points. The first step (compilation) and `pause()`d time (eval, checkpoints) are
    excluded from tokens/s.
    """

    def __init__(self, writer: MetricWriter, *, total_steps: int, log_every: int, tokens_per_step: int,
                 flops_per_token: float, peak_flops: float, peak_measured: bool = False):
        self._writer = writer
        self._total = total_steps
        self._every = log_every
        self._tokens = tokens_per_step
        self._fpt = flops_per_token
        self._peak = peak_flops
        # A measured peak (a CPU's) is low when other processes loaded the cores while it was
        # measured. Steps that run faster than it prove the machine can do more: the peak becomes
        # the best rate seen over the run, so MFU never reads above 100 %.
        self._peak_measured = peak_measured
        self._peak_raised = False
        self._first = True
        self._reset(0)

    def _reset(self, step: int, t0: float | None = None) -> None:
        self._n, self._loss, self._nats, self._events = 0, 0.0, 0.0, 0.0
        self._from_step, self._t0 = step, time.perf_counter() if t0 is None else t0

    def pause(self, step: int) -> None:
        """Time until now is not training: restart the clock (the loss average goes on)."""
        self._from_step, self._t0 = step, time.perf_counter()

    def add(self, step: int, m: dict[str, float], force: bool = False) -> None:
        if self._first:  # the first step includes compilation: time from its end
            self._first = False
            self._reset(step)
            return
        self._n += 1
        self._loss += m["loss"]
        self._nats += m["nats_per_event"] * m["events"]
        self._events += m["events"]
        if step % self._every and not force:
            return
        now = time.perf_counter()
        rate = (step - self._from_step) / max(now - self._t0, 1e-9)
        achieved = rate * self._tokens * self._fpt
        if self._peak_measured and achieved > self._peak:
            if not self._peak_raised:  # said once: later raises follow the same rule silently
                print(f"note: training ran at {achieved / 1e12:.3f} TFLOP/s, above the {self._peak / 1e12:.3f} "
                      "measured at start-up (the cores were busy then); MFU is against the best rate seen from now "
                      "on", flush=True)
            self._peak, self._peak_raised = achieved, True
        out = {
            "loss": self._loss / self._n,
            "nats_per_event": self._nats / max(self._events, 1.0),
            "grad_norm": m["grad_norm"],
            "param_norm": m["param_norm"],
            "lr": m["lr"],
            "tokens_per_s": rate * self._tokens,
            "mfu": achieved / self._peak,
        }
        eta = (self._total - step) / rate if rate > 0 else float("nan")
        self._writer.write(
            step, "train", out,
            f"step {step:>6}/{self._total} | loss {out['loss']:.4f} | nats/event {out['nats_per_event']:.4f} | "
            f"grad norm {out['grad_norm']:.3f} | lr {out['lr']:.2e} | {out['tokens_per_s']:,.0f} tokens/s | "
            f"MFU {100 * out['mfu']:.1f}% | ETA {format_duration(eta)}",
        )
        self._reset(step, now)  # windows are contiguous: writing this line is training time too


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
