"""Sweeps: an experiment file's `get_sweep()` run point by point, each in WORKDIR/NAME.

  python -m mm15_jax.tools.sweep --config=experiments/tiny.py --workdir=/tmp/sweep              # here, in turn
  python -m mm15_jax.tools.sweep --config=experiments/mm15_3b.py:sft --workdir=/shared/sweep --launcher=slurm
  python -m mm15_jax.tools.sweep --config=experiments/tiny.py --workdir=/tmp/sweep --report     # one table

`get_sweep(arg=None)` returns a list of override dicts keyed by dotted config paths, e.g.
`[{"train.lr": 1e-3}, {"train.lr": 3e-3, "model.size": "1b"}]`. A point's workdir is named
after its overrides, so rerunning a sweep resumes every point. Arguments after `--` go to
every run (`-- --config.train.steps=100`). `--dry_run` prints the commands instead.
"""

import json
import re
import shlex
import subprocess

from absl import flags

from data_pipelines import storage
from mm15_jax import cli, configs
from mm15_jax.launch_commands import LAUNCHERS, ROOT, command, gke_manifest, trainer_args


def load_sweep(spec: str) -> list[dict]:
  path, _, arg = spec.partition(":")
  module = configs.experiment_module(path)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(); add one returning a list of override dicts")
  return module.get_sweep(arg) if arg else module.get_sweep()


def point_name(overrides: dict) -> str:
  """{"train.lr": 0.001, "model.size": "1b"} -> "lr=0.001,size=1b" (a path-safe directory name)."""
  name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items())) or "default"
  return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def report(workdir: str) -> str:
  """One row per point: last step, last train loss, final eval metrics."""
  cols = ("step", "loss", "eval_loss", "token_accuracy", "exact_match")
  rows = []
  for name in storage.listdir(workdir):
    path = storage.join(workdir, name, "metrics.jsonl")
    if not storage.exists(path):
      continue
    train, evals = {}, {}
    with storage.open_file(path, "r") as f:
      for r in map(json.loads, filter(str.strip, f)):
        if "kind" not in r:
          train = r
        elif r["kind"] == "eval":
          evals = r
    values = dict(step=train.get("step"), loss=train.get("loss"), eval_loss=evals.get("loss"),
                  token_accuracy=evals.get("token_accuracy"), exact_match=evals.get("exact_match"))
    rows.append([name] + [_fmt(values[c]) for c in cols])
  header = ["point", *cols]
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  line = lambda xs: "  ".join(str(x).ljust(w) for x, w in zip(xs, widths))  # noqa: E731
  return "\n".join([line(header)] + [line(r) for r in rows])


def _fmt(v):
  return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _define_flags():
  """Flags are defined when the tool runs, not at import, so tests may import several tools."""
  flags.DEFINE_string("config", None, "Experiment file (FILE or FILE:arg) defining get_sweep().")
  flags.DEFINE_string("workdir", None, "Each point runs in WORKDIR/NAME.")
  flags.DEFINE_enum("launcher", "local", list(LAUNCHERS), "Where the points run.")
  flags.DEFINE_string("tpu", None, "--launcher=tpu: TPU_NAME ZONE (space-separated).")
  flags.DEFINE_bool("report", False, "Print the final metrics of every point instead of running.")
  flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def main(argv):
  extra = argv[1:]
  if flags.FLAGS.report:
    print(report(flags.FLAGS.workdir))
    return
  points = load_sweep(flags.FLAGS.config)
  for i, overrides in enumerate(points):
    workdir = storage.join(flags.FLAGS.workdir, point_name(overrides))
    args = trainer_args(flags.FLAGS.config, workdir, overrides, extra)
    cmd = command(flags.FLAGS.launcher, args, f"mm15-sweep-{i}", tpu=flags.FLAGS.tpu)
    stdin = gke_manifest(args, f"mm15-sweep-{i}") if flags.FLAGS.launcher == "gke" else None
    print(f"[{i + 1}/{len(points)}] {shlex.join(cmd)}", flush=True)
    if flags.FLAGS.dry_run:
      if stdin:
        print(stdin)
      continue
    subprocess.run(cmd, input=stdin, text=True, check=True, cwd=ROOT)
  if flags.FLAGS.launcher == "local" and not flags.FLAGS.dry_run:
    print(report(flags.FLAGS.workdir))


def run():
  _define_flags()
  cli.run(main, __doc__, required=["config", "workdir"])


if __name__ == "__main__":
  run()
