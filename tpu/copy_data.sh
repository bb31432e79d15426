#!/usr/bin/env bash
# Copy a dataset built with data_prep (its PATH folder) from GCS to the same local path on every worker.
#   bash tpu/copy_data.sh gs://BUCKET/data/maestro/mgpt_events/1.0.0 data/maestro
# then train with --config.data.dataset_dir=data/maestro (relative to the repository on each worker).
# Reading from local disk keeps ArrayRecord random access fast.
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [[ $# -ne 2 ]]; then echo "usage: bash tpu/copy_data.sh GS_DATASET_PATH LOCAL_DIR" >&2; exit 2; fi
TARGET="$(printf '%q' "$REMOTE_DIR/$2")"
tpu_ssh "mkdir -p $TARGET && gcloud storage cp -r $(printf '%q' "$1/*") $TARGET/"
