"""Sweeps: points from get_sweep(), one command per point and launcher, the report table."""

import json
import os
import subprocess
import sys

import yaml
from tiny_setup import ROOT

from mm15_jax import configs
from mm15_jax.tools import sweep

TINY = os.path.join(ROOT, "experiments", "tiny.py")


def test_tiny_sweep_points_are_valid_overrides_with_distinct_names():
  points = sweep.load_sweep(TINY)
  assert len(points) > 1
  assert len({sweep.point_name(p) for p in points}) == len(points)
  config = configs.load_experiment(TINY)
  for p in points:
    for key in p:
      node = config
      for part in key.split("."):
        node = node[part]  # KeyError: the override names no config field


def test_point_name_is_path_safe():
  assert sweep.point_name({"train.lr": 0.001, "model.size": "a/b c"}) == "size=a_b_c,lr=0.001"


def test_dry_run_prints_one_trainer_command_per_point(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "mm15_jax.tools.sweep", f"--config={TINY}", f"--workdir={tmp_path}", "--dry_run",
       "--", "--config.train.steps=5"],
      cwd=ROOT, check=True, capture_output=True, text=True, timeout=120).stdout
  lines = [line for line in out.splitlines() if line.startswith("[")]
  assert len(lines) == len(sweep.load_sweep(TINY))
  assert "-m mm15_jax.train" in lines[0] and "--config.train.lr=0.001" in lines[0]
  assert f"--workdir={tmp_path}/lr=0.001" in lines[0] and lines[0].endswith("--config.train.steps=5")


def test_gke_manifest_runs_the_point():
  args = sweep.trainer_args("experiments/tiny.py", "gs://b/lr=0.1", {"train.lr": 0.1}, [])
  doc = yaml.safe_load(sweep.gke_manifest(args, "mm15-sweep-7"))
  assert doc["metadata"]["name"] == "mm15-sweep-7"
  container = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
  assert container["command"] == ["python", "-m", "mm15_jax.train", *args]


def test_report_gathers_final_metrics(tmp_path):
  for name, loss in (("lr=0.1", 1.5), ("lr=0.01", 2.5)):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "metrics.jsonl", "w") as f:
      for r in ({"step": 1, "loss": 9.0}, {"step": 2, "loss": loss},
                {"step": 2, "kind": "eval", "loss": loss + 1, "token_accuracy": 0.5, "exact_match": 0.25}):
        f.write(json.dumps(r) + "\n")
  table = sweep.report(str(tmp_path)).splitlines()
  assert table[0].split() == ["point", "step", "loss", "eval_loss", "token_accuracy", "exact_match"]
  assert table[1].split() == ["lr=0.01", "2", "2.5000", "3.5000", "0.5000", "0.2500"]
  assert table[2].split() == ["lr=0.1", "2", "1.5000", "2.5000", "0.5000", "0.2500"]
