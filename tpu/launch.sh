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
tpu_ssh "cd $(printf '%q' "$REMOTE_DIR") && nohup .venv/bin/python -m mgpt.train $ARGS > ~/train.log 2>&1 &
  echo \$! > ~/train.pid"
echo "launched on all workers of $TPU_NAME; follow with: bash tpu/logs.sh"
