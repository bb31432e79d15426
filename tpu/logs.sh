#!/usr/bin/env bash
# Show the end of the training log of worker 0 (process 0 prints the log lines).   bash tpu/logs.sh [N]
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=0 \
  --command="tail -n ${1:-40} ~/train.log"
