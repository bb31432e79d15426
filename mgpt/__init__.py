"""mgpt: GPT models of symbolic music, from a tokenised dataset to generated pieces.

The folders read as the pipeline: `model/` (the networks), `train/` (data pipeline, mesh, the
jitted step, checkpoints, lock, telemetry, aot), `sample/` (the compiled sampler, fill-in-the-
middle, the `Run` API, whole corpora), `music/` (analysis of notes), `eval/` (report sections).
`render` writes MIDI/WAV/PNG and the gallery, and `errors` is the one user-error type every
command shares. The commands stay where users know them: `python -m mgpt.train`,
`mgpt.generate`, `mgpt.evaluate`, `mgpt.aot`. Imports flow one way: `model/` imports none of the
other packages, `music/` no model, `eval/` never the training loop, and no library module imports a
command (tests/test_layout.py checks this). `mgpt.live` serves the page that plays along.

Notebooks written against the flat package (`from mgpt import checkpoint`) still work: each old
module name below resolves to the module's new home on first use.
"""

import glob
import importlib
import os
import pkgutil
import sys


def _default_platforms() -> str | None:
    """The JAX platforms to use when the user set none and no TPU is attached, else None.

    With the `tpu` extra installed (for mgpt.aot), jax initialises libtpu on every machine, and
    libtpu prints five lines of start-up errors where there is no TPU: a one-line error became six.
    Naming the platforms that are really here keeps jax from loading libtpu at all; mgpt.aot still
    compiles for TPU slices (topologies do not need the TPU backend)."""
    if os.environ.get("JAX_PLATFORMS") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return None
    try:
        import jax_plugins

        cuda = any(m.name.startswith("xla_cuda") for m in pkgutil.iter_modules(jax_plugins.__path__))
    except ImportError:
        cuda = False
    return "cuda,cpu" if cuda and glob.glob("/dev/nvidia[0-9]*") else "cpu"


if (_platforms := _default_platforms()) is not None and "jax" not in sys.modules:
    os.environ["JAX_PLATFORMS"] = _platforms

# Modules of the flat package, before the move into subpackages -> where they live now.
MOVED = {
    "checkpoint": "mgpt.train.checkpoint", "config": "mgpt.train.config", "data": "mgpt.train.data",
    "mesh": "mgpt.train.mesh", "monitor": "mgpt.train.monitor", "workdir_lock": "mgpt.train.workdir_lock",
    "lstm": "mgpt.model.lstm", "models": "mgpt.model.kinds", "fim": "mgpt.sample.fim",
    "features": "mgpt.music.features", "originality": "mgpt.music.originality",
    "style_classifier": "mgpt.music.style_classifier", "ngram": "mgpt.music.ngram",
}


def __getattr__(name):
    if name in MOVED:
        return importlib.import_module(MOVED[name])
    raise AttributeError(f"module 'mgpt' has no attribute {name!r}")
