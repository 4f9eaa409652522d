"""The encoder stage (train.objective="object_boxes"): its labels, loss and score against
references computed here, and the handoff of its ViT and connector to the next stage."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines.builtin import object_boxes, scenes
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import configs
from mm15_jax import sharding as shd
from mm15_jax.tools import recipe
from mm15_jax.train import encoder_stage
from mm15_jax.train import state as state_lib
from mm15_jax.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPATIAL = os.path.join(ROOT, "experiments", "tiny_spatial.py")


def test_labels_are_where_the_colours_are_drawn():
  """Each labelled box, in tile pixels, is the bounding box of the tile's pixels near that
  colour (the scaled drawing: within 1.5 px, bicubic resampling blurs edges), and exactly
  the colours drawn are present."""
  data = object_boxes.labelled_tiles(np.random.default_rng(0), 64, 32)
  assert data["tiles"].shape == (64, 32, 32, 3) and data["tiles"].dtype == np.uint8
  assert (data["boxes"] >= 0).all() and (data["boxes"] <= 1).all()
  checked = 0
  for tile, present, boxes in zip(data["tiles"], data["present"], data["boxes"]):
    assert 1 <= present.sum() <= 3
    for c, name in enumerate(object_boxes.COLOR_NAMES):
      if not present[c]:
        assert not boxes[c].any()
        continue
      x1, y1, x2, y2 = boxes[c] * 32
      if min(x2 - x1, y2 - y1) < 3:
        continue  # a few pixels after scaling: resampling leaves no pure pixel to find
      near = np.abs(tile.astype(int) - np.array(scenes.COLORS[name])).max(-1) < 40
      rows, cols = np.nonzero(near)
      assert len(rows), (name, boxes[c])
      np.testing.assert_allclose([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], [x1, y1, x2, y2], atol=1.5)
      checked += 1
  assert checked > 20


def test_loss_and_score_against_references():
  """Tokens on a 2x2 grid: each drawn object belongs to the cell of its centre."""
  rng = np.random.default_rng(1)
  n, k, c = 4, 4, 5
  logits = rng.normal(size=(n, k, c)).astype(np.float32)
  pred = rng.uniform(size=(n, k, c, 4)).astype(np.float32)
  present = (rng.uniform(size=(n, c)) < 0.4).astype(np.float32)
  present[0, 0] = 1
  corner = rng.uniform(0, 0.7, size=(n, c, 2))
  boxes = (np.concatenate([corner, corner + rng.uniform(0.05, 0.3, size=(n, c, 2))], -1) * present[..., None])
  boxes = boxes.astype(np.float32)
  loss, parts = encoder_stage.object_box_loss(lambda tiles: (logits, pred), None, present, boxes)
  target = np.zeros((n, k, c))
  l1 = []
  for i, j in zip(*np.nonzero(present)):
    x1, y1, x2, y2 = boxes[i, j].astype(np.float64)
    cell = int((y1 + y2) / 2 >= 0.5) * 2 + int((x1 + x2) / 2 >= 0.5)
    target[i, cell, j] = 1
    l1.append(np.abs(pred[i, cell, j] - boxes[i, j]).mean())
  x = logits.astype(np.float64)
  bce = np.mean(np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x))))
  np.testing.assert_allclose(float(parts["presence_loss"]), bce, rtol=1e-5)
  np.testing.assert_allclose(float(parts["box_loss"]), np.mean(l1), rtol=1e-5)
  np.testing.assert_allclose(float(loss), bce + np.mean(l1), rtol=1e-5)

  # Two drawn colours (0 and 2) of five. Colour 0's box is read from token 1 (its highest
  # logit), exact; colour 2's from token 3, at IoU 1/3 (equal boxes overlapping by half): 50%.
  truth = np.zeros((1, 5, 4), np.float32)
  truth[0, 0], truth[0, 2] = (0.1, 0.1, 0.5, 0.5), (0.0, 0.0, 0.2, 0.2)
  guess = np.full((1, 4, 5, 4), 0.9, np.float32)
  guess[0, 1, 0], guess[0, 3, 2] = truth[0, 0], (0.1, 0.0, 0.3, 0.2)
  scores = np.full((1, 4, 5), -3.0, np.float32)
  scores[0, 1, 0], scores[0, 3, 2], scores[0, 0, 2] = 2.0, 1.0, 0.5
  scores[0, 2, 4] = 0.2  # colour 4 said present (wrongly); 1 and 3 rightly absent
  s = encoder_stage.score(scores, guess, np.array([[1, 0, 1, 0, 0]], np.float32), truth)
  assert s["box_hit_rate"] == 0.5 and s["presence_accuracy"] == 0.8


def stage(name: str, *overrides):
  config = configs.load_experiment(f"{SPATIAL}:{name}")
  for field, value in overrides:
    configs.set_field(config, field, value)
  return config


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
  """A short encoder stage on the 8 test devices."""
  workdir = tmp_path_factory.mktemp("encoder")
  config = stage("encoder", ("train.steps", 60), ("train.batch_size", 32), ("eval.every", 30),
                 ("train.warmup_steps", 5), ("log_every", 10))
  return workdir, config, encoder_stage.train_encoder(config, str(workdir), progress=False)


def test_encoder_stage_learns_and_saves_only_the_encoder(encoder_run):
  workdir, config, result = encoder_run
  assert set(result) == {"box_hit_rate", "presence_accuracy"}
  rows = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
  assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
  assert ckpt_lib.latest_step(ckpt_lib.workdir_checkpoints(str(workdir))) == 60
  assert sorted(ckpt_lib.stored_parts(str(workdir))) == ["connector", "vit"]
  # Relaunched when finished: nothing is trained again.
  assert encoder_stage.train_encoder(config, str(workdir), progress=False) == {}


def test_next_stage_starts_from_the_encoder_and_keeps_it(encoder_run, tmp_path):
  """The recipe starts the stage after an encoder stage with vit_from and connector_from; with
  the encoder frozen (train.trainable="llm", as the experiment sets) its params come out of the
  next stage exactly as the encoder stage saved them."""
  workdir, _, _ = encoder_run
  entries = recipe.plan(SPATIAL, str(tmp_path / "run"), [], [], check_progress=False)
  assert [e["stage"] for e in entries] == ["encoder", "spatial", "sft"]
  spatial_args = entries[1]["args"]
  assert f"--config.init.vit_from={tmp_path / 'run' / 'encoder'}" in spatial_args
  assert f"--config.init.connector_from={tmp_path / 'run' / 'encoder'}" in spatial_args
  assert not any(a.startswith("--config.init.from_checkpoint") for a in spatial_args)
  assert f"--config.init.from_checkpoint={tmp_path / 'run' / 'spatial'}" in entries[2]["args"]

  config = stage("spatial", ("train.steps", 3), ("eval.every", 0), ("checkpoint.every", 3),
                 ("init.vit_from", str(workdir)), ("init.connector_from", str(workdir)))
  assert config.train.trainable == "llm"
  next_dir = tmp_path / "spatial"
  train_and_evaluate(config, str(next_dir), progress=False)
  abstract = state_lib.make_setup(config, shd.mesh_for_config(config)).abstract_state["params"]
  saved, after = (jax.device_get(ckpt_lib.load_param_parts({}, abstract, {"vit": str(d), "connector": str(d)}))
                  for d in (workdir, next_dir))
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_encoder_configs_are_refused_by_field():
  config = stage("encoder", ("train.batch_size", 12))
  with pytest.raises(ValueError, match=r"config.train.batch_size=12 must divide over the 8 devices"):
    encoder_stage.check_encoder_config(config)
  config = stage("encoder", ("init.vit_from", "/somewhere"))
  with pytest.raises(ValueError, match=r"config.init.vit_from='/somewhere'"):
    encoder_stage.check_encoder_config(config)


def test_two_processes_train_the_encoder_one_process_trains(tmp_path):
  """launch/local.sh 2 (4 devices each) against one process of 8: the same batches, so the same
  saved encoder; process 0 alone writes the metrics."""
  flags = ["--config.train.steps=4", "--config.train.batch_size=16", "--config.eval.every=0",
           "--config.train.warmup_steps=1", "--config.log_every=1"]
  env = {**os.environ, "PYTHON": sys.executable, "MM15_LOCAL_DEVICES": "8"}
  env.pop("XLA_FLAGS", None)  # local.sh gives each process its share
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "--", f"--config={SPATIAL}:encoder",
                        f"--workdir={tmp_path / 'two'}", "--no_progress", *flags],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log[-3000:]
  assert log.count("encoder saved:") == 1
  config = stage("encoder", ("train.steps", 4), ("train.batch_size", 16), ("eval.every", 0),
                 ("train.warmup_steps", 1), ("log_every", 1))
  encoder_stage.train_encoder(config, str(tmp_path / "one"), progress=False)
  abstract = state_lib.make_setup(stage("spatial"), shd.mesh_for_config(stage("spatial"))).abstract_state["params"]
  one, two = (jax.device_get(ckpt_lib.load_param_parts({}, abstract, {"vit": str(d), "connector": str(d)}))
              for d in (tmp_path / "one", tmp_path / "two"))
  # Adam turns the last-bit differences of a sum over 8 devices in another order into steps
  # of up to the learning rate on near-zero gradients: a loose absolute tolerance on params
  # (other batches would move them ~1e-3), a tight one on the losses.
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-4)
  losses = [[r["loss"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl")) if "loss" in r]
            for d in ("one", "two")]
  assert len(losses[1]) == 4
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
