"""The suite runs on the CPU.

With the `tpu` extra installed (libtpu, which tests/test_aot.py compiles with), jax would
otherwise try to open a TPU in every process, test subprocesses included, and print
libtpu's warnings where tests read a command's one-line error. mgpt.aot describes TPU
slices with the CPU as its backend, so it is unaffected.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
