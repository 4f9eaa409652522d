#!/usr/bin/env bash
# Every worker of a Cloud TPU VM runs the trainer; jax.distributed discovers the pod from the
# TPU metadata (MM15_DISTRIBUTED=1). The trainer runs detached, so a dropped ssh leaves it running.
#
#   launch/tpu_pod.sh [OPTIONS] TPU_NAME ZONE CONFIG WORKDIR [TRAINER_ARGS...]   copy, install, start
#   launch/tpu_pod.sh --logs   [--worker=N|all] [--job=J] TPU_NAME ZONE           follow the log
#   launch/tpu_pod.sh --status [--job=J] TPU_NAME ZONE
#   launch/tpu_pod.sh --stop   [--job=J] TPU_NAME ZONE         SIGTERM: save a checkpoint and exit
#
#   launch/tpu_pod.sh my-v5p us-east5-a experiments/mm15_3b.py:pretrain gs://b/3b --config.profile.steps='(5, 8)'
#
# Start: (1) setup: this checkout (its git-tracked and untracked, not ignored files) is copied to
# SRC on every worker and installed there with the README's install plus the `tpu` extra into
# the venv VENV (created with PYTHON, which must be >= 3.11); (2) the trainer starts detached on
# every worker, from SRC (so CONFIG is relative to the checkout), logging to
# LOG_DIR/JOB/worker_<i>.log on that worker. A job that is still running is never started twice.
#
# Options (before TPU_NAME):
#   --job=NAME         names the logs and the stop target (default mm15)
#   --setup=copy|none  none: skip the copy and install; SRC must hold an installed checkout
#   --src=DIR          checkout on the workers (default ~/mm15_jax)
#   --venv=DIR         venv on the workers (default ~/mm15_venv; python3 when it does not exist)
#   --python=PY        interpreter that creates the venv (default python3)
#   --log_dir=DIR      logs on the workers (default ~/mm15_logs)
#   --env=NAME=VALUE   extra environment for the trainer (repeatable), e.g. --env=LIBTPU_INIT_ARGS=...
#   --wait             after starting, follow worker 0's log and exit with its trainer's status
#   --worker=N|all     --logs: which worker's log (default 0)
#   --timeout=S        --stop: seconds to wait for the save (default 600)
#   --gcloud_arg=ARG   extra gcloud flag for every call (repeatable), e.g. --gcloud_arg=--tunnel-through-iap
#   --dry_run          print the commands instead of running them (also MM15_DRY_RUN=1)
# Ctrl-C during --wait or --logs stops following, not the job.
set -euo pipefail

usage() {
  echo "usage: $0 [OPTIONS] TPU_NAME ZONE CONFIG WORKDIR [TRAINER_ARGS...]" >&2
  echo "       $0 --logs|--status|--stop [OPTIONS] TPU_NAME ZONE    (options: see the top of $0)" >&2
  [[ $# -gt 0 ]] && echo "error: $*" >&2
  exit 2
}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
action=start job=mm15 setup=copy src='~/mm15_jax' venv='~/mm15_venv' python=python3
log_dir='~/mm15_logs' worker=0 timeout=600 wait=0 dry_run=${MM15_DRY_RUN:-0}
envs=() gcloud_args=()
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --logs|--status|--stop) action=${1#--} ;;
    --job=*) job=${1#*=} ;;
    --setup=*) setup=${1#*=} ;;
    --src=*) src=${1#*=} ;;
    --venv=*) venv=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --env=*) [[ $1 == --env=?*=* ]] || usage "$1: expected --env=NAME=VALUE"; envs+=("${1#--env=}") ;;
    --wait) wait=1 ;;
    --worker=*) worker=${1#*=} ;;
    --timeout=*) timeout=${1#*=} ;;
    --gcloud_arg=*) gcloud_args+=("${1#*=}") ;;
    --dry_run) dry_run=1 ;;
    *) usage "unknown option $1 (trainer arguments go after TPU_NAME ZONE CONFIG WORKDIR)" ;;
  esac
  shift
done
[[ $job =~ ^[A-Za-z0-9._-]+$ ]] || usage "--job=$job: use letters, digits, '.', '_' and '-' only"
[[ $setup == copy || $setup == none ]] || usage "--setup=$setup: expected copy or none"
[[ $worker == all || $worker =~ ^[0-9]+$ ]] || usage "--worker=$worker: expected a number or all"
[[ $timeout =~ ^[0-9]+$ ]] || usage "--timeout=$timeout: expected seconds"
if [[ $action == start ]]; then
  [[ $# -ge 4 ]] || usage "expected TPU_NAME ZONE CONFIG WORKDIR, got $# arguments"
else
  [[ $# -eq 2 ]] || usage "--$action takes TPU_NAME ZONE only"
fi
tpu=$1 zone=$2; shift 2

# One word for the remote shell: single quotes survive any content ('(5, 8)', spaces, $, ").
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
qjoin() { local out=() a; for a in "$@"; do out+=("$(q "$a")"); done; echo "${out[*]}"; }
# SRC for the remote shell: a leading ~/ must stay unquoted to expand there.
if [[ $src == "~/"* ]]; then rsrc="~/$(q "${src#\~/}")"; else rsrc=$(q "$src"); fi

run() {  # run or (dry run) print one command, quoted so that it can be pasted back
  if [[ $dry_run == 1 ]]; then qjoin "$@"; else "$@"; fi
}
ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker="$1" "${gcloud_args[@]}" --command="$2"
}
worker_cmd() {  # the remote command running launch/tpu_worker.sh MODE ARGS... in SRC
  echo "cd $rsrc && bash launch/tpu_worker.sh $(qjoin "$@")"
}
common=(--job="$job" --log_dir="$log_dir")

case $action in
  logs)
    # Each worker holds only its own log, so the glob picks it.
    ssh_workers "$worker" "tail -n 200 -F $(q "${log_dir/#\~\//}")/$(q "$job")/worker_*.log"
    ;;
  status) ssh_workers all "$(worker_cmd status "${common[@]}")" ;;
  stop) ssh_workers all "$(worker_cmd stop "${common[@]}" --timeout="$timeout")" ;;
  start)
    config=$1 workdir=$2; shift 2
    if [[ $setup == copy ]]; then
      archive="/tmp/mm15_src_$job.tgz"
      if [[ $dry_run == 1 ]]; then
        echo "# tar of $root (git-tracked and untracked, not ignored files) -> $archive"
      else
        if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
          (cd "$root" && git ls-files -z --cached --others --exclude-standard \
             | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
             | tar -czf "$archive" --null -T -)
        else
          tar -czf "$archive" -C "$root" --exclude=.venv --exclude=.git --exclude=workdirs .
        fi
      fi
      run gcloud compute tpus tpu-vm scp "$archive" "$tpu:$archive" --zone="$zone" --worker=all "${gcloud_args[@]}"
      ssh_workers all "mkdir -p $rsrc && tar -xzf $(q "$archive") -C $rsrc && rm -f $(q "$archive") && \
$(worker_cmd setup --venv="$venv" --python="$python")"
      [[ $dry_run == 1 ]] || rm -f "$archive"
    fi
    env_opts=(); for e in "${envs[@]}"; do env_opts+=(--env="$e"); done
    ssh_workers all "$(worker_cmd start "${common[@]}" --venv="$venv" "${env_opts[@]}" -- \
      --config="$config" --workdir="$workdir" --no_progress "$@")"
    if [[ $wait == 1 ]]; then
      ssh_workers 0 "$(worker_cmd wait "${common[@]}")"
    else
      [[ $dry_run == 1 ]] || echo "started job $job on $tpu: follow with '$0 --logs --job=$job $tpu $zone', stop with '$0 --stop --job=$job $tpu $zone'"
    fi
    ;;
esac
