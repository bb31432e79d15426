"""The suite runs on the CPU.

With the `tpu` extra installed (libtpu, which tests/test_aot.py compiles with), jax would
otherwise try to open a TPU in every process, test subprocesses included, and print
libtpu's warnings where tests read a command's one-line error. mgpt.aot describes TPU
slices with the CPU as its backend, so it is unaffected.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _jax_cache_settings_stay_per_test():
    """`mgpt.generate` and `mgpt.live` keep every program they compile in their run's cache
    (`mgpt.sample.run.keep_compiled`); a test that runs them in-process must not leave later
    tests writing each of theirs to disk."""
    import jax

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    yield
    if (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) != before:
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        if jax.config.jax_compilation_cache_dir != before[0]:
            jax.config.update("jax_compilation_cache_dir", before[0])
            compilation_cache.reset_cache()
