"""The command that runs one training job, here or through the cluster launchers in launch/.

Shared by the tools that run several jobs: sweeps (`mm15_jax.tools.sweep`, one job per point) and
staged recipes (`mm15_jax.tools.recipe`, one job per stage).
"""

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ("local", "tpu", "gke", "slurm")


def trainer_args(spec: str, workdir: str, overrides: dict, extra: list[str]) -> list[str]:
  """The trainer's flags: experiment, workdir, then `--config.KEY=VALUE` per override, then `extra`."""
  return ([f"--config={spec}", f"--workdir={workdir}", "--no_progress"]
          + [f"--config.{k}={v}" for k, v in overrides.items()] + list(extra))


def command(launcher: str, args: list[str], job_name: str, *, tpu: str | None = None, processes: int = 1,
            after: str | None = None) -> list[str]:
  """The command that runs the trainer with `args` (from `trainer_args`).

  local: this machine (`processes` > 1 through launch/local.sh); tpu: every worker of the TPU VM
  `tpu` ("NAME ZONE"), returning when the trainer exits; slurm: sbatch, starting after job `after`
  succeeds when given; gke: `kubectl apply` of the manifest `gke_manifest` returns (pass it on stdin).
  """
  if launcher == "local":
    if processes > 1:
      return [os.path.join(ROOT, "launch", "local.sh"), str(processes), "--", *args]
    return [sys.executable, "-m", "mm15_jax.train", *args]
  if launcher == "slurm":  # the script takes CONFIG WORKDIR first, then passes the rest on
    dependency = [f"--dependency=afterok:{after}"] if after else []
    return ["sbatch", "--parsable", f"--job-name={job_name}", *dependency,
            os.path.join(ROOT, "launch", "slurm.sbatch"), _value(args, "--config"), _value(args, "--workdir"),
            *_rest(args)]
  if launcher == "tpu":
    if not tpu or len(tpu.split()) != 2:
      raise ValueError("--launcher=tpu needs --tpu='TPU_NAME ZONE'")
    # --wait: the caller runs jobs in turn and reads the workdir after each (the trainer itself
    # runs detached on the workers, so a dropped ssh only stops the following).
    return [os.path.join(ROOT, "launch", "tpu_pod.sh"), "--wait", f"--job={job_name}", *tpu.split(),
            _value(args, "--config"), _value(args, "--workdir"), *_rest(args)]
  if launcher == "gke":
    return ["kubectl", "apply", "-f", "-"]
  raise ValueError(f"--launcher={launcher!r}: expected one of {LAUNCHERS}")


def _value(args: list[str], flag: str) -> str:
  return next(a.split("=", 1)[1] for a in args if a.startswith(flag + "="))


def _rest(args: list[str]) -> list[str]:
  """`args` without --config, --workdir and --no_progress, which the cluster scripts set themselves."""
  return [a for a in args if a != "--no_progress" and not a.startswith(("--config=", "--workdir="))]


def gke_manifest(args: list[str], job_name: str) -> str:
  """launch/gke_jobset.yaml renamed to `job_name`, running the trainer with `args`."""
  with open(os.path.join(ROOT, "launch", "gke_jobset.yaml")) as f:
    text = f.read()
  text = re.sub(r"(metadata:\s*\n\s*name: )\S+", rf"\g<1>{job_name}", text, count=1)
  cmd = json.dumps(["python", "-m", "mm15_jax.train", *args])
  return re.sub(r"command: \[.*?\]", lambda _: f"command: {cmd}", text, count=1, flags=re.DOTALL)
