#!/usr/bin/env bash
# Every worker of a Cloud TPU VM pod runs the same command; jax.distributed discovers
# the pod from the TPU metadata (MM15_DISTRIBUTED=1).
#   ./launch/tpu_pod.sh TPU_NAME ZONE experiments/mm15_3b.py:pretrain gs://bucket/run [--config.x=y ...]
set -euo pipefail
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/mm15_jax && MM15_DISTRIBUTED=1 JAX_PLATFORMS=tpu \
  python -m mm15_jax.train --config=$config --workdir=$workdir --no_progress $*"
