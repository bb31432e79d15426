#!/usr/bin/env bash
# Delete the slice (checkpoints in a gs:// workdir stay).   bash tpu/delete.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
