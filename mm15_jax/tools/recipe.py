"""A staged experiment's stages in order, each in WORKDIR/<stage> starting from the one before.

  python -m mm15_jax.tools.recipe --config=experiments/tiny.py --workdir=/tmp/recipe            # here, in turn
  python -m mm15_jax.tools.recipe --config=experiments/mm15_3b.py --workdir=gs://b/3b --launcher=slurm
  python -m mm15_jax.tools.recipe --config=experiments/mm15_3b.py --workdir=gs://b/3b --dry_run  # print them

The stages are the experiment file's `STAGES` (a dict or a sequence of names, in order) or the
paper's pretrain, cpt, sft; `--stages=cpt,sft` runs some of them. Stage k runs `FILE:<stage>` with
`--config.init.from_checkpoint=WORKDIR/<stage k-1>` (its last checkpoint), so it starts with the
previous stage's params (position grids resized to its image size) and its own optimizer,
schedule and data; after a stage that trains the image encoder alone (`train.objective=
"object_boxes"`), with `--config.init.vit_from` and `--config.init.connector_from` instead. A
stage whose workdir already has a checkpoint at its last step is skipped, so relaunching the
recipe after an interruption resumes the interrupted stage and goes on.

Arguments after `--` go to every stage's trainer (`-- --config.train.steps=100 --config.mesh.fsdp=8`).
Launchers: local (this machine, in turn; `--processes=N` through launch/local.sh), tpu (every
worker of a TPU VM, in turn), slurm (one job per stage, each starting after the previous one
succeeds), gke (submits the first unfinished stage and prints the others: relaunch the recipe
when it is done).
"""

import shlex
import signal
import subprocess

from absl import flags, logging
from ml_collections import config_flags

from data_pipelines import storage
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import cli, configs, modes
from mm15_jax.launch_commands import LAUNCHERS, command, gke_manifest, trainer_args


def experiment_stages(path: str) -> list[str]:
  """The stages of the experiment file at `path`, in order."""
  return list(getattr(configs.experiment_module(path), "STAGES", configs.STAGES))


def stage_config(path: str, stage: str, config_overrides: list[str]):
  """`path:stage` with `--config.KEY=VALUE` overrides applied, as the trainer will resolve it."""
  argv = ["recipe", f"--config={path}:{stage}", *config_overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def stage_progress(workdir: str) -> int | None:
  """The last checkpointed step of the run in `workdir`, or None."""
  directory = ckpt_lib.workdir_checkpoints(workdir)
  storage.forget_listings(directory)  # the stage just run wrote there from other processes
  try:
    return ckpt_lib.latest_step(directory) if ckpt_lib.path_exists(directory) else None
  except ImportError as e:  # fsspec's message for gs:// without gcsfs
    raise ImportError(f"--workdir={workdir}: {e} (pip install gcsfs), or --dry_run to only print the commands") from e


def plan(path: str, workdir: str, stages: list[str], extra: list[str], check_progress: bool = True) -> list[dict]:
  """One entry per stage: its name, workdir, trainer args and whether it is already finished
  (never, without `check_progress`)."""
  known = experiment_stages(path)
  unknown = [s for s in stages if s not in known]
  if unknown:
    raise ValueError(f"--stages: {unknown} are not stages of {path} (it has {known})")
  overrides = [a for a in extra if a.startswith("--config.")]
  entries, previous, previous_encoder_only = [], None, False
  for stage in stages or known:
    config = stage_config(path, stage, overrides)
    if not config.checkpoint.every:
      raise ValueError(f"{path}:{stage}: config.checkpoint.every=0 saves nothing, so no next stage could "
                       "start from it; set --config.checkpoint.every=N (the last step is always saved)")
    stage_dir = storage.join(workdir, stage)
    # A later stage's own override wins over the experiment's (placeholder) start. After an
    # encoder stage (train.objective="object_boxes") only the ViT and connector exist to start from.
    start = {}
    if previous:
      parts = ("vit_from", "connector_from") if previous_encoder_only else ("from_checkpoint",)
      start = {f"init.{part}": storage.join(workdir, previous) for part in parts}
    done = stage_progress(stage_dir) if check_progress else None
    entries.append(dict(stage=stage, workdir=stage_dir, steps=config.train.steps, done_steps=done,
                        finished=done is not None and done >= config.train.steps,
                        args=trainer_args(f"{path}:{stage}", stage_dir, {}, extra)
                        + [f"--config.{k}={v}" for k, v in start.items()]))
    objective = modes.parse(modes.Objective, config.train.objective)  # a typo is named here, before any stage runs
    previous, previous_encoder_only = stage, objective == modes.Objective.OBJECT_BOXES
  return entries


def _define_flags():
  """Flags are defined when the tool runs, not at import, so tests may import several tools."""
  flags.DEFINE_string("config", None, "A staged experiment file, e.g. experiments/tiny.py or experiments/mm15_3b.py.")
  flags.DEFINE_string("workdir", None, "Each stage runs in WORKDIR/<stage> (a local path or gs://).")
  flags.DEFINE_list("stages", [], "Stages to run, in order (default: all of the experiment's).")
  flags.DEFINE_enum("launcher", "local", list(LAUNCHERS), "Where the stages run.")
  flags.DEFINE_integer("processes", 1, "--launcher=local: processes (launch/local.sh), as on a pod.")
  flags.DEFINE_string("tpu", None, "--launcher=tpu: TPU_NAME ZONE (space-separated).")
  flags.DEFINE_bool("dry_run", False, "Print each stage's command instead of running it.")


def main(argv):
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint it reads at INFO
  path = f.config.partition(":")[0]  # the stage argument is the recipe's to choose
  # A dry run prints every stage without reading the workdir (which may be a bucket).
  entries = plan(path, f.workdir, f.stages, argv[1:], check_progress=not f.dry_run)
  after = None  # slurm: the job the next stage waits for
  for i, entry in enumerate(entries):
    head = f"[{i + 1}/{len(entries)}] {entry['stage']}"
    if entry["finished"]:
      print(f"{head}: finished ({entry['workdir']} has step {entry['done_steps']} of {entry['steps']}), skipped",
            flush=True)
      continue
    job = f"mm15-{entry['stage']}"
    cmd = command(f.launcher, entry["args"], job, tpu=f.tpu, processes=f.processes, after=after)
    stdin = gke_manifest(entry["args"], job) if f.launcher == "gke" else None
    print(f"{head}: {shlex.join(cmd)}", flush=True)
    if f.dry_run:
      after = f"<{entry['stage']} job id>"  # what a real slurm submission would chain to
      continue
    if f.launcher == "gke" and i > entries.index(next(e for e in entries if not e["finished"])):
      continue  # printed only: a JobSet cannot wait for another
    # Relative paths (the experiment file, the workdir) stay relative to where the recipe runs.
    result = run_forwarding_sigterm(cmd, stdin, capture=f.launcher == "slurm")
    if f.launcher == "slurm":
      after = result.stdout.strip().split(";")[0]
      print(f"  submitted job {after}", flush=True)
      continue
    if f.launcher == "gke":
      print("  submitted; relaunch this recipe when it finishes to start the next stage", flush=True)
      continue
    done = stage_progress(entry["workdir"])
    if done is None or done < entry["steps"]:
      raise SystemExit(f"{entry['stage']} stopped at step {done} of {entry['steps']} (preempted?); "
                       "relaunch the recipe to resume it")
    if result.preempted:
      raise SystemExit(f"preempted after {entry['stage']} finished; relaunch the recipe to go on")
  if not f.dry_run and f.launcher in ("local", "tpu"):
    print(f"recipe finished: {', '.join(e['stage'] for e in entries)} in {f.workdir}", flush=True)


def run_forwarding_sigterm(cmd: list[str], stdin: str | None, capture: bool) -> subprocess.CompletedProcess:
  """Runs a stage; a SIGTERM to the recipe (a preemption, `scancel`, a pod's stop) is passed on
  to it, so the trainers save at their next step boundary and the recipe stops after them.
  Raises CalledProcessError on a failure, as subprocess.run(check=True)."""
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else None, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
  preempted = []

  def forward(signum, frame):
    del frame
    preempted.append(signum)
    proc.send_signal(signal.SIGTERM)

  previous = signal.signal(signal.SIGTERM, forward)
  try:
    out, err = proc.communicate(stdin)
  finally:
    signal.signal(signal.SIGTERM, previous)
  if proc.returncode:
    raise subprocess.CalledProcessError(proc.returncode, cmd, out, err)
  result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
  result.preempted = bool(preempted)
  return result


def run():
  _define_flags()
  cli.run(main, __doc__, required=["config", "workdir"])


if __name__ == "__main__":
  run()
