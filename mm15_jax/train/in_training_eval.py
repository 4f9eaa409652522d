"""Held-out evaluation during and after training: per mixture component and overall.

For each source of config.data.sources, the eval step's sums over the first `eval.batches`
batches of that source's eval split give one row of metrics.jsonl (kind "eval"):

  loss, perplexity, token_accuracy, exact_match, tokens, examples    all sources together
  <source>/loss, <source>/perplexity, ...                            each source alone

The overall numbers divide the summed sums, so they are the token-weighted mean of the
sources (exact match: example-weighted), not a mean of their means. Perplexity is exp(loss).
With `eval.generate_per_task` > 0 and only built-in sources, the evaluation module's
generation accuracy per task is logged beside it (kind "eval_tasks"); eval.best_metric may
name it (`task/<task>`, or `task_accuracy`: the mean over tasks).

Every pass reads the same batches and sums in a fixed order, so a fixed checkpoint gives the
same numbers every time.
"""

import json

import jax
import numpy as np

from data_pipelines import mixture, packing, storage
from mm15_jax import distributed
from mm15_jax.evaluation import builtin_eval

SUMS = ("loss_sum", "correct", "count", "exact", "examples")  # what step.eval_step returns
METRICS = ("loss", "perplexity", "token_accuracy", "exact_match")  # the names eval.best_metric may use


def metric_names(config) -> list[str]:
  """Every metric an evaluation gives that eval.best_metric may name: the held-out ones, and
  with generation (eval.generate_per_task > 0, built-in sources) task_accuracy and task/<task>."""
  names = list(METRICS) + [f"{s}/{m}" for s in config.data.sources for m in METRICS]
  if config.eval.generate_per_task and mixture.all_builtin(config):
    names += ["task_accuracy"] + [f"task/{t}" for t in builtin_eval.config_tasks(config)]
  return names


def task_metrics(accuracy: dict) -> dict:
  """Generation accuracy per task -> the names eval.best_metric may use: task/<task> each, and
  task_accuracy, their mean (each task weighs the same)."""
  return {**{f"task/{t}": a for t, a in accuracy.items()}, "task_accuracy": float(np.mean(list(accuracy.values())))}


def eval_sums(eval_fn, params, batches, put) -> dict:
  """The eval step's sums over host batches, accumulated in float64 on the host."""
  totals = dict.fromkeys(SUMS, 0.0)
  for host_batch in batches:
    host_batch = {k: v for k, v in host_batch.items() if k not in packing.COUNT_FIELDS}
    out = distributed.host_value(eval_fn(params, put(host_batch)))
    for k in SUMS:
      totals[k] += float(out[k])
  return totals


def summarize(totals: dict) -> dict:
  """Sums -> means; NaN where there is nothing to average (e.g. an empty eval split)."""
  count, examples = totals["count"], totals["examples"]
  loss = totals["loss_sum"] / count if count else float("nan")
  with np.errstate(over="ignore"):
    perplexity = float(np.exp(np.float64(loss)))
  return dict(
      loss=loss,
      perplexity=perplexity,
      token_accuracy=totals["correct"] / count if count else float("nan"),
      exact_match=totals["exact"] / examples if examples else float("nan"),
      tokens=int(count),
      examples=int(examples),
  )


class HeldOutEval:
  """Loss, perplexity, token accuracy and exact match per source and overall (module docstring).

  eval_fn: step.jit_eval_step(setup); put: host batch -> global device batch;
  batches_per_source: {name: re-iterable host batches} (pipeline.make_eval_batches_per_source).
  """

  def __init__(self, eval_fn, put, batches_per_source: dict):
    self._eval_fn, self._put = eval_fn, put
    self.batches_per_source = dict(batches_per_source)

  def __call__(self, params) -> dict:
    overall = dict.fromkeys(SUMS, 0.0)
    per_source = {}
    for name, batches in self.batches_per_source.items():
      sums = eval_sums(self._eval_fn, params, batches, self._put)
      per_source.update({f"{name}/{k}": v for k, v in summarize(sums).items()})
      overall = {k: overall[k] + sums[k] for k in SUMS}
    return {**summarize(overall), **per_source}


def describe(result: dict, sources) -> str:
  """One line for the console."""
  losses = ", ".join(f"{s} {result[f'{s}/loss']:.4f}" for s in sources)
  return (f"eval: loss {result['loss']:.4f} (perplexity {result['perplexity']:.2f}), token accuracy "
          f"{result['token_accuracy']:.3f}, exact match {result['exact_match']:.3f} on {result['examples']} "
          f"examples; loss per source: {losses}")


class TaskGeneration:
  """Accuracy per built-in task by generating answers to held-out questions (evaluation.builtin_eval).

  The inference model is built once; later calls only swap in the new params, so its passes
  compile once per run. The final call (report=True) also writes WORKDIR/eval_tasks/REPORT.md,
  REPORT.json and grounding.png, and prints the report. Several processes: all generate every
  answer (the same calls, so the collectives match), process 0 writes and prints.
  """

  def __init__(self, config, tokenizer, workdir: str):
    self._config, self._tokenizer = config, tokenizer
    self.out_dir = storage.join(workdir, "eval_tasks")
    self._model = None

  def _model_with(self, params):
    from mm15_jax.inference import Model  # inference is only needed here

    if self._model is None:
      self._model = Model.from_params(self._config, params, self._tokenizer)
    else:
      self._model.params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, self._model.params))
    return self._model

  def __call__(self, params, *, report: bool = False) -> dict:
    # out_dir on every process: with it the report also generates blanked answers, which
    # every process must join; evaluate_builtin writes on process 0 only.
    accuracy = builtin_eval.evaluate_builtin(
        self._model_with(params), self._config, num_per_task=self._config.eval.generate_per_task,
        out_dir=self.out_dir if report else None, baseline=report)
    if report and distributed.is_main():
      print(storage.read_text(storage.join(self.out_dir, "REPORT.md")))
      print(f"grounding example: {storage.join(self.out_dir, 'grounding.png')}")
    return accuracy


def missed_at(config, workdir: str, start: int) -> bool:
  """Whether a run resuming at `start` must evaluate before its first step: a preemption at an
  evaluation step saves that step and exits without evaluating it, so its metrics.jsonl has no
  eval row there. Process 0 reads the file; every process gets its answer (eval is collective)."""
  if not (config.eval.every and 0 < start < config.train.steps and start % config.eval.every == 0):
    return False
  missed = 0
  if distributed.is_main():
    path = storage.join(workdir, "metrics.jsonl")
    lines = storage.read_text(path).splitlines() if storage.exists(path) else []
    rows = map(json.loads, filter(str.strip, lines))
    missed = not any(r.get("kind") == "eval" and r.get("step") == start for r in rows)
  return bool(distributed.from_main(int(missed)))
