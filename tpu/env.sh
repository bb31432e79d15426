# Settings shared by the tpu/ scripts. Override any of them in the environment:
#   TPU_NAME=mgpt-v4-32 ACCELERATOR_TYPE=v4-32 ZONE=us-central2-b bash tpu/create.sh
# ACCELERATOR_TYPE is gcloud's name: v4-32, v5litepod-16 (v5e), v5p-32, v6e-8.
TPU_NAME="${TPU_NAME:-mgpt}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
# The TPU VM runtime Google documents for each generation. All are Ubuntu 22.04 with
# python3 3.10, too old for mgpt: install.sh brings its own Python (PYTHON_VERSION).
case "$ACCELERATOR_TYPE" in
  v5litepod-*) _RUNTIME=v2-alpha-tpuv5-lite ;;
  v5p-*) _RUNTIME=v2-alpha-tpuv5 ;;
  v6e-*) _RUNTIME=v2-alpha-tpuv6e ;;
  *) _RUNTIME=tpu-ubuntu2204-base ;;  # v4
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$_RUNTIME}"
# The interpreter and jax the project is tested with (pyproject.toml's tpu extra).
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
# Where the repository lives on every worker.
REMOTE_DIR="${REMOTE_DIR:-mgpt}"

tpu_ssh() {  # tpu_ssh COMMAND: run COMMAND on every worker of the slice at once
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$1"
}
