#!/usr/bin/env bash
# Copy this checkout to every worker and install it with JAX for TPU.   bash tpu/install.sh
# Every worker needs the same code: the launch runs the same command on all of them.
# The runtimes' python3 is 3.10; uv (from PyPI) installs a managed Python $PYTHON_VERSION
# for the venv, so nothing depends on the image's own Python beyond running pip once.
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ARCHIVE="$(mktemp -d)/mgpt.tar.gz"
git -C "$ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:mgpt.tar.gz" --zone="$ZONE" --project="$PROJECT" --worker=all
DIR="$(printf '%q' "$REMOTE_DIR")"
tpu_ssh "set -e
  rm -rf $DIR && mkdir -p $DIR && tar -xzf mgpt.tar.gz -C $DIR
  cd $DIR
  python3 -m pip install -q --user --upgrade 'uv>=0.4'
  ~/.local/bin/uv venv -q --python $PYTHON_VERSION .venv
  # jax pinned to the tested version; the tpu extra brings the libtpu it was built with.
  # gcsfs / google-cloud-storage: gs:// paths for config.json, vocab.json and TensorBoard files.
  ~/.local/bin/uv pip install -q --python .venv/bin/python -e '.[tpu]' 'jax[tpu]==$JAX_VERSION' gcsfs google-cloud-storage
  .venv/bin/python -c 'import sys, jax; print(sys.version.split()[0], jax.__version__, jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
