"""Every experiment file loads; every paper size has the right size; the summary tool."""

import glob
import json
import os
import subprocess
import sys

import pytest

from mm15_jax import configs
from mm15_jax.tools import summary as summary_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path, arg=None):
  return configs.load_experiment(f"{path}:{arg}" if arg else path)


EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_loads(path):
  stages = configs.STAGES if os.path.basename(path).startswith("mm15_") else (None,)
  for stage in stages:
    c = load(path, stage)
    assert c.train.steps > 0 and c.data.seq_len > 0
    if stage:
      assert c.stage == stage


def test_unknown_stage_is_a_clear_error():
  with pytest.raises(ValueError, match="stage='finetune'.*pretrain"):
    configs.mm15("3b", "finetune")


def test_learning_rate_rule_matches_the_spec():
  # MM1's rule (docs/recipe.md): 1B 9.3e-5, 3B 5.8e-5, 7B 4.1e-5, 30B 2.2e-5.
  for n, expected in [(1e9, 9.3e-5), (3e9, 5.8e-5), (7e9, 4.1e-5), (30e9, 2.2e-5)]:
    assert configs.peak_learning_rate(n) == pytest.approx(expected, rel=0.03)


def hand_count_llm(size, vocab):
  """Parameters of a Llama-style decoder, counted by hand from the size table."""
  s = configs.LLM_SIZES[size]
  d, f, h, kv = s["d_model"], s["mlp_dim"], s["n_heads"], s["n_kv_heads"]
  hd = d // h
  attn = d * h * hd + 2 * d * kv * hd + h * hd * d
  mlp = 3 * d * f
  norms = 2 * d
  return s["n_layers"] * (attn + mlp + norms) + 2 * vocab * d + d


@pytest.mark.parametrize("size", list(configs.NOMINAL_PARAMS))  # every paper size in the table
def test_paper_sizes_param_count(size):
  c = configs.mm15(size, "pretrain")
  s = summary_lib.summarize(c, devices=256)  # abstract: nothing is allocated
  nominal = configs.NOMINAL_PARAMS[size]
  assert abs(s["llm"]["params"] - nominal) / nominal < 0.25, s["llm"]
  assert s["llm"]["params"] == hand_count_llm(size, c.model.llm.vocab_size)
  # ViT-H/14 at 378 px: ~632M params (open_clip's visual tower, without its projection).
  assert 0.6e9 < s["vit"]["params"] < 0.66e9
  assert s["total"]["params"] == s["vit"]["params"] + s["connector"]["params"] + s["llm"]["params"]
  # fsdp over 256 chips: every decoder matrix has an `embed` dimension, so its fp32 params
  # and two Adam moments (12 bytes a param) are split 256 ways; the RMSNorm scales
  # (2 per layer + the final one) stay whole.
  llm = configs.LLM_SIZES[size]
  norms = (2 * llm["n_layers"] + 1) * llm["d_model"]
  assert s["llm"]["bytes_per_chip"] == pytest.approx((s["llm"]["params"] - norms) * 12 / 256 + norms * 12, abs=16)
  assert s["total"]["bytes_per_chip"] >= s["total"]["params"] * 12 // 256


def test_summary_cli_json():
  out = subprocess.run(
      [sys.executable, "-m", "mm15_jax.tools.summary", "--config", os.path.join(ROOT, "experiments", "tiny.py"),
       "--json"],
      capture_output=True, text=True, check=True, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  s = json.loads(out.stdout)
  assert {"total", "vit", "connector", "llm", "active"} <= set(s)
  assert s["total"]["params"] == sum(s[k]["params"] for k in ("vit", "connector", "llm")) > 0
  assert s["active"]["params"] == s["total"]["params"]  # dense: every param is used per token


def test_summary_cli_reports_active_params_of_moe():
  out = subprocess.run(
      [sys.executable, "-m", "mm15_jax.tools.summary", "--json",
       "--config", os.path.join(ROOT, "experiments", "tiny_moe.py")],
      capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  s = json.loads(out.stdout)
  c = configs.load_experiment(os.path.join(ROOT, "experiments", "tiny_moe.py"))
  llm, moe = c.model.llm, c.model.moe
  expert_weights = (llm.n_layers // moe.interval) * moe.num_experts * 3 * llm.d_model * moe.expert_mlp_dim
  unused = expert_weights * (moe.num_experts - moe.top_k) // moe.num_experts
  assert s["active"]["params"] == s["total"]["params"] - unused


def experiment_specs():
  """Every experiment file with each argument it documents."""
  for path in EXPERIMENTS:
    name = os.path.basename(path)
    if name == "tiny.py":
      args = (None, *configs.STAGES)
    elif name == "tiny_spatial.py":
      args = (None, "encoder", "sft")  # no argument: the spatial stage
    elif name in ("mm15_ui.py", "mm15_video.py"):
      args = ("tiny", *(f"{size},{stage}" for size in configs.NOMINAL_PARAMS for stage in configs.STAGES))
    elif name.startswith("mm15_"):
      args = configs.STAGES
    else:
      args = (None,)
    for arg in args:
      yield f"{path}:{arg}" if arg else path


@pytest.mark.parametrize("spec", list(experiment_specs()), ids=lambda s: os.path.basename(s))
def test_experiment_passes_the_config_checks(spec):
  from mm15_jax.train.config_checks import check_config
  # paths=False: a later stage's init.from_checkpoint names a run that does not exist until the
  # stage before it has trained (tests/test_config_rules.py checks the paths).
  check_config(configs.load_experiment(spec), paths=False)


@pytest.mark.parametrize("spec", list(experiment_specs()), ids=lambda s: os.path.basename(s))
def test_resolved_config_survives_its_json(spec):
  """WORKDIR/config.json gives back the config a run resolved, types included (tuples stay tuples)."""
  from mm15_jax import run_record
  config = configs.load_experiment(spec).copy_and_resolve_references()
  back = run_record.config_from_json(run_record.config_to_json(config))
  assert back.to_dict() == config.to_dict()
  def types(node):
    return {k: types(v) for k, v in node.items()} if isinstance(node, dict) else type(node)
  assert types(back.to_dict()) == types(config.to_dict())
