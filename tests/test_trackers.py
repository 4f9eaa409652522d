"""Experiment tracking: TensorBoard and Weights & Biases (offline) get the resolved config, the run
record and every metrics row; a relaunch continues the same W&B run."""

import glob
import json
import os

import numpy as np
import pytest
from tiny_setup import tiny_config

from mm15_jax.train.loop import train_and_evaluate

wandb = pytest.importorskip("wandb")


def _rows(workdir, kind=None):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r.get("kind") == kind]


def wandb_records(path):
  """The protobuf Records of an offline run's .wandb file: W&B's LevelDB-style log (a 7-byte
  header, 32 KiB blocks of records: crc32c, length, type FULL/FIRST/MIDDLE/LAST, payload)."""
  from wandb.proto import wandb_internal_pb2

  data = open(path, "rb").read()
  assert data[:4] == b":W&B", data[:8]
  pos, block, payload = 7, 32768, b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    payload = chunk if kind in (1, 2) else payload + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(payload)
      yield record


def _logged(path):
  """(history rows as dicts, the run's config keys -> values) of one offline run."""
  rows, config = [], {}
  for r in wandb_records(path):
    kind = r.WhichOneof("record_type")
    if kind == "history":
      rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    elif kind == "run":
      config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in r.run.config.update})
  return rows, config


def test_wandb_offline_run_holds_the_logged_scalars_and_config(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = tiny_config()
  config.train.steps, config.log_every, config.checkpoint.every = 2, 1, 1
  config.eval.every, config.eval.generate_per_task = 0, 0
  config.log.wandb.project, config.log.wandb.mode = "mm15-test", "offline"
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir, progress=False)
  run_id = open(os.path.join(workdir, "wandb_run_id")).read().strip()
  files = glob.glob(os.path.join(workdir, "wandb", "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
  assert len(files) == 1, os.listdir(os.path.join(workdir, "wandb"))
  history, logged_config = _logged(files[0])
  train = {r["trainer/step"]: r["train/loss"] for r in history if "train/loss" in r}
  assert list(train) == [1, 2]
  np.testing.assert_allclose([train[s] for s in (1, 2)], [r["loss"] for r in _rows(workdir)], rtol=1e-6)
  evals = [r for r in history if "eval/loss" in r]
  assert len(evals) == 1 and np.isclose(evals[0]["eval/loss"], _rows(workdir, "eval")[-1]["loss"], rtol=1e-6)
  # The resolved config and the run record.
  assert logged_config["train"]["steps"] == 2 and logged_config["run"]["device_count"] == 8, list(logged_config)
  # Relaunched with more steps: the same W&B run goes on, from step 3.
  config.train.steps = 3
  train_and_evaluate(config, workdir, progress=False)
  assert open(os.path.join(workdir, "wandb_run_id")).read().strip() == run_id
  files = sorted(glob.glob(os.path.join(workdir, "wandb", "wandb", f"offline-run-*-{run_id}", "*.wandb")))
  assert len(files) == 2
  assert [r["trainer/step"] for r in _logged(files[-1])[0] if "train/loss" in r] == [3]
  # TensorBoard, on by default beside it.
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))


def test_wandb_without_the_package_says_which_extra(tmp_path, monkeypatch):
  import sys

  from mm15_jax.train import trackers

  monkeypatch.setitem(sys.modules, "wandb", None)
  with pytest.raises(ImportError, match=r"mm15_jax\[wandb\].*--config.log.wandb.project="):
    trackers.make_trackers({"log": {"tensorboard": False, "wandb": {"project": "p"}}}, str(tmp_path), None)
