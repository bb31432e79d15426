# Settings shared by the tpu/ scripts. Override any of them in the environment:
#   TPU_NAME=mgpt-v4-32 ACCELERATOR_TYPE=v4-32 ZONE=us-central2-b bash tpu/create.sh
TPU_NAME="${TPU_NAME:-mgpt}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
# A TPU VM image with Python 3.11 or newer (mgpt requires it).
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
# Where the repository lives on every worker.
REMOTE_DIR="${REMOTE_DIR:-mgpt}"

tpu_ssh() {  # tpu_ssh COMMAND: run COMMAND on every worker of the slice at once
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$1"
}
