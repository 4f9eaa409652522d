"""The measuring parts of benchmarks/ on tiny sizes: the FLOP formula against XLA's count of
the compiled step, and the checkpoint benchmark's round trip and page-cache probe."""

import importlib.util
import json
import os

import jax
import numpy as np

from mm15_jax import sharding as shd
from mm15_jax.train import flops as flops_lib
from mm15_jax.train import state as state_lib

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def formula_and_xla_flops(remat):
  train_step = load("train_step")
  config = train_step.make_config(train_step.PRESETS["tiny"], "xla", remat)
  config.train.batch_size = 2
  config.model.llm.n_layers = 4  # a layer loop counted once would be far off
  one = jax.devices()[:1]  # XLA's count is per device
  setup = state_lib.make_setup(config, shd.make_mesh(config.mesh, devices=one))
  counts = flops_lib.param_counts(setup.abstract_params)
  host = train_step.synthetic_batch(config, np.random.default_rng(0))
  return flops_lib.flops_per_step(config, counts), train_step.xla_step_flops(config, host, devices=one)


def test_flop_formula_against_xla_count():
  formula, xla = formula_and_xla_flops("none")
  # XLA adds elementwise work and the optimizer to the formula's matmuls (0.946 when written;
  # with remat="full" the ratio drops to 0.76: XLA counts the recomputed forward).
  assert 0.93 < formula / xla < 1.0


def test_checkpoint_benchmark_round_trip(tmp_path):
  ckpt_io = load("checkpoint_io")
  state = ckpt_io.randomize(ckpt_io.synthetic_state(3 * 4096))
  times = ckpt_io.checkpoint_io(state, str(tmp_path))
  assert times["restore_exact"]
  assert 0 < times["async_blocked_s"] <= times["async_save_s"]
  assert not os.listdir(tmp_path)  # the checkpoints are removed

  path = tmp_path / "probe.bin"
  path.write_bytes(os.urandom(1 << 20))
  path.read_bytes()
  assert ckpt_io.cached_fraction([str(path)]) == 1.0  # just read: every page cached


def test_maxtext_peer_alternates_the_two_and_reads_maxtexts_step_log(tmp_path, monkeypatch, capsys):
  """The peer comparison with a stand-in for MaxText's trainer (the real one needs its own
  environment): its per-step log is read from step 2 on, each side's median over rounds is
  compared, and the two run alternately."""
  peer = load("maxtext_peer")
  fake = tmp_path / "python"
  # MaxText's metric lines; steps 0 and 1 only dispatch work (times far too small).
  fake.write_text("#!/bin/sh\n"
                  "echo 'I1206 metric_logger.py:265] completed step: 0, seconds: 0.070, TFLOP/s/device: 4.5'\n"
                  "echo 'completed step: 1, seconds: 0.385, Tokens/s/device: 10633.9'\n"
                  "echo 'completed step: 2, seconds: 4.000, Tokens/s/device: 1024.0' >&2\n"
                  "echo 'completed step: 3, seconds: 2.000, Tokens/s/device: 2048.0'\n")
  fake.chmod(0o755)
  order, ours_speeds = [], iter([1500.0, 900.0, 1600.0])
  monkeypatch.setattr(peer, "maxtext_base_config", lambda python: "/x/base.yml")
  monkeypatch.setattr(peer, "ours", lambda steps, chunk: order.append("ours") or next(ours_speeds))
  real = peer.maxtext
  monkeypatch.setattr(peer, "maxtext", lambda *a: order.append("maxtext") or real(*a))
  peer.main([f"--maxtext_python={fake}", "--rounds=3", "--steps=2"])
  assert order == ["ours", "maxtext"] * 3
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  maxtext_speed = 8 * 512 / 3.0  # mean of steps 2 and 3
  assert summary["maxtext_median_tokens_per_s"] == maxtext_speed
  assert summary["ours_median_tokens_per_s"] == 1500.0
  assert summary["ratio"] == 1500.0 / maxtext_speed
  cmd = peer.maxtext_command(str(fake), peer.maxtext_base_config(str(fake)), 6, "none", str(tmp_path))
  assert cmd[1:4] == ["-m", "maxtext.trainers.pre_train.train", "/x/base.yml"]
  assert "steps=8" in cmd and "remat_policy=none" in cmd and "base_emb_dim=256" in cmd and "dtype=float32" in cmd


def test_grounding_probe_tiles_boxes_and_scores(tmp_path):
  probe = load("grounding_probe")
  from data_pipelines.builtin import scenes
  tiles, boxes = probe.one_object_tiles(24, 32, seed=0)
  assert tiles.shape == (24, 32, 32, 3) and tiles.dtype == np.uint8
  colors = np.array(list(scenes.COLORS.values()))
  for tile, box in zip(tiles, boxes):
    # Pixels of a shape colour lie inside the box (to a pixel) and span it but for the edges
    # that bicubic downscaling blends (a triangle's apex most): the box is where the shape is.
    near = (np.abs(tile[:, :, None, :].astype(int) - colors[None, None]).sum(-1) <= 24).any(-1)
    rows, cols = np.nonzero(near)
    assert len(rows), "the shape is in the tile"
    edges = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / 32
    assert np.all(edges[:2] >= box[:2] - 1 / 32) and np.all(edges[2:] <= box[2:] + 1 / 32), (edges * 32, box * 32)
    assert np.all(np.abs(edges - box) <= 2.5 / 32), (edges * 32, box * 32)

  truth = np.array([[0, 0, 4, 4], [0, 0, 2, 4]])
  assert probe.hit_rate(truth, truth) == 1.0
  # Disjoint: IoU 0, a miss; the top half of the second box: IoU 4 / 8 = 0.5, a hit.
  assert probe.hit_rate(np.array([[5, 5, 8, 8], [0, 0, 2, 2]]), truth) == 0.5

  out = tmp_path / "encoder"
  result = probe.main(["--config=experiments/tiny_spatial.py:spatial", "--steps=3", "--probe_steps=3",
                       "--train_scenes=32", "--test_scenes=8", "--batch=8", f"--save_encoder={out}"])
  assert 0 <= result["supervised_hit_rate"] <= 1 and 0 <= result["probe_random_init_hit_rate"] <= 1
  from mm15_jax import checkpoint as ckpt_lib
  assert ckpt_lib.stored_parts(str(out)) == ["vit"]  # what init.vit_from starts a run from


def test_grounding_probe_attributes_label_what_is_drawn_and_score_by_hand():
  probe = load("grounding_probe")
  from data_pipelines.builtin import scenes
  data = probe.one_object_scenes(16, 32, seed=3)
  colors = np.array(list(scenes.COLORS.values()))
  for tile, color in zip(data["tiles"], data["colors"]):
    # The labelled colour is the one drawn: the shape colour nearest any pixel (bicubic blends small ones).
    distance = np.abs(tile.reshape(-1, 1, 3).astype(int) - colors[None]).sum(-1).min(0)
    assert distance[color] <= 48 and distance[color] == distance.min(), (color, distance)
  assert set(data["shapes"]) <= {0, 1, 2} and len(set(data["shapes"])) > 1

  # Two examples, 5 colour then 3 shape logits: colour right on the first only, shape on both.
  logits = np.array([[9, 0, 0, 0, 0, 0, 0, 9], [0, 9, 0, 0, 0, 9, 0, 0]], np.float32)
  y = np.array([[0, 2], [2, 0]])
  assert probe.attribute_accuracy(logits, y) == {"color": 0.5, "shape": 1.0}
  uniform = np.zeros((2, 8), np.float32)  # cross-entropy of uniform logits: ln 5 + ln 3
  np.testing.assert_allclose(float(probe.attribute_loss(uniform, y)), np.log(5) + np.log(3), rtol=1e-6)

  result = probe.main(["--config=experiments/tiny_spatial.py:spatial", "--steps=3", "--probe_steps=3",
                       "--train_scenes=32", "--test_scenes=8", "--batch=8", "--attributes",
                       "--set=model.vit.patch_size=4", "--set=model.connector.tokens_per_tile=16",
                       "--set=model.connector.kind=mlp"])
  assert result["tokens_per_tile"] == 16  # --set changed the config the probe built
  for key in ("supervised_attributes", "probe_random_init_attributes"):
    assert set(result[key]) == {"color", "shape"} and all(0 <= v <= 1 for v in result[key].values())

  # The whole model asked about colours and shapes (a random init here): an answer that is right
  # names an object of the scene, so right <= in_scene in every case.
  from mm15_jax.inference import load_model
  asked = probe.ask_attributes(load_model("experiments/tiny_spatial.py:spatial", None), 2)
  assert set(asked) == {f"{k} objects, {a}" for k in (1, 2, 3) for a in ("color", "shape")}
  assert all(v["n"] == 2 and 0 <= v["right"] <= v["in_scene"] <= 1 for v in asked.values())
