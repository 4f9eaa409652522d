"""MoE end to end: parameter counts of the paper's MoE sizes, training with expert parallelism."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from gcs_emulator import running
from tiny_setup import ROOT, setup_on, tiny_config, train_on_fixed_batch

from data_pipelines import storage
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import configs, run_record
from mm15_jax.models.mm15 import position_grids
from mm15_jax.tools import summary as summary_lib
from mm15_jax.train import optimizer as opt_lib


def hand_count_moe_llm(size):
  """Decoder params by hand: dense layers, plus E experts and a router in every MoE layer."""
  s, m = configs.LLM_SIZES[size], configs.MOE_SIZES[size]
  d, f, h, kv, n = s["d_model"], s["mlp_dim"], s["n_heads"], s["n_kv_heads"], s["n_layers"]
  e, k, moe_layers = m["num_experts"], m["top_k"], s["n_layers"] // m["interval"]
  hd = d // h
  attn = d * h * hd + 2 * d * kv * hd + h * hd * d
  mlp = 3 * d * f
  vocab = 32768
  total = n * (attn + 2 * d) + (n - moe_layers) * mlp + moe_layers * (e * mlp + d * e) + 2 * vocab * d + d
  active = total - moe_layers * (e - k) * mlp
  return total, active


@pytest.mark.parametrize("size", ["1b", "3b"])
def test_moe_sizes_total_and_active_params(size):
  c = configs.load_experiment(os.path.join(ROOT, "experiments", f"mm15_{size}_moe.py:pretrain"))
  s = summary_lib.summarize(c, devices=256)
  total, active = hand_count_moe_llm(size)
  assert s["llm"]["params"] == total
  non_llm = s["vit"]["params"] + s["connector"]["params"]
  assert s["active"]["params"] == active + non_llm
  # Top-2 of experts the size of the dense FFN: a token uses about 1.5x the dense decoder
  # (two FFNs in half the layers); the model holds many times it.
  dense = summary_lib.summarize(configs.mm15(size, "pretrain"), devices=256)["llm"]["params"]
  assert dense < active < 1.6 * dense and total > 10 * dense


@pytest.mark.parametrize("impl", ["auto", "ragged", "capacity"])  # auto: "blocked" on CPU
def test_tiny_moe_trains_with_expert_parallelism(impl):
  config = tiny_config("tiny_moe.py", **{"model.moe.impl": impl})
  config.train.steps, config.train.warmup_steps, config.train.lr = 40, 4, 1e-2
  setup = setup_on(config, dict(data=2, fsdp=1, tensor=1, expert=4))
  # Expert weights are split over the expert axis.
  gate = setup.param_shardings["llm"]["layers"]["sparse"]["moe"]["gate"]
  assert "expert" in str(gate.spec)
  losses, metrics = train_on_fixed_batch(setup, config)
  assert losses[-1] < losses[0] / 4, losses[::8]
  load = jax.device_get(metrics["expert_load"])
  assert load.shape == (4,) and abs(load.sum() - 1) < 1e-4
  # E * sum f_i P_i is 1 at perfect balance and E at collapse onto one expert; near 1 after a
  # short run under the balancing loss (not a strict bound: f and P may anticorrelate a little).
  assert 0.95 <= float(metrics["moe_lb_loss"]) < 1.5
  assert float(metrics["moe_z_loss"]) > 0
  if impl != "capacity":
    assert float(metrics["dropped_tokens"]) == 0


def test_moe_stages_hand_over_on_two_processes_in_a_bucket(tmp_path):
  """The MoE recipe as users run it: experiments/tiny_moe.py's pretrain (32 px) then cpt (48 px,
  AnyRes) by `mm15_jax.tools.recipe --processes=2`, experts split over both processes
  (expert=4, data=2), the workdir in a bucket (the GCS emulator). cpt's first update has
  learning rate 0 (warmup), so its step-1 checkpoint holds what it was handed: one process
  reading pretrain's last checkpoint with the grids resized must find the same values."""
  trainer = ["--config.train.steps=2", "--config.checkpoint.every=1", "--config.train.batch_size=8",
             "--config.data.num_examples=256", "--config.data.prefetch=1", "--config.eval.batches=1",
             "--config.eval.generate_per_task=0", "--config.log_every=1", "--config.mesh.expert=4",
             "--config.mesh.data=2", "--config.mesh.fsdp=1"]
  with running("mm15-moe", str(tmp_path)) as bucket:
    workdir = f"{bucket}/moe"
    env = {**os.environ, "PYTHON": sys.executable, "MM15_LOCAL_DEVICES": "8"}  # with the emulator's
    env.pop("XLA_FLAGS", None)  # local.sh gives each process its share
    out = subprocess.run([sys.executable, "-m", "mm15_jax.tools.recipe", "--config=experiments/tiny_moe.py",
                          f"--workdir={workdir}", "--processes=2", "--stages=pretrain,cpt", "--", *trainer],
                         cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "position grid resized 4x4 -> 6x6" in log and f"params from {workdir}/pretrain" in log
    for stage in ("pretrain", "cpt"):
      rows = [json.loads(line) for line in storage.read_text(f"{workdir}/{stage}/metrics.jsonl").splitlines()]
      train = [r for r in rows if "kind" not in r]
      assert [r["step"] for r in train] == [1, 2] and all(r["dropped_tokens"] == 0 for r in train)
    cpt = run_record.load_config(f"{workdir}/cpt")
    assert cpt.model.moe.num_experts == 4 and cpt.model.vit.image_size == 48 and cpt.data.anyres.enabled
    assert float(opt_lib.learning_rate_schedule(cpt.train)(0)) == 0.0
    setup = setup_on(cpt, dict(cpt.mesh))  # the run's mesh (data 2, expert 4), on one process
    abstract = setup.abstract_state["params"]
    want = jax.device_get(ckpt_lib.load_params(f"{workdir}/pretrain", abstract, grids=position_grids(cpt.model)))
    got = jax.device_get(ckpt_lib.load_params(f"{workdir}/cpt/checkpoints/1", abstract))
  assert got["llm"]["layers"]["sparse"]["moe"]["gate"].shape[1] == 4  # the experts, stacked per layer
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
