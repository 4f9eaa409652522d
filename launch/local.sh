#!/usr/bin/env bash
# One host, all its devices: ./launch/local.sh experiments/tiny.py /tmp/run [--config.x=y ...]
set -euo pipefail
config=$1; workdir=$2; shift 2
exec python -m mm15_jax.train --config="$config" --workdir="$workdir" "$@"
