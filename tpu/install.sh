#!/usr/bin/env bash
# Copy this checkout to every worker and install it with JAX for TPU.   bash tpu/install.sh
# Every worker needs the same code: the launch runs the same command on all of them.
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ARCHIVE="$(mktemp -d)/mgpt.tar.gz"
git -C "$ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:mgpt.tar.gz" --zone="$ZONE" --project="$PROJECT" --worker=all
tpu_ssh "set -e
  rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf mgpt.tar.gz -C $REMOTE_DIR
  cd $REMOTE_DIR
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # gcsfs / google-cloud-storage: gs:// paths for config.json, vocab.json and TensorBoard files.
  .venv/bin/pip install -q -e . 'jax[tpu]' gcsfs google-cloud-storage
  .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
