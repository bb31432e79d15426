"""A scaling ladder that runs on a CPU: does a bigger GPT learn more from the same tokens?

    python benchmarks/scaling.py --out=runs/scaling                 # 5 sizes, ~0.15 M to ~8 M parameters
    python benchmarks/scaling.py --out=runs/scaling --sizes=xs,s,m  # the quick variant (the slow test's)

Every size trains on configs/small.py's data and recipe (optimizer, schedule shape, seed) for the
same number of tokens (--steps x small's batch x seq_len), and is scored by the trainer's own
validation pass. The ladder must be monotone: each size beats the one below it, so a regression
in the recipe shows up as a kink long before anyone pays for a pod. It fits a power law
L(N) = A * N^-alpha through the (parameters, validation loss) points, and plots loss against
parameters and against training FLOPs (--plot). A size already trained in --out is read back, not
trained again, so an interrupted ladder resumes where it stopped.

Last line, for scripts: `scaling: alpha A, monotone yes|no, sizes N, tokens T`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (num_layers, num_heads, d_model, mlp_dim); head width 32 below 128, 64 above.
SIZES = {
    "xs": (2, 2, 64, 192),
    "s": (3, 3, 96, 256),
    "m": (4, 4, 128, 384),
    "l": (4, 4, 192, 512),  # configs/small.py's shape
    "xl": (6, 5, 320, 896),
}


def size_config(name: str, steps: int, dataset_dir: str | None = None, seed: int = 0, batch_size: int = 0,
                seq_len: int = 0):
    from configs import small

    num_layers, num_heads, d_model, mlp_dim = SIZES[name]
    c = small.get_config()
    c.seed = seed
    if dataset_dir:
        c.data.dataset_dir = dataset_dir
    if batch_size:
        c.train.batch_size = batch_size
    if seq_len:
        c.data.seq_len = c.model.max_len = seq_len
    c.model.update(num_layers=num_layers, num_heads=num_heads, d_model=d_model, mlp_dim=mlp_dim)
    # The schedule keeps its shape: warmup as the same share of the run.
    warmup = max(1, round(c.train.warmup_steps * steps / c.train.steps))
    c.train.update(steps=steps, warmup_steps=warmup, eval_every=0, eval_batches=10, checkpoint_every=steps,
                   log_every=max(1, steps // 4), keep_checkpoints=1)
    return c


def train_size(name: str, out: str, steps: int, dataset_dir: str | None, seed: int, batch_size: int = 0,
               seq_len: int = 0) -> dict:
    """Trains (or reads back) one size; {'params', 'flops', 'tokens', 'val', 'seconds'}."""
    from mgpt.train import loop as train

    c = size_config(name, steps, dataset_dir, seed, batch_size, seq_len)
    workdir = os.path.join(out, name)
    result_path = os.path.join(workdir, "scaling.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    t0 = time.perf_counter()
    r = train.train(c, workdir)
    if r["step"] < steps:
        raise SystemExit(f"scaling: {name} stopped at step {r['step']} of {steps}; run the same command to resume")
    tokens = steps * c.train.batch_size * c.data.seq_len
    result = {"name": name, "params": r["num_params"], "flops": r["flops_per_token"] * tokens,
              "tokens": tokens, "val": float(r["eval"][max(r["eval"])]), "seconds": time.perf_counter() - t0}
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, result_path)
    return result


def fit_power_law(params: list[float], losses: list[float]) -> tuple[float, float]:
    """(A, alpha) of L = A * N^-alpha, least squares in log-log space."""
    import numpy as np

    slope, intercept = np.polyfit(np.log(params), np.log(losses), 1)
    return math.exp(intercept), -slope


def plot(results: list[dict], a: float, alpha: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    n = np.array([r["params"] for r in results], float)
    loss = np.array([r["val"] for r in results], float)
    axes[0].loglog(n, loss, "o-", label="validation")
    grid = np.geomspace(n.min(), n.max(), 50)
    axes[0].loglog(grid, a * grid ** -alpha, "--", label=f"fit: {a:.2f} N^-{alpha:.3f}")
    axes[0].set_xlabel("parameters")
    axes[0].set_ylabel("validation nats/event")
    axes[0].legend()
    axes[1].loglog([r["flops"] for r in results], loss, "o-")
    axes[1].set_xlabel("training FLOPs")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        for r in results:
            ax.annotate(r["name"], (r["params"] if ax is axes[0] else r["flops"], r["val"]), fontsize=8)
    fig.suptitle(f"GPT sizes at equal tokens ({results[0]['tokens']:,})")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/scaling", help="folder for one run per size (resumable)")
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {','.join(SIZES)}")
    p.add_argument("--steps", type=int, default=160, help="optimizer steps per size (equal tokens for all)")
    p.add_argument("--dataset_dir", default=None, help="default: configs/small.py's (the demo corpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=0, help="rows per step (default: configs/small.py's)")
    p.add_argument("--seq_len", type=int, default=0, help="events per row (default: configs/small.py's)")
    p.add_argument("--plot", default=None, help="write the plot here (e.g. docs/scaling.png)")
    a = p.parse_args(argv)
    names = [s for s in a.sizes.split(",") if s]
    unknown = [s for s in names if s not in SIZES]
    if unknown or len(names) < 2:
        raise SystemExit(f"--sizes: need two or more of {','.join(SIZES)}, got {a.sizes!r}")
    names.sort(key=list(SIZES).index)
    results = []
    for name in names:
        r = train_size(name, a.out, a.steps, a.dataset_dir, a.seed, a.batch_size, a.seq_len)
        results.append(r)
        print(f"{name:>3}: {r['params'] / 1e6:6.2f} M params, {r['flops']:.2e} FLOPs, validation {r['val']:.4f} "
              f"nats/event ({r['seconds']:.0f} s)", flush=True)
    amp, alpha = fit_power_law([r["params"] for r in results], [r["val"] for r in results])
    monotone = all(b["val"] < a_["val"] for a_, b in zip(results, results[1:]))
    if a.plot:
        plot(results, amp, alpha, a.plot)
    print(f"scaling: alpha {alpha:.3f}, monotone {'yes' if monotone else 'no'}, sizes {len(results)}, "
          f"tokens {results[0]['tokens']:,}")


if __name__ == "__main__":
    main()
