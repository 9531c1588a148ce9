#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU VM pod slice; jax.distributed finds the pod by itself.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh -m ldm_jax.train --config=configs/ldm_f8.py \
#       --workdir=gs://bucket/run
#
# Needs: gcloud, the repo at the same path on every worker (REPO, default: this checkout's path), and
# requirements installed there with jax[tpu]. Optional: SETUP (a command run first on each worker, e.g. a
# git pull or pip install), PROJECT. The workdir should be a shared path (gs://, NFS) so that every
# process reads and writes the same checkpoints.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
if [ "$#" -eq 0 ]; then
  echo "usage: TPU_NAME=... ZONE=... $0 -m ldm_jax.train --config=... --workdir=..." >&2
  exit 2
fi
REPO="${REPO:-$(cd "$(dirname "$0")/.." && pwd)}"
SETUP="${SETUP:-true}"
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all \
  --command="cd $(printf %q "$REPO") && $SETUP && LDM_JAX_DISTRIBUTED=1 python3 launch/run_worker.py$ARGS"
