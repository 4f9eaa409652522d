"""Multi-host behaviour on one machine: several JAX processes, preemption, bad steps.

The multi-process tests start real trainer processes (`launch/local.sh`, jax.distributed with
CPU collectives over localhost) and take a minute or two each on a small CPU.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tiny_setup import ROOT, place, setup_on, tiny_config

import data_pipelines
from data_pipelines import packing
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib
from mm15_jax.train.loop import train_and_evaluate

# The CLI spelling of tiny_config() plus a short run.
TINY_FLAGS = [
    "--config=experiments/tiny.py", "--no_progress", "--config.train.batch_size=8", "--config.data.num_examples=256",
    "--config.data.prefetch=1", "--config.eval.batches=1", "--config.log_every=1",
    "--config.eval.generate_per_task=0",
]


def train_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "kind" not in r]


def local_sh(nproc, *args, module="mm15_jax.train", flags=TINY_FLAGS, stderr=subprocess.STDOUT):
  """`launch/local.sh NPROC -- FLAGS ARGS`, each process running `python -m module`; stderr
  merged into stdout unless given (subprocess.PIPE: communicate() returns it apart)."""
  env = {**os.environ, "PYTHON": sys.executable, "MM15_LOCAL_DEVICES": "8", "MM15_MODULE": module}
  env.pop("XLA_FLAGS", None)  # local.sh gives each process its share
  return subprocess.Popen(
      ["bash", os.path.join(ROOT, "launch", "local.sh"), str(nproc), "--", *flags, *args],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)


def single_process(*args, module="mm15_jax.train", flags=TINY_FLAGS, stderr=subprocess.STDOUT):
  """`python -m module FLAGS ARGS` in one process with 8 devices (the reference of local_sh)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  return subprocess.Popen(
      [sys.executable, "-m", module, *flags, *args],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)


def finish(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def wait_for_train_row(proc, workdir, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and train_rows(workdir):
      return
    time.sleep(0.5)
  raise TimeoutError("no training step logged")


def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path, monkeypatch):
  """2 processes x 4 devices == 1 process x 8 devices fed the same global batches.

  Each process reads every 2nd record and packs its own rows, so the global batch of a
  2-process run is not the 1-process run's batch; the reference therefore concatenates the
  two processes' local batches itself and steps them on 8 devices in this process.

  Process 1 starts its first step 35 s after process 0, as a slower compile on a busy host does:
  CPU collectives (gloo) give up on a peer more than 30 s late, so the step must wait for it.
  """
  monkeypatch.setenv("MM15_LATE_PROCESS", "1:35")
  rc, out = finish(local_sh(2, f"--workdir={tmp_path}", "--config.train.steps=3", "--config.checkpoint.every=3",
                            "--config.eval.generate_per_task=1"))  # and ends with generation
  assert rc == 0, out[-3000:]
  assert (tmp_path / "eval_tasks" / "REPORT.json").exists()
  got = [r["loss"] for r in train_rows(tmp_path)]

  config = tiny_config()
  config.train.steps = 3
  tok = data_pipelines.load_tokenizer(config.model.llm.vocab_size)
  shards = [iter(data_pipelines.make_train_dataset(config, tok, process_index=i, process_count=2)) for i in range(2)]
  setup = setup_on(config, dict(config.mesh))
  step = step_lib.jit_train_step(setup)
  state = state_lib.init_state(setup)
  want = []
  for _ in range(3):
    parts = [dict(next(s)) for s in shards]
    for p in parts:
      for k in packing.COUNT_FIELDS:
        p.pop(k, None)
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = step(state, place(setup, batch))
    want.append(float(metrics["loss"]))
  np.testing.assert_allclose(got, want, rtol=2e-5)
  assert ckpt_lib.latest_step(tmp_path / "checkpoints") == 3


def test_sigterm_to_two_processes_saves_the_agreed_step_and_resumes(tmp_path):
  """JAX's preemption service spreads the notice; both processes save one step and exit 0. (Our
  grace-period handler sits in front of JAX's: this shows JAX is still told.)"""
  proc = local_sh(2, f"--workdir={tmp_path}", "--config.train.steps=500", "--config.checkpoint.every=500")
  wait_for_train_row(proc, tmp_path)
  proc.send_signal(signal.SIGTERM)
  rc, out = finish(proc, timeout=300)
  assert rc == 0, out[-3000:]
  saved = ckpt_lib.latest_step(tmp_path / "checkpoints")
  assert saved == train_rows(tmp_path)[-1]["step"] < 500, out[-3000:]
  assert "preempted: saved step" in out

  rc, out = finish(local_sh(2, f"--workdir={tmp_path}", f"--config.train.steps={saved + 1}"))
  assert rc == 0, out[-3000:]
  assert f"resumed from step {saved}" in out
  assert train_rows(tmp_path)[-1]["step"] == saved + 1


def test_sigterm_ends_a_stalled_run_on_two_processes(tmp_path, monkeypatch):
  """Under JAX's preemption service too (its handler still gets the signal): no step boundary
  within the grace period, the job exits without saving."""
  monkeypatch.setenv("MM15_STALL_BEFORE_FIRST_STEP", "1")
  proc = local_sh(2, f"--workdir={tmp_path}", "--config.checkpoint.sigterm_grace_s=3")
  lines = []
  for line in proc.stdout:  # the start-up line (process 0): every handler is in place
    lines.append(line)
    if line.startswith("mm15_jax:") and "params" in line:
      break
  else:
    raise AssertionError("".join(lines)[-3000:])
  time.sleep(2)  # process 1 prints nothing: give it the moment process 0 needed after its line
  start = time.time()
  proc.send_signal(signal.SIGTERM)
  rc, out = finish(proc, timeout=120)
  out = "".join(lines) + out
  assert rc != 0 and time.time() - start < 60, out[-3000:]
  # The first to time out ends the job (the other is stopped by JAX's service or local.sh).
  assert "no step boundary within checkpoint.sigterm_grace_s=3" in out, out[-3000:]
  assert ckpt_lib.latest_step(tmp_path / "checkpoints") is None


def test_sigterm_saves_at_the_step_boundary_and_a_relaunch_resumes(tmp_path):
  proc = single_process(f"--workdir={tmp_path}", "--config.train.steps=500", "--config.checkpoint.every=500")
  wait_for_train_row(proc, tmp_path)
  proc.send_signal(signal.SIGTERM)
  rc, out = finish(proc, timeout=120)
  assert rc == 0, out[-3000:]
  saved = ckpt_lib.latest_step(tmp_path / "checkpoints")
  assert saved == train_rows(tmp_path)[-1]["step"] < 500, out[-3000:]

  rc, out = finish(single_process(f"--workdir={tmp_path}", f"--config.train.steps={saved + 2}"))
  assert rc == 0, out[-3000:]
  assert f"resumed from step {saved}" in out
  assert [r["step"] for r in train_rows(tmp_path)][-2:] == [saved + 1, saved + 2]


def nan_run(workdir, monkeypatch, policy, steps=4, log_every=1, inject_at=2):
  monkeypatch.setenv("MM15_INJECT_NAN_AT_STEP", str(inject_at))
  config = tiny_config(**{"train.nan_policy": policy, "log_every": log_every})
  config.train.steps = steps
  config.checkpoint.every = 1
  config.checkpoint.async_save = False
  config.checkpoint.keep = 10
  config.eval.generate_per_task = 0
  return config, lambda: train_and_evaluate(config, str(workdir), progress=False)


def restore_params(config, workdir, step):
  setup = setup_on(config, dict(config.mesh))
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.workdir_checkpoints(str(workdir)))
  try:
    return jax.device_get(ckpt.restore(setup.abstract_state, step=step)["params"])
  finally:
    ckpt.close()


def test_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
  config, run = nan_run(tmp_path, monkeypatch, "skip")
  result = run()
  rows = train_rows(tmp_path)
  assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
  assert np.isnan(rows[1]["loss"]) and np.isfinite([rows[0]["loss"], rows[2]["loss"], rows[3]["loss"]]).all()
  assert np.isfinite(result["loss"])
  # The poisoned step left the weights exactly as they were.
  before, after = restore_params(config, tmp_path, 1), restore_params(config, tmp_path, 2)
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_nan_step_stops_the_run_with_the_last_good_checkpoint(tmp_path, monkeypatch):
  # Logging only at the end: the check before each save must catch it.
  config, run = nan_run(tmp_path, monkeypatch, "stop", log_every=4, inject_at=3)
  with pytest.raises(FloatingPointError, match="last good checkpoint"):
    run()
  assert ckpt_lib.latest_step(tmp_path / "checkpoints") == 2
  params = restore_params(config, tmp_path, 2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_sigkill_during_saves_loses_only_the_steps_after_the_last_complete_checkpoint(tmp_path):
  """A checkpoint every step, async, and SIGKILL mid-run: the relaunch resumes from the last
  complete step and its next losses are those of an unbroken run."""
  killed, unbroken = tmp_path / "killed", tmp_path / "unbroken"
  # A learning rate that does not depend on train.steps, so runs of different lengths agree.
  flat_lr = ("--config.train.warmup_steps=1", "--config.train.lr_min_ratio=1.0")
  proc = single_process(f"--workdir={killed}", "--config.train.steps=200", "--config.checkpoint.every=1", *flat_lr)
  wait_for_train_row(proc, killed)
  deadline = time.time() + 300
  while time.time() < deadline and not any(p.name.isdigit() for p in (killed / "checkpoints").iterdir()):
    time.sleep(0.2)  # a first complete checkpoint
  time.sleep(1.0)  # and more saves in flight
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  last = ckpt_lib.latest_step(killed / "checkpoints")
  assert last is not None and last >= 1
  logged = max(r["step"] for r in train_rows(killed))
  assert last <= logged + 2  # nothing past what ran
  rc, out = finish(single_process(f"--workdir={killed}", f"--config.train.steps={last + 2}", *flat_lr))
  assert rc == 0 and f"resumed from step {last}" in out, out[-2000:]
  rc, out = finish(single_process(f"--workdir={unbroken}", f"--config.train.steps={last + 2}", *flat_lr))
  assert rc == 0, out[-2000:]
  want = {r["step"]: r["loss"] for r in train_rows(unbroken)}
  got = {r["step"]: r["loss"] for r in train_rows(killed)}
  for step in (last + 1, last + 2):
    assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)


def test_a_run_preempted_at_an_eval_step_evaluates_it_on_relaunch(tmp_path, monkeypatch):
  """The preemption save at step 2 (an eval step) exits before evaluating; the relaunch evaluates
  step 2 before training on, so the eval curve has no hole."""
  from mm15_jax.train import preemption

  config = tiny_config()
  config.train.steps, config.eval.every, config.eval.generate_per_task = 4, 2, 0
  config.checkpoint.async_save = False
  monkeypatch.setattr(preemption.PreemptionWatch, "should_stop", lambda self, step: step == 2)
  assert train_and_evaluate(config, str(tmp_path), progress=False) == dict(preempted_at=2)
  with open(tmp_path / "metrics.jsonl") as f:
    assert [r["step"] for r in map(json.loads, f) if r.get("kind") == "eval"] == []
  monkeypatch.setattr(preemption.PreemptionWatch, "should_stop", lambda self, step: False)
  train_and_evaluate(config, str(tmp_path), progress=False)
  with open(tmp_path / "metrics.jsonl") as f:
    assert [r["step"] for r in map(json.loads, f) if r.get("kind") == "eval"] == [2, 4]
  train_and_evaluate(config, str(tmp_path), progress=False)  # finished: evaluated again, in place of the old row
  with open(tmp_path / "metrics.jsonl") as f:
    assert [r["step"] for r in map(json.loads, f) if r.get("kind") == "eval"] == [2, 4]


def test_metrics_keep_one_row_per_step_across_a_resume(tmp_path):
  """A kill after steps 3-4 were logged but before step 4's save: the relaunch resumes at 2, logs
  3 and 4 again in place of the old rows, and marks where it resumed."""
  import shutil

  config = tiny_config()
  config.train.steps, config.checkpoint.every, config.eval.every, config.eval.generate_per_task = 4, 2, 0, 0
  config.checkpoint.async_save = False
  train_and_evaluate(config, str(tmp_path), progress=False)
  first = {r["step"]: r["loss"] for r in train_rows(tmp_path)}
  shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if killed before step 4's save
  train_and_evaluate(config, str(tmp_path), progress=False)
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "kind" not in r] == [1, 2, 3, 4]
  assert [(r["step"], r["resumed_from"]) for r in rows if r.get("kind") == "launch"] == [(0, 0), (2, 2)]
  assert [r["step"] for r in rows if r.get("kind") == "eval"] == [4]  # the final eval, once
  again = {r["step"]: r["loss"] for r in rows if "kind" not in r}
  np.testing.assert_allclose([again[s] for s in (3, 4)], [first[s] for s in (3, 4)], rtol=1e-6)  # an exact resume
  # TensorBoard: the relaunch's event file starts with a purge of the first launch's events after step 2.
  newest = max((tmp_path / "tensorboard").glob("events.out.tfevents.*"), key=os.path.getmtime)
  starts = [e.step for e in _events(newest) if e.HasField("session_log") and e.session_log.status == 1]
  assert starts == [2]
  # Killed again before any save: the next launch starts from step 0 and its rows replace them all.
  shutil.rmtree(tmp_path / "checkpoints")
  train_and_evaluate(config, str(tmp_path), progress=False)
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "kind" not in r] == [1, 2, 3, 4]
  assert [r["resumed_from"] for r in rows if r.get("kind") == "launch"] == [0, 0]  # 2: superseded
  newest = max((tmp_path / "tensorboard").glob("events.out.tfevents.*"), key=os.path.getmtime)
  assert [e.step for e in _events(newest) if e.HasField("session_log") and e.session_log.status == 1] == [0]


def _events(path):
  """The Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2

  data, out, at = path.read_bytes(), [], 0
  while at < len(data):
    length = int.from_bytes(data[at:at + 8], "little")
    event = event_pb2.Event()
    event.ParseFromString(data[at + 12:at + 12 + length])
    out.append(event)
    at += 12 + length + 4
  return out


def _stalled_run(workdir, grace_s):
  """A run that hangs before its first step (MM15_STALL_BEFORE_FIRST_STEP), once it has started."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "MM15_STALL_BEFORE_FIRST_STEP": "1"}
  proc = subprocess.Popen([sys.executable, "-m", "mm15_jax.train", *TINY_FLAGS, f"--workdir={workdir}",
                           f"--config.checkpoint.sigterm_grace_s={grace_s}"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:  # the start-up line: the SIGTERM handler is in place
    if line.startswith("mm15_jax:"):
      return proc
  raise AssertionError(f"the run ended before it started: {proc.wait()}")


@pytest.mark.parametrize("second_signal", [None, signal.SIGTERM, signal.SIGINT])
def test_sigterm_ends_a_stalled_run(tmp_path, second_signal):
  """No step boundary comes: the run exits after checkpoint.sigterm_grace_s without saving, or at
  once on a second SIGTERM / a SIGINT."""
  grace_s = 3 if second_signal is None else 600
  proc = _stalled_run(tmp_path, grace_s)
  start = time.time()
  proc.send_signal(signal.SIGTERM)
  if second_signal is not None:
    time.sleep(0.5)
    proc.send_signal(second_signal)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143 and time.time() - start < 30, out[-2000:]
  assert ("no step boundary within checkpoint.sigterm_grace_s=3" if second_signal is None else "again") in out
  assert ckpt_lib.latest_step(tmp_path / "checkpoints") is None  # nothing half-written, nothing saved
