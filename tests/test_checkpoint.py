"""Save, stop, resume: the next steps match an unbroken run, on the same or another mesh."""

import glob
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_setup import setup_on, tiny_config

from mm15_jax import checkpoint as ckpt_lib
from mm15_jax.train.loop import train_and_evaluate

MESH_A = dict(data=8, fsdp=1, tensor=1, expert=1)
MESH_B = dict(data=2, fsdp=2, tensor=2, expert=1)


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "kind" not in r}


def run(workdir, steps, mesh, **overrides):
  config = tiny_config(**overrides)
  config.train.steps = steps
  config.train.warmup_steps = 2
  config.checkpoint.every = 3
  config.mesh = mesh
  return train_and_evaluate(config, str(workdir), progress=False)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("unbroken")
  run(workdir, 6, MESH_A)
  return workdir


def test_resume_matches_unbroken_run(unbroken, tmp_path):
  run(tmp_path, 3, MESH_A)  # the first process ends after its step-3 checkpoint
  assert ckpt_lib.latest_step(tmp_path / "checkpoints") == 3
  run(tmp_path, 6, MESH_A)  # a new process resumes from step 3
  want, got = losses(unbroken), losses(tmp_path)
  for step in (4, 5, 6):
    assert got[step] == pytest.approx(want[step], rel=1e-6), (step, got, want)


def test_resume_on_a_different_mesh(unbroken, tmp_path):
  run(tmp_path, 3, MESH_A)
  run(tmp_path, 6, MESH_B)
  want, got = losses(unbroken), losses(tmp_path)
  for step in (4, 5, 6):
    assert got[step] == pytest.approx(want[step], rel=1e-4), (step, got, want)


def test_killed_save_resumes_from_last_complete_checkpoint(unbroken, tmp_path):
  run(tmp_path, 3, MESH_A)
  ckpts = tmp_path / "checkpoints"
  # A save killed half-way leaves only orbax's temporary directory behind.
  shutil.copytree(ckpts / "3", ckpts / "6.orbax-checkpoint-tmp-1700000000")
  (ckpts / "6.orbax-checkpoint-tmp-1700000000" / "params" / "_METADATA").unlink(missing_ok=True)
  assert ckpt_lib.latest_step(ckpts) == 3
  run(tmp_path, 6, MESH_A)
  want, got = losses(unbroken), losses(tmp_path)
  assert got[4] == pytest.approx(want[4], rel=1e-6)


def test_restore_params_onto_another_mesh(unbroken):
  config = tiny_config()
  setup_b = setup_on(config, MESH_B)
  checkpointer = ckpt_lib.Checkpointer(unbroken / "checkpoints")
  restored = checkpointer.restore(setup_b.abstract_state)
  assert int(restored["step"]) == 6
  for x, s in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(setup_b.param_shardings)):
    assert x.sharding == s
  setup_a = setup_on(config, MESH_A)
  again = checkpointer.restore(setup_a.abstract_state)
  checkpointer.close()
  for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(jax.device_get(again))):
    np.testing.assert_array_equal(a, b)


def test_compressed_plain_and_older_steps_restore_alike(unbroken, tmp_path):
  """checkpoint.compress only changes the bytes on disk: a step written with zstd, one without
  and one in the format of earlier versions (orbax's StandardSave) restore to the same state,
  whichever setting the reader has."""
  setup = setup_on(tiny_config(), MESH_A)
  reader = ckpt_lib.Checkpointer(unbroken / "checkpoints")
  state = reader.restore(setup.abstract_state)
  reader.close()
  sizes = {}
  for compress in (True, False):
    writer = ckpt_lib.Checkpointer(tmp_path / f"compress_{compress}", compress=compress)
    writer.save(state)
    writer.close()
    # Zeros, which zstd shrinks to nothing, show whether the arrays were compressed.
    zeros = ckpt_lib.Checkpointer(tmp_path / f"zeros_{compress}", compress=compress)
    zeros.save(jax.tree.map(jnp.zeros_like, state) | dict(step=state["step"]))
    zeros.close()
    files = glob.glob(str(tmp_path / f"zeros_{compress}" / "6" / "**" / "*"), recursive=True)
    sizes[compress] = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
  assert sizes[True] < 0.5 * sizes[False], sizes
  older = ocp.CheckpointManager(tmp_path / "older", item_names=("params", "train"))
  older.save(6, args=ocp.args.Composite(params=ocp.args.StandardSave(state["params"]), train=ocp.args.StandardSave(
      {k: state[k] for k in ("step", "opt_state", "rng")})))
  older.wait_until_finished()
  older.close()
  want = jax.device_get(state)
  for written in ("compress_True", "compress_False", "older"):
    for compress in (True, False):
      checkpointer = ckpt_lib.Checkpointer(tmp_path / written, compress=compress)
      got = jax.device_get(checkpointer.restore(setup.abstract_state))
      checkpointer.close()
      jax.tree.map(np.testing.assert_array_equal, got, want)


def test_next_stage_starts_from_previous_params(unbroken, tmp_path):
  config = tiny_config()
  setup = setup_on(config, MESH_A)
  params = ckpt_lib.load_params(str(unbroken), setup.abstract_state["params"])
  checkpointer = ckpt_lib.Checkpointer(unbroken / "checkpoints")
  saved = checkpointer.restore(setup.abstract_state)["params"]
  checkpointer.close()
  for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(saved))):
    np.testing.assert_array_equal(a, b)
  # An SFT-like stage: fresh optimizer, params from the previous run, its own step count.
  result = run(tmp_path, 1, MESH_A, **{"init.from_checkpoint": str(unbroken)})
  assert np.isfinite(result["loss"])
  with pytest.raises(FileNotFoundError, match="nowhere.: no complete checkpoint found"):
    ckpt_lib.load_params(str(tmp_path / "nowhere"), setup.abstract_state["params"])


def test_run_writes_its_resolved_config_and_a_run_record(unbroken):
  from mm15_jax import run_record
  config = tiny_config()
  config.train.steps, config.train.warmup_steps, config.checkpoint.every, config.mesh = 6, 2, 3, MESH_A
  assert run_record.load_config(str(unbroken)).to_dict() == config.copy_and_resolve_references().to_dict()
  with open(unbroken / "runs.jsonl") as f:
    runs = [json.loads(line) for line in f]
  assert len(runs) == 1 and runs[0]["mesh"]["data"] == 8 and runs[0]["process_count"] == 1
  assert runs[0]["device_count"] == 8 and "jax" in runs[0]["packages"]


def test_load_model_from_a_workdir_alone(unbroken, tmp_path):
  from mm15_jax.inference import load_model
  model = load_model(str(unbroken))  # no experiment file: the run's config.json
  assert model.config.train.steps == 6 and model.config.mesh.to_dict() == MESH_A
  checkpointer = ckpt_lib.Checkpointer(unbroken / "checkpoints")
  saved = checkpointer.restore(setup_on(tiny_config(), MESH_A).abstract_state)["params"]
  checkpointer.close()
  for a, b in zip(jax.tree.leaves(jax.device_get(model.params)), jax.tree.leaves(jax.device_get(saved))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_model(str(tmp_path))


def test_a_resumed_run_appends_to_its_run_record(unbroken, tmp_path):
  run(tmp_path, 3, MESH_A)
  run(tmp_path, 4, MESH_B)  # a relaunch on another mesh
  from mm15_jax import run_record
  assert run_record.load_config(str(tmp_path)).mesh.to_dict() == MESH_B
  with open(tmp_path / "runs.jsonl") as f:
    meshes = [json.loads(line)["mesh"] for line in f]
  assert [m["tensor"] for m in meshes] == [1, 2]


def test_cli_writes_metrics_events_and_checkpoints(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  out = subprocess.run(
      [sys.executable, "-m", "mm15_jax.train", "--config=experiments/tiny.py", f"--workdir={tmp_path}",
       "--config.train.steps=2", "--config.log_every=1", "--config.checkpoint.every=2",
       "--config.train.batch_size=4", "--config.eval.batches=1", "--config.mesh.data=2", "--no_progress",
       "--config.eval.generate_per_task=2", "--config.profile.steps=(1, 2)"],
      cwd=root, env=env, check=True, capture_output=True, text=True, timeout=600).stdout
  # Without a progress bar (as under every launcher) the log shows each logged step and each event.
  lines = out.splitlines()
  step_lines = [line for line in lines if re.match(r"step \d+/2 \(", line)]
  assert [line.split()[1] for line in step_lines] == ["1/2", "2/2"], out[-3000:]
  assert re.fullmatch(r"step 2/2 \(100%\) loss \d+\.\d{4} lr \S+ grad_norm \S+ tokens/s [\d,]+ mfu [\d.]+% "
                      r"data_wait \d+% eta 0s", step_lines[1]), step_lines[1]
  assert any(re.fullmatch(r"checkpoint: step 2 saved in [\d.]+ s.*", line) for line in lines), out[-3000:]
  assert any(line.startswith("step 2 eval: loss") for line in lines) and "initialised" in out
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "kind" not in r]
  assert [r["step"] for r in train_rows] == [1, 2]
  for r in train_rows:
    assert {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(r)
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
  evals = {r["kind"]: r for r in rows if "kind" in r}
  assert 0 <= evals["eval"]["exact_match"] <= 1
  # The run ends by answering held-out questions per built-in task, with a grounding picture.
  assert set(evals["eval_tasks"]) >= {"qa", "ground", "multi_image"}
  assert (tmp_path / "eval_tasks" / "REPORT.md").exists() and (tmp_path / "eval_tasks" / "grounding.png").exists()
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
  assert (tmp_path / "checkpoints" / "2" / "params").exists()
  # config.profile.steps traced step index 1 (in a fresh process: a process that has built TPU
  # topologies with libtpu, as the planner tests do, crashes in jax.profiler.start_trace).
  assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
