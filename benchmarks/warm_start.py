"""How long `mgpt.live` warms up on its first start, and on the next one (docs/live.md).

    python benchmarks/warm_start.py runs/demo

The run's checkpoints and config are copied to a scratch folder with an empty compilation cache,
so the run's own cache is neither used nor touched. Two fresh processes then do what
`python -m mgpt.live` does before it answers a player: read the run, point jax at its cache
(`mgpt.sample.run.keep_compiled`), load the weights, and `mgpt.live.stream.warm_up`. The first
compiles every program and keeps it; the second loads them. Last line:

    warm-up: first start 42.2 s, second 8.6 s (4.9x)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ONE_START = """
import sys, time
from mgpt.sample import run as run_lib
from mgpt.live import stream
_, config, _ = run_lib.read_run_info(sys.argv[1])
print("cache", run_lib.keep_compiled(sys.argv[1], config))
run = run_lib.load_run(sys.argv[1])
t = time.perf_counter()
stream.warm_up(run)
print("seconds", time.perf_counter() - t)
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir", help="a trained run (make demo leaves runs/demo)")
    a = p.parse_args(argv)
    if not os.path.isdir(os.path.join(a.workdir, "checkpoints")):
        sys.exit(f"error: {a.workdir}: no checkpoints/ here; train a run first (make demo)")
    with tempfile.TemporaryDirectory(prefix="mgpt-warm-") as scratch:
        run = os.path.join(scratch, "run")
        shutil.copytree(a.workdir, run, ignore=shutil.ignore_patterns("compilation_cache", "lock", "tb"))
        seconds = []
        for start in ("first", "second"):
            out = subprocess.run([sys.executable, "-c", _ONE_START, run], cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": ROOT})
            lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("cache ", "seconds ")))
            if out.returncode or "seconds" not in lines:
                why = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
                sys.exit(f"error: the {start} start failed: {why}")
            cache = lines["cache"]
            if not cache.startswith(run + os.sep):
                sys.exit(f"error: {a.workdir}: its config keeps no compilation cache inside the run "
                         f"(train.compilation_cache; here {cache}), so there is nothing to measure")
            seconds.append(float(lines["seconds"]))
            print(f"{start} start: warm-up {seconds[-1]:.1f} s", flush=True)
        kept = len(os.listdir(cache))
        print(f"programs kept in the run's cache: {kept}")
    print(f"warm-up: first start {seconds[0]:.1f} s, second {seconds[1]:.1f} s ({seconds[0] / seconds[1]:.1f}x)")


if __name__ == "__main__":
    main()
