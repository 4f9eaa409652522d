"""The journey an infrastructure team makes, rehearsed on this machine: two processes
(launch/local.sh 2), the workdir in a bucket (the GCS emulator, gcs_emulator.py), the staged tiny
recipe pretrain -> cpt -> sft, a SIGTERM in the middle of cpt and a relaunch, evaluation with
generation during training, the final report, load_model from the bucket, and export.

One recipe run (a module fixture) serves every test. References: the stage checkpoints the run
wrote, read back by one process on 8 devices (its answers and export must be the two
processes' answers and export).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from gcs_emulator import running
from test_multiprocess import ROOT

from data_pipelines import storage
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import inference, run_record
from mm15_jax.evaluation import builtin_eval

STEPS = 4
TRAINER = ["--no_progress", f"--config.train.steps={STEPS}", "--config.checkpoint.every=2", "--config.eval.every=2",
           "--config.eval.generate_per_task=2", "--config.eval.batches=1", "--config.train.batch_size=8",
           "--config.data.num_examples=256", "--config.data.prefetch=1", "--config.log_every=1"]
TITLE = "# Built-in held-out evaluation"


def recipe(workdir):
  env = {**os.environ, "PYTHON": sys.executable, "MM15_LOCAL_DEVICES": "8"}
  env.pop("XLA_FLAGS", None)  # local.sh gives each process its share
  return subprocess.Popen([sys.executable, "-m", "mm15_jax.tools.recipe", "--config=experiments/tiny.py",
                           f"--workdir={workdir}", "--processes=2", "--", *TRAINER],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rows(workdir, kind=None):
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return []
  text = storage.read_text(path)
  return [r for r in map(json.loads, filter(str.strip, text.splitlines())) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
  with running("mm15-pod", str(tmp_path_factory.mktemp("emulator"))) as bucket:
    workdir = f"{bucket}/recipe"
    proc = recipe(workdir)
    deadline = time.time() + 900
    while not rows(f"{workdir}/cpt"):  # cpt has logged a step: stop it mid-stage
      assert proc.poll() is None, proc.communicate()[0][-4000:]
      assert time.time() < deadline, "cpt never logged a step"
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stopped, _ = proc.communicate(timeout=600)
    stopped_code = proc.returncode
    steps = damage_newest_step(f"{workdir}/cpt/checkpoints")  # the relaunch must fall back past it
    proc = recipe(workdir)
    resumed, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, resumed[-4000:]
    yield dict(bucket=bucket, workdir=workdir, stopped=stopped, stopped_code=stopped_code, resumed=resumed,
               cpt_steps=steps)


def damage_newest_step(directory):
  """Flips a byte in the middle of the newest step's largest params file; -> the steps saved."""
  steps = sorted((int(n) for n in storage.listdir(directory) if n.isdigit()), reverse=True)
  table = json.loads(storage.read_text(storage.join(directory, str(steps[0]), "checksums.json")))["files"]
  name = max((n for n in table if n.startswith("params/")), key=lambda n: table[n][0])
  path = storage.join(directory, str(steps[0]), name)
  data = bytearray(storage.read_bytes(path))
  data[len(data) // 2] ^= 0xFF
  with storage.open_file(path, "wb") as f:
    f.write(bytes(data))
  return steps


def test_sigterm_stops_the_stage_at_a_saved_step_and_the_relaunch_goes_on(journey):
  stopped, resumed, workdir = journey["stopped"], journey["resumed"], journey["workdir"]
  assert journey["stopped_code"] != 0 and "relaunch the recipe" in stopped, stopped[-3000:]
  assert "preempted: saved step" in stopped, stopped[-3000:]
  saved = int(stopped.split("preempted: saved step")[1].split()[0].rstrip(";"))
  assert 1 <= saved < STEPS
  # The newest cpt step (the preemption save) was damaged before the relaunch: both processes skip
  # it, process 0 sets it aside (never deleted), and cpt goes on from the step before (or anew).
  newest, *older = journey["cpt_steps"]
  assert newest == saved and f"checkpoint step {saved} is damaged" in resumed, resumed[-3000:]
  assert resumed.count(f"set aside as {saved}.bad-0") == 1
  assert storage.exists(f"{workdir}/cpt/checkpoints/{saved}.bad-0/checksums.json")
  origin = f"resumed from step {older[0]}" if older else f"params from {workdir}/pretrain"
  assert "pretrain: finished" in resumed and origin in resumed.split("[2/3] cpt")[1], resumed[-3000:]
  assert "recipe finished" in resumed
  for stage in ("pretrain", "cpt", "sft"):
    assert ckpt_lib.latest_step(storage.join(workdir, stage, "checkpoints")) == STEPS
    assert sorted({r["step"] for r in rows(f"{workdir}/{stage}")}) == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows(f"{workdir}/{stage}", "eval_tasks")][-2:] == [2, STEPS]
  # Each later stage started from the one before, its position grids resized (32 -> 48 px tiles).
  assert "position grid resized 4x4 -> 6x6" in stopped
  config = run_record.load_config(f"{workdir}/sft")
  assert config.init.from_checkpoint == f"{workdir}/cpt" and config.model.vit.image_size == 48


def test_the_final_report_is_written_once_and_one_process_reproduces_it(journey):
  sft = f"{journey['workdir']}/sft"
  report = json.loads(storage.read_text(storage.join(sft, "eval_tasks", "REPORT.json")))
  assert storage.read_text(storage.join(sft, "eval_tasks", "REPORT.md")).startswith(TITLE)
  assert storage.exists(report["grounding_png"]) and report["grounding_png"].startswith("gs://")
  assert journey["resumed"].split("[3/3] sft")[1].count(TITLE) == 1  # printed by process 0 only
  model = inference.load_model(sft)  # config.json and the last checkpoint, from the bucket
  config = run_record.load_config(sft)
  accuracy = builtin_eval.evaluate_builtin(model, config, num_per_task=config.eval.generate_per_task)
  assert accuracy == report["accuracy"]
  assert {t: v for t, v in rows(sft, "eval_tasks")[-1].items() if t in accuracy} == report["accuracy"]


def test_export_on_two_processes_to_the_bucket_equals_one_process(journey, tmp_path):
  from mm15_jax.convert import exporter

  sft = f"{journey['workdir']}/sft"
  env = {**os.environ, "PYTHON": sys.executable, "MM15_LOCAL_DEVICES": "8", "MM15_MODULE": "mm15_jax.convert"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "--", "export", f"--checkpoint={sft}",
                        f"--out={sft}_hf", "--dtype=float32"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  assert out.stdout.count("wrote 1 shard(s)") == 1
  exporter.run_export(sft, str(tmp_path / "hf"), dtype="float32")
  names = sorted(os.listdir(tmp_path / "hf"))
  assert storage.listdir(f"{sft}_hf") == names
  for name in names:
    assert storage.read_bytes(storage.join(f"{sft}_hf", name)) == (tmp_path / "hf" / name).read_bytes(), name


def test_import_on_two_processes_from_and_to_the_bucket(journey):
  """The two-process export read back by a two-process import (bucket to bucket): the run's decoder."""
  import jax

  sft = f"{journey['workdir']}/sft"
  if not storage.exists(f"{sft}_hf/config.json"):
    pytest.skip("needs the export of test_export_on_two_processes_to_the_bucket_equals_one_process")
  env = {**os.environ, "PYTHON": sys.executable, "MM15_LOCAL_DEVICES": "8", "MM15_MODULE": "mm15_jax.convert"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "--", "import", "--kind=llm",
                        f"--hf={sft}_hf", f"--out={sft}_imported"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  assert out.stdout.count('"kind": "llm"') == 1  # the summary, from process 0
  assert run_record.load_config(f"{sft}_imported").init.llm_from == f"{sft}_imported"
  model = inference.load_model(sft)
  imported = ckpt_lib.load_param_parts({}, {"llm": model.params["llm"]}, {"llm": f"{sft}_imported"})["llm"]
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)), imported,
               model.params["llm"])
