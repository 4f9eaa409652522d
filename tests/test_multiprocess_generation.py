"""Generation, evaluation and training metrics with several JAX processes (launch/local.sh 2).

Every run is the quick-start config (experiments/tiny.py) made short. The reference for the
2-process evaluation is the same checkpoint evaluated by one process on 8 devices.
"""

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_multiprocess import local_sh, single_process, train_rows

from mm15_jax import configs
from mm15_jax.evaluation import builtin_eval

QUICK = ["--config=experiments/tiny.py", "--no_progress", "--config.data.num_examples=256", "--config.eval.batches=1",
         "--config.data.prefetch=1", "--config.eval.generate_per_task=2"]
# 20 new tokens: 3 decoding runs per batch, the last cut short.
EVAL = ["--config=experiments/tiny.py", "--builtin", "--num_per_task=2", "--max_new_tokens=20"]
TITLE = "# Built-in held-out evaluation"


def stdout_of(proc) -> list[str]:
  """The lines a run printed, checked to exit 0: its stdout (logs and warnings go to stderr)
  without the lines gloo prints there when the processes connect (the two processes'
  messages may interleave, so any line with a piece of one) or blank ones."""
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, (out + err)[-3000:]
  return [line for line in out.splitlines() if line.strip() and "[Gloo]" not in line and "peer ranks" not in line]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """3 steps on 2 processes, every step logged, on a data=8 mesh; ends with generation."""
  workdir = tmp_path_factory.mktemp("two_process_run")
  out = stdout_of(local_sh(2, f"--workdir={workdir}", "--config.train.steps=3", "--config.log_every=1",
                           "--config.mesh.data=8", flags=QUICK, stderr=subprocess.PIPE))
  return workdir, out


def test_every_step_logs_its_metrics_on_a_data_mesh_over_two_processes(two_process_run):
  workdir, _ = two_process_run
  rows = train_rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite([r["loss"], r["grad_norm"], r["lr"]]).all() and r["loss_tokens"] > 0 for r in rows)


def test_two_process_training_ends_with_the_generation_report(two_process_run):
  workdir, out = two_process_run
  report_dir = os.path.join(workdir, "eval_tasks")
  with open(os.path.join(report_dir, "REPORT.json")) as f:
    report = json.load(f)
  tasks = builtin_eval.config_tasks(configs.load_experiment("experiments/tiny.py"))
  assert list(report["accuracy"]) == tasks and list(report["blanked"]) == tasks
  assert os.path.exists(os.path.join(report_dir, "REPORT.md")) and os.path.exists(report["grounding_png"])
  assert out.count(TITLE) == 1, out[-50:]  # written and printed by process 0 only
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if r.get("kind") == "eval_tasks"]
  assert [r["step"] for r in logged] == [3]
  assert {t: logged[0][t] for t in tasks} == report["accuracy"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A run trained by one process for one step: the first step's learning rate is 0 (warmup),
  so the answers are the long ones of a fresh model and every decoding run is compared."""
  workdir = tmp_path_factory.mktemp("checkpoint")
  stdout_of(single_process(f"--workdir={workdir}", "--config.train.steps=1", "--config.eval.generate_per_task=0",
                           flags=QUICK, stderr=subprocess.PIPE))
  return workdir


def one_and_two(module, flags, args):
  """stdout lines of `python -m module` in one process and under local.sh 2 (args(name): the
  arguments of run "one" or "two")."""
  launches = {"one": lambda *a: single_process(*a, module=module, flags=flags, stderr=subprocess.PIPE),
              "two": lambda *a: local_sh(2, *a, module=module, flags=flags, stderr=subprocess.PIPE)}
  return {name: stdout_of(launch(*args(name))) for name, launch in launches.items()}


def test_two_process_evaluation_gives_the_one_process_report(checkpoint, tmp_path):
  outs = one_and_two("mm15_jax.evaluation", EVAL,
                     lambda name: [f"--checkpoint={checkpoint}", f"--out={tmp_path / name}"])
  reports, pictures = {}, {}
  for name in outs:
    with open(tmp_path / name / "REPORT.json") as f:
      reports[name] = json.load(f)
    assert reports[name].pop("grounding_png") == str(tmp_path / name / "grounding.png")
    pictures[name] = np.asarray(Image.open(tmp_path / name / "grounding.png"))
  one, two = reports["one"], reports["two"]
  predictions = [e["prediction"] for examples in one["examples"].values() for e in examples]
  assert len(predictions) == 2 * len(one["accuracy"])
  # answers to compare (a one-step model ends some answers at once, with its end token)
  assert sum(map(bool, predictions)) >= len(predictions) // 2, predictions
  assert two == one  # every answer, accuracy, blanked accuracy and baseline
  np.testing.assert_array_equal(pictures["two"], pictures["one"])
  assert outs["two"].count(TITLE) == 1, outs["two"][-50:]  # process 0 prints the report


def test_two_process_generate_samples_the_one_process_answer(checkpoint, tmp_path):
  question = builtin_eval.questions("ground", 1)[0]
  Image.fromarray(question["images"][0]).save(tmp_path / "image.png")
  flags = ["--config=experiments/tiny.py", f"--checkpoint={checkpoint}", f"--image={tmp_path / 'image.png'}",
           f"--prompt={question['prompt']}", "--temperature=0.7", "--seed=3", "--max_new_tokens=20"]
  outs = one_and_two("mm15_jax.tools.generate", flags, lambda name: [])
  assert outs["one"], "no answer printed"
  # The same sampled answer (and boxes), printed last and once, by process 0. Before it, gloo's
  # connection messages from both processes interleave on stdout and can leave a fragment of a
  # few characters (a rank digit) on a line of its own; nothing longer may come before it.
  one, two = outs["one"], outs["two"]
  assert two[-len(one):] == one and two.count(one[0]) == 1, two
  assert all(len(line) <= 3 for line in two[:-len(one)]), two


def test_two_process_summary_and_plan_print_the_one_process_result():
  """The mesh's -1 axis is filled by the devices of every process: 8 in both launches."""
  summary = one_and_two("mm15_jax.tools.summary", ["--config=experiments/tiny.py", "--json"], lambda name: [])
  assert summary["two"] == summary["one"] and len(summary["one"]) == 1  # one JSON line, from process 0
  assert json.loads(summary["one"][0])["mesh"]["data"] == 8
  plan = one_and_two("mm15_jax.plan", ["--config=experiments/tiny.py", "--devices=8", "--device_memory_gib=16",
                      "--device_peak_tflops=1", "--json", "--noprobe"],
                     lambda name: [])
  assert len(plan["two"]) == len(plan["one"]) == 1
  one, two = json.loads(plan["one"][0]), json.loads(plan["two"][0])
  del one["compile_s"], two["compile_s"]  # wall time
  assert two == one and one["chips"] == 8
