#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh: runs on every TPU VM worker, from the checkout.
#
#   tpu_worker.sh setup  [--venv=DIR] [--python=PY]                 venv + pip install -e '.[tpu,gcp,parquet,tfds]'
#   tpu_worker.sh start  [--job=J] [--log_dir=D] [--venv=DIR] [--env=K=V ...] -- TRAINER_ARGS...
#   tpu_worker.sh stop   [--job=J] [--log_dir=D] [--timeout=S]       SIGTERM, wait for the save
#   tpu_worker.sh status [--job=J] [--log_dir=D]
#   tpu_worker.sh wait   [--job=J] [--log_dir=D]                     follow the log until the trainer exits
#
# Files: LOG_DIR/JOB/worker_<i>.{log,pid,rc}; <i> is the TPU worker number from the VM's
# metadata (MM15_WORKER_ID overrides it). `~/` in DIR values means this worker's home.
set -uo pipefail

die() { echo "tpu_worker.sh: $*" >&2; exit 2; }
[[ $# -ge 1 ]] || die "usage: tpu_worker.sh setup|start|stop|status|wait [OPTIONS] [-- TRAINER_ARGS]"
mode=$1; shift
job=mm15 log_dir='~/mm15_logs' venv='~/mm15_venv' python=python3 timeout=600
envs=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --job=*) job=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --venv=*) venv=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --timeout=*) timeout=${1#*=} ;;
    --env=*) envs+=("${1#*=}") ;;
    --) shift; break ;;
    *) die "unknown option $1 (options come before --, trainer arguments after it)" ;;
  esac
  shift
done
home() { [[ $1 == "~/"* ]] && echo "$HOME/${1#\~/}" || echo "$1"; }
log_dir=$(home "$log_dir"); venv=$(home "$venv")

worker_id() {
  if [[ -n ${MM15_WORKER_ID:-} ]]; then echo "$MM15_WORKER_ID"; return; fi
  curl -sf --max-time 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    || hostname
}
dir="$log_dir/$job"
w=$(worker_id)
log="$dir/worker_$w.log" pidfile="$dir/worker_$w.pid" rcfile="$dir/worker_$w.rc"
py="$venv/bin/python"; [[ -x $py ]] || py=python3
running() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case $mode in
  setup)
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
      || die "worker $w: '$python' is missing or older than Python 3.11; install one (e.g. sudo apt-get install -y python3.11-venv) and pass --python=python3.11"
    # The README's install, plus the TPU runtime.
    [[ -x $venv/bin/python ]] || "$python" -m venv "$venv" || exit 1
    . "$venv/bin/activate" && pip install -q -e '.[tpu,gcp,parquet,tfds]' || exit 1
    echo "worker $w: installed $(pwd) into $venv"
    ;;
  start)
    running && die "worker $w: job $job is already running (pid $(cat "$pidfile")); follow it with --logs or stop it with --stop"
    "$py" -c 'import mm15_jax' 2>/dev/null \
      || die "worker $w: $py cannot import mm15_jax; run without --setup=none to install it"
    mkdir -p "$dir" && rm -f "$rcfile"
    echo "=== $(date -u +%FT%TZ) worker $w starts: $py -m mm15_jax.train $*" >> "$log"
    # setsid + nohup: a dropped ssh (SIGHUP, closed terminal) leaves the trainer running.
    # The wrapper records the trainer's pid (stop sends SIGTERM there) and its exit status.
    setsid nohup bash -c '
      pidfile=$1 rcfile=$2; shift 2
      "$@" < /dev/null &
      child=$!
      echo "$child" > "$pidfile"
      trap "kill -TERM $child 2>/dev/null" TERM  # a shutdown signalling the wrapper reaches the trainer
      while true; do wait "$child"; rc=$?; kill -0 "$child" 2>/dev/null || break; done
      echo "$rc" > "$rcfile"
      echo "=== $(date -u +%FT%TZ) exited with status $rc"
    ' wrapper "$pidfile" "$rcfile" env MM15_DISTRIBUTED=1 JAX_PLATFORMS=tpu "${envs[@]}" \
      "$py" -m mm15_jax.train "$@" >> "$log" 2>&1 < /dev/null &
    for _ in $(seq 50); do [[ -s $pidfile ]] && break; sleep 0.1; done
    echo "worker $w: started job $job (pid $(cat "$pidfile" 2>/dev/null)), log $log"
    ;;
  stop)
    running || { echo "worker $w: job $job is not running"; exit 0; }
    pid=$(cat "$pidfile")
    kill -TERM "$pid"  # the trainer saves a checkpoint and exits; never SIGKILL here
    echo "worker $w: sent SIGTERM to $pid; waiting up to ${timeout}s for the save"
    for ((t = 0; t < timeout; t++)); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "worker $w: still running after ${timeout}s (see $log)" >&2; exit 1
    fi
    echo "worker $w: stopped (status $(cat "$rcfile" 2>/dev/null || echo unknown))"
    ;;
  status)
    if running; then echo "worker $w: job $job running (pid $(cat "$pidfile")), log $log"
    elif [[ -f $rcfile ]]; then echo "worker $w: job $job exited with status $(cat "$rcfile"), log $log"
    else echo "worker $w: job $job not found in $dir"; fi
    ;;
  wait)
    [[ -f $pidfile ]] || die "worker $w: job $job was never started here ($pidfile is missing)"
    tail -n 20 -F --pid="$(cat "$pidfile")" "$log" 2>/dev/null
    for _ in $(seq 60); do [[ -f $rcfile ]] && break; sleep 1; done
    [[ -f $rcfile ]] || { echo "worker $w: the trainer exited without a status (killed?)" >&2; exit 1; }
    exit "$(cat "$rcfile")"
    ;;
  *) die "unknown mode $mode: expected setup, start, stop, status or wait" ;;
esac
