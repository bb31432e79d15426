"""Training: the data pipeline (`data`), config checks (`config`), the device mesh (`mesh`), the one
jitted step and the loop (`loop`), checkpoints and inference loading (`checkpoint`), the workdir
lock (`workdir_lock`), telemetry (`monitor`), and compiling for TPU slices ahead of time (`aot`),
with its collective count (`collectives`) and the remat/accumulation/mesh planner (`plan`).

May import mgpt.model, mgpt.sample.fim (the FIM transform the data pipeline applies), data_prep
and mgpt.errors; never mgpt.eval or a command. The command is `python -m mgpt.train`
(`__main__`). Names of the old flat module `mgpt.train` (`train`, `setup`, `make_train_step`, ...)
are looked up in `loop` on first use, so `from mgpt import train; train.train(...)` still works.
"""

_LOOP_NAMES = frozenset({
    "NonFiniteLoss", "Setup", "abstract_batch", "activation_sharding", "compile_eval_step", "compile_train_step",
    "global_batch", "learning_rate_schedule", "main", "make_eval_step", "make_optimizer", "make_train_step",
    "setup", "train",
})


def __getattr__(name):
    if name in _LOOP_NAMES:
        from mgpt.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'mgpt.train' has no attribute {name!r}")
