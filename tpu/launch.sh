#!/usr/bin/env bash
# Start training on every worker at once (one process per host; jax.distributed finds the others).
#
#   bash tpu/launch.sh gs://BUCKET/runs/large --config=configs/large.py --config.data.dataset_dir=gs://BUCKET/data/maestro
#
# The first argument is the workdir (a gs:// path, so checkpoints outlive the VMs); the rest are
# passed to `python -m mgpt.train`. Re-running the same line resumes from the latest checkpoint.
# Output goes to ~/train.log on each worker (tail it with tpu/logs.sh); the run survives ssh exits.
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [[ $# -lt 2 ]]; then
  echo "usage: bash tpu/launch.sh WORKDIR --config=configs/NAME.py [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
WORKDIR="$1"; shift
# Quoted for the workers' shell, so every argument arrives as typed (spaces, quotes, $).
ARGS="$(printf '%q ' "--workdir=$WORKDIR" "$@")"
# XLA:TPU flags for this model's collectives, then any LIBTPU_INIT_ARGS of your own (a later
# flag wins). A flag belongs here only when `python -m mgpt.aot` shows that large's planned
# step on v5e-256 compiles differently with it: fewer bytes sent, more of them asynchronous
# (overlapping compute), or less HBM. None does yet. MaxText's v5e set
#   --xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true
#   --xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
#   --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true
#   --xla_enable_async_all_gather=true
# compiled to the same program as without it (libtpu 0.0.42.1): 7.11 GiB sent per chip per step,
# 2.05 GiB of it asynchronous, 10.43 GiB of HBM (docs/tpu_plan.md, "Launch flags"). The async
# collective fusion it asks for is already this libtpu's default on v5e (the chained gathers).
MGPT_LIBTPU_FLAGS=()
LIBTPU_ARGS="$(printf '%q' "${MGPT_LIBTPU_FLAGS[*]} ${LIBTPU_INIT_ARGS:-}")"
tpu_ssh "cd $(printf '%q' "$REMOTE_DIR") && LIBTPU_INIT_ARGS=$LIBTPU_ARGS nohup .venv/bin/python -m mgpt.train $ARGS > ~/train.log 2>&1 &
  echo \$! > ~/train.pid"
echo "launched on all workers of $TPU_NAME; follow with: bash tpu/logs.sh"
