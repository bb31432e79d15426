#!/usr/bin/env bash
# Create a TPU VM slice.   TPU_NAME=mgpt ACCELERATOR_TYPE=v4-32 bash tpu/create.sh [--spot]
# --spot (or --preemptible) makes it cheaper and preemptible: training resumes after preemption.
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "$@"
gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --format="value(state)"
