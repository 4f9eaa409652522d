"""Configs that cannot train sensibly are refused before anything compiles, naming the field,
the value and a fix (mm15_jax/train/config_checks.py: RULES and the rules that relate fields)."""

import subprocess
import sys
import time

import numpy as np
import pytest
from tiny_setup import ROOT, host_batch, tiny_config

from data_pipelines import tokenizer as tokenizer_lib
from mm15_jax.train.config_checks import RULES, check_config

# (overrides, text the error must contain): the cases, then one bad value per RULES row.
CASES = [
    ({"train.lr": -0.1}, "train.lr=-0.1: must be a learning rate > 0"),
    ({"train.lr_min_ratio": -1.0}, "train.lr_min_ratio=-1.0: must be in [0, 1]"),
    ({"data.anyres.n_min": 5, "data.anyres.n_max": 2}, "need 1 <= n_min <= n_max"),
    ({"data.max_tiles": 0}, "data.max_tiles=0: must be an integer >= 1"),
    ({"data.seq_len": 8}, "data.seq_len=8 cannot hold the smallest example"),
    ({"data.seq_len": 20}, "data.seq_len=20 cannot hold the smallest example (4 image tokens"),
    ({"checkpoint.every": -1}, "checkpoint.every=-1: must be an integer >= 0"),
    ({"train.steps": -5}, "train.steps=-5: must be an integer >= 1"),
    ({"log_every": 0}, "log_every=0: must be an integer >= 1"),
    ({"train.batch_size": 0}, "train.batch_size=0: must be an integer >= 1"),
    ({"model.dtype": "float13"}, "model.dtype='float13': must be a floating dtype name"),
    ({"model.param_dtype": "int32"}, "model.param_dtype='int32': must be a floating dtype name"),
    ({"model.llm.vocab_size": 100}, "model.llm.vocab_size=100: the built-in tokenizer needs at least"),
    ({"init.llm_from": "/nonexistent"}, "init.llm_from='/nonexistent': no such run or checkpoint"),
    ({"init.vit_from": "/nonexistent"}, "init.vit_from='/nonexistent'"),
    ({"train.warmup_steps": -1}, "train.warmup_steps=-1"),
    ({"train.grad_clip": -1.0}, "train.grad_clip=-1.0"),
    ({"train.weight_decay": float("nan")}, "train.weight_decay=nan"),
    ({"checkpoint.keep": 0}, "checkpoint.keep=0"),
    ({"checkpoint.sigterm_grace_s": 0}, "checkpoint.sigterm_grace_s=0: must be seconds > 0"),
    ({"log.wandb.mode": "offlien"}, "log.wandb.mode='offlien': must be 'online' or 'offline'"),
    ({"data.read_threads": -2}, "data.read_threads=-2: must be an integer >= -1"),
]


def _config(overrides):
  return tiny_config(**overrides)


@pytest.mark.parametrize("overrides,message", CASES, ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_refused_naming_the_field(overrides, message):
  with pytest.raises(ValueError, match="invalid config") as e:
    check_config(_config(overrides))
  assert message in str(e.value), str(e.value)
  assert any(fix in str(e.value) for fix in ("--config.", "give ", "need "))  # and says what to set


def test_every_rule_has_a_case():
  fields = {key for overrides, _ in CASES for key in overrides}
  assert {field for field, *_ in RULES} <= fields


def test_weights_zero_is_off_and_negative_is_refused():
  c = _config({})
  c.data.sources = {"qa": dict(kind="builtin", weight=1.0), "ground": dict(kind="builtin", weight=0.0),
                    "gone": dict(kind="jsonl", weight=0.0, path="/nonexistent.jsonl", eval_path="/nonexistent.jsonl")}
  check_config(c)
  batch = host_batch(c)  # the weight-0 sources are never opened
  assert np.asarray(batch["loss_mask"]).sum() > 0
  c.data.sources = {"qa": dict(kind="builtin", weight=-1.0)}
  with pytest.raises(ValueError, match=r"data.sources weights \{'qa': -1.0\}"):
    check_config(c)


def test_min_vocab_size_is_the_smallest_that_builds(tmp_path):
  least = tokenizer_lib.min_vocab_size()
  assert tokenizer_lib.load_tokenizer(least, cache_dir=str(tmp_path)).vocab_size == least
  with pytest.raises(RuntimeError):
    tokenizer_lib.load_tokenizer(least - 1, cache_dir=str(tmp_path))


def test_the_trainer_refuses_before_compiling(tmp_path):
  start = time.time()
  out = subprocess.run([sys.executable, "-m", "mm15_jax.train", "--config=experiments/tiny.py",
                        f"--workdir={tmp_path}", "--config.train.lr=-0.1", "--config.log_every=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "train.lr=-0.1" in out.stderr and "log_every=0" in out.stderr, out.stderr[-2000:]
  assert "Compil" not in out.stderr and time.time() - start < 60
