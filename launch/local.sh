#!/usr/bin/env bash
# NPROC trainer (or MM15_MODULE) processes on this machine, started the way a pod starts
# them: one JAX process each, jax.distributed with process 0 as coordinator, CPU collectives.
#
#   launch/local.sh 2 -- --config=experiments/tiny.py --workdir=/tmp/mm15_mp
#   MM15_MODULE=mm15_jax.evaluation launch/local.sh 2 -- --config=experiments/tiny.py \
#       --checkpoint=/tmp/mm15_mp --builtin --out=/tmp/mm15_mp/eval
#
# MM15_MODULE (default mm15_jax.train) is the module each process runs with `python -m`; it
# must take --coordinator_address/--num_processes/--process_id (mm15_jax/distributed.py):
# mm15_jax.train, mm15_jax.evaluation, mm15_jax.tools.generate and mm15_jax.tools.video do.
# MM15_LOCAL_DEVICES (default 8) simulated CPU devices are split evenly over the processes.
# SIGTERM/SIGINT are forwarded to every process (a simulated preemption); the exit status
# is the first non-zero status of any process, else 0.
set -uo pipefail

usage() { echo "usage: [MM15_MODULE=mm15_jax.train] $0 NPROC -- ARGS..." >&2; exit 2; }
[[ $# -ge 2 && $2 == "--" ]] || usage
nproc=$1; shift 2
[[ $nproc =~ ^[1-9][0-9]*$ ]] || usage
devices=${MM15_LOCAL_DEVICES:-8}
if (( devices % nproc )); then
  echo "MM15_LOCAL_DEVICES=$devices does not split over $nproc processes" >&2; exit 2
fi
python=${PYTHON:-python}
module=${MM15_MODULE:-mm15_jax.train}

# A free port from the OS; released before the coordinator binds it (a tiny race, fine locally).
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')

pids=()
forward() { kill -"$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < nproc; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$((devices / nproc))" \
    "$python" -m "$module" "$@" \
      --coordinator_address="localhost:$port" --num_processes="$nproc" --process_id="$i" &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  # `wait` returns early (>128) when a trapped signal arrives; wait again for the real exit.
  while true; do
    wait "$pid"; rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  if (( rc != 0 && status == 0 )); then
    status=$rc
    forward KILL  # the others would block in a collective waiting for the failed one
  fi
done
exit $status
