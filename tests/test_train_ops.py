"""Around the train step: held-out eval per source, the best checkpoint, profiling, data wait."""

import json
import math
import os
import time

import jax
import numpy as np
import pytest
from tiny_setup import place, setup_on, tiny_config

import data_pipelines
from data_pipelines import packing, pipeline
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib
from mm15_jax.train.best_checkpoint import read_record
from mm15_jax.train.config_checks import check_config
from mm15_jax.train.in_training_eval import HeldOutEval
from mm15_jax.train.loop import train_and_evaluate

SOURCES = {"qa": dict(kind="builtin", weight=0.5), "text_chat": dict(kind="builtin", weight=0.5)}
MESH = dict(data=2, fsdp=1, tensor=1, expert=1)


def two_source_config(**overrides):
  return tiny_config(**{"data.sources": SOURCES, "eval.generate_per_task": 0, **overrides})


def rows(workdir, kind=None):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def evaluator():
  """(config, tokenizer, setup, params, eval_fn): a fresh model on a 2-device mesh."""
  config = two_source_config(**{"eval.batches": 2})
  setup = setup_on(config, MESH, jax.devices()[:2])
  params = state_lib.init_state(setup)["params"]
  tok = data_pipelines.load_tokenizer(config.model.llm.vocab_size)
  return config, tok, setup, params, step_lib.jit_eval_step(setup)


def held_out(config, tok, setup, eval_fn):
  batches = pipeline.make_eval_batches_per_source(config, tok, config.eval.batches)
  return HeldOutEval(eval_fn, lambda b: place(setup, b), batches)


def test_eval_per_source_is_deterministic_and_overall_is_token_weighted(evaluator):
  config, tok, setup, params, eval_fn = evaluator
  first = held_out(config, tok, setup, eval_fn)(params)
  assert held_out(config, tok, setup, eval_fn)(params) == first  # a fresh pipeline, the same numbers
  tokens = {s: first[f"{s}/tokens"] for s in SOURCES}
  examples = {s: first[f"{s}/examples"] for s in SOURCES}
  assert min(tokens.values()) > 0 and tokens["qa"] != tokens["text_chat"]  # the weighting matters
  assert first["tokens"] == sum(tokens.values()) and first["examples"] == sum(examples.values())
  for metric, weights in (("loss", tokens), ("token_accuracy", tokens), ("exact_match", examples)):
    want = sum(first[f"{s}/{metric}"] * weights[s] for s in SOURCES) / sum(weights.values())
    assert first[metric] == pytest.approx(want, rel=1e-12), metric
  assert first["loss"] != pytest.approx(np.mean([first[f"{s}/loss"] for s in SOURCES]), rel=1e-6)
  for prefix in ("", "qa/", "text_chat/"):
    assert first[prefix + "perplexity"] == pytest.approx(math.exp(first[prefix + "loss"]), rel=1e-12)


def test_loss_per_source_equals_the_eval_step_on_that_source_alone(evaluator):
  config, tok, setup, params, eval_fn = evaluator
  result = held_out(config, tok, setup, eval_fn)(params)
  for name, spec in SOURCES.items():
    # The reference batches come from the mixture pipeline given this one source.
    alone = two_source_config(**{"data.sources": {name: spec}})
    sums = [jax.device_get(eval_fn(params, place(setup, {k: v for k, v in b.items() if k not in packing.COUNT_FIELDS})))
            for b in data_pipelines.make_eval_batches(alone, tok, config.eval.batches)]
    count = sum(float(s["count"]) for s in sums)
    assert result[f"{name}/tokens"] == count
    assert result[f"{name}/loss"] == pytest.approx(sum(float(s["loss_sum"]) for s in sums) / count, rel=1e-6)
    assert result[f"{name}/token_accuracy"] == pytest.approx(sum(float(s["correct"]) for s in sums) / count)


def test_a_short_eval_split_is_read_once_then_padded(evaluator):
  config, tok, setup, params, eval_fn = evaluator
  short = two_source_config(**{"eval.batches": 3, "data.eval_examples": 3})
  batches = pipeline.make_eval_batches_per_source(short, tok, short.eval.batches)
  for name in SOURCES:
    got = list(batches[name])
    assert len(got) == 3 and all(b["tokens"].shape == got[0]["tokens"].shape for b in got)
    assert got[0]["loss_mask"].sum() > 0 and got[1]["loss_mask"].sum() == got[2]["loss_mask"].sum() == 0
  result = held_out(short, tok, setup, eval_fn)(params)
  # Each built-in record is one example with trained tokens: 3 per source, none counted twice.
  assert result["qa/examples"] == result["text_chat/examples"] == 3


def test_bad_eval_and_profile_settings_fail_before_compiling():
  for overrides, field in (({"profile.steps": (5, 3)}, "profile.steps=(5, 3)"),
                           ({"profile.steps": (0, 10_000)}, "train.steps="),
                           ({"profile.steps": (4,)}, "profile.steps=(4,)"),
                           ({"eval.best_metric": "caption/loss"}, "eval.best_metric='caption/loss'"),
                           ({"eval.best_mode": "lowest"}, "eval.best_mode='lowest'"),
                           ({"eval.batches": 0}, "eval.batches=0")):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
      check_config(two_source_config(**overrides), paths=False)
  check_config(two_source_config(**{"eval.best_metric": "text_chat/perplexity", "profile.steps": (2, 4)}), paths=False)
  # Generation accuracies are metrics only where generation runs.
  with pytest.raises(ValueError, match=r"eval.best_metric='task/qa'.*need eval.generate_per_task > 0"):
    check_config(two_source_config(**{"eval.best_metric": "task/qa"}), paths=False)
  for name in ("task/qa", "task/text_chat", "task_accuracy"):
    check_config(two_source_config(**{"eval.best_metric": name, "eval.generate_per_task": 2}), paths=False)


def test_best_checkpoint_by_generation_accuracy(tmp_path):
  """eval.best_metric="task_accuracy": the mean of each eval's generation accuracies picks the step."""
  config = two_source_config(**{"eval.every": 1, "eval.batches": 1, "eval.generate_per_task": 2,
                                "eval.best_metric": "task_accuracy", "eval.best_mode": "min"})
  config.train.steps, config.train.warmup_steps, config.checkpoint.async_save = 3, 1, False
  train_and_evaluate(config, str(tmp_path), progress=False)
  tasks = rows(tmp_path, "eval_tasks")
  assert [r["step"] for r in tasks] == [1, 2, 3] and {"qa", "text_chat"} <= set(tasks[0])
  means = [(r["qa"] + r["text_chat"]) / 2 for r in tasks]
  record = read_record(str(tmp_path))
  assert record["metric"] == "task_accuracy" and record["value"] == pytest.approx(min(means))
  assert record["step"] == tasks[means.index(min(means))]["step"]


def best_run(workdir, steps):
  # 'max' on a falling loss: the best is the first eval, which a resumed run keeps only if it
  # remembers it (its own evals all score lower).
  config = two_source_config(**{"eval.every": 1, "eval.best_metric": "qa/loss", "eval.best_mode": "max",
                                "eval.batches": 1})
  config.train.steps, config.train.warmup_steps, config.train.lr = steps, 1, 1e-2
  config.checkpoint.every, config.checkpoint.keep, config.checkpoint.async_save = 1, 20, False
  train_and_evaluate(config, str(workdir), progress=False)
  return config


def test_best_checkpoint_is_the_best_eval_and_survives_a_resume(tmp_path):
  best_run(tmp_path, 3)
  first = rows(tmp_path, "eval")
  config = best_run(tmp_path, 6)  # resumes from step 3
  evals = rows(tmp_path, "eval")
  assert [r["step"] for r in evals] == [1, 2, 3, 4, 5, 6]
  assert max(r["qa/loss"] for r in evals[3:]) < max(r["qa/loss"] for r in first)  # the resume must remember
  want = max(evals, key=lambda r: r["qa/loss"])
  record = read_record(str(tmp_path))
  assert record == dict(step=want["step"], metric="qa/loss", value=want["qa/loss"], mode="max")
  assert set(os.listdir(tmp_path / "best")) == {"best.json", str(want["step"])}
  # Its params are the run's params at that step, loaded as a next stage would load them.
  abstract = setup_on(config, dict(config.mesh)).abstract_state
  best = jax.device_get(ckpt_lib.load_params(str(tmp_path / "best"), abstract["params"]))
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  at_step = jax.device_get(checkpointer.restore(abstract, step=want["step"])["params"])
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, best, at_step)


class SlowIterator:
  """A host iterator that sleeps before each batch: an input-bound run."""

  def __init__(self, inner, seconds):
    self.inner, self.seconds = inner, seconds

  def __next__(self):
    time.sleep(self.seconds)
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def timed_run(workdir, **overrides):
  config = two_source_config(**{"log_every": 2, "checkpoint.every": 0, **overrides})
  config.train.steps = 6
  train_and_evaluate(config, str(workdir), progress=False)
  return [r for r in rows(workdir) if not r.get("includes_compile")]


def test_a_slow_input_shows_as_data_wait(tmp_path, monkeypatch):
  # The profile capture is tested by test_checkpoint's CLI run, in a fresh process.
  normal = timed_run(tmp_path / "normal")
  sleep = 0.5
  make = data_pipelines.make_train_dataset

  class SlowDataset:
    def __init__(self, *args, **kwargs):
      self.ds = make(*args, **kwargs)

    def __iter__(self):
      return SlowIterator(iter(self.ds), sleep)

  monkeypatch.setattr(data_pipelines, "make_train_dataset", SlowDataset)
  slow = timed_run(tmp_path / "slow")
  assert [r["step"] for r in normal] == [r["step"] for r in slow] == [4, 6]
  for r in normal + slow:
    assert 0 <= r["data_wait_s"] <= r["step_seconds"] and 0 <= r["data_wait_fraction"] <= 1
    assert r["data_wait_fraction"] == pytest.approx(r["data_wait_s"] / r["step_seconds"], rel=1e-6)
  assert all(r["data_wait_s"] >= sleep for r in slow)
  assert max(r["data_wait_fraction"] for r in normal) < min(r["data_wait_fraction"] for r in slow)
