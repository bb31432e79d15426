#!/usr/bin/env bash
# Ask the run on every worker to stop: SIGTERM makes mgpt.train save a checkpoint and exit 0.
set -euo pipefail
source "$(dirname "$0")/env.sh"
tpu_ssh 'if [ -f ~/train.pid ]; then kill -TERM "$(cat ~/train.pid)" 2>/dev/null || true; fi'
