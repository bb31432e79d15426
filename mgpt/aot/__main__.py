"""Compile the training step for TPU slices on this machine and report HBM per chip:
`python -m mgpt.aot --config=configs/large.py --topology=v5e-256[,v4-32,...]` (see mgpt.train.aot).
"""

from absl import app, flags

from mgpt.train import aot

if __name__ == "__main__":
    flags.adopt_module_key_flags(aot)  # its --config/--topology, listed by --help
    app.run(aot.main)
