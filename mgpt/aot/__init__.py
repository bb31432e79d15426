"""`python -m mgpt.aot`: compile the training step for TPU slices on this machine and report HBM.

The command's entry point only (`__main__`); the library is mgpt.train.aot, and may import
only it and mgpt.errors. Old `from mgpt import aot; aot.parse_topology(...)` code is forwarded
there on first use.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    from mgpt.train import aot

    return getattr(aot, name)
