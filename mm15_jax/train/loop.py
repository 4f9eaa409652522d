"""The training loop: mesh, data, state (fresh, resumed or from a previous stage), steps, eval."""

import os
import time

import jax
import jax.numpy as jnp

import data_pipelines
from mm15_jax import batch as batch_lib
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import sharding as shd
from mm15_jax.config_checks import check_config
from mm15_jax.train import flops as flops_lib
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib
from mm15_jax.train.metrics import MetricsWriter
from mm15_jax.train.preemption import PreemptionWatch
from mm15_jax.train.prefetch import DevicePrefetcher, global_batch_putter


def evaluate(eval_fn, params, eval_batches, put) -> dict:
  """Loss, token accuracy and exact match of whole answers over the eval batches."""
  totals = None
  for host_batch in eval_batches:
    host_batch = {k: v for k, v in host_batch.items() if k != "num_skipped"}
    out = jax.device_get(eval_fn(params, put(host_batch)))
    totals = out if totals is None else {k: totals[k] + out[k] for k in out}
  count = max(float(totals["count"]), 1.0)
  return dict(
      loss=float(totals["loss_sum"]) / count,
      token_accuracy=float(totals["correct"]) / count,
      exact_match=float(totals["exact"]) / max(float(totals["examples"]), 1.0),
      examples=int(totals["examples"]),
  )


def _all_builtin(config) -> bool:
  return all(spec.get("kind", "builtin") == "builtin" for spec in config.data.sources.values())


def answer_held_out_questions(config, params, tokenizer, workdir: str) -> dict:
  """Generates answers to held-out built-in questions: accuracy per task, REPORT.md, grounding.png."""
  from mm15_jax.evaluation.builtin_eval import evaluate_builtin  # inference is only needed here
  from mm15_jax.inference import Model

  out_dir = os.path.join(workdir, "eval_tasks")
  model = Model.from_params(config, params, tokenizer)
  accuracy = evaluate_builtin(model, config, num_per_task=config.eval.generate_per_task,
                              out_dir=out_dir if jax.process_index() == 0 else None)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "REPORT.md")) as f:
      print(f.read())
    print(f"grounding example: {os.path.join(out_dir, 'grounding.png')}")
  return accuracy


def _nan_injection_step() -> int:
  """Test hook: MM15_INJECT_NAN_AT_STEP=N makes step N's loss NaN (0 = off)."""
  return int(os.environ.get("MM15_INJECT_NAN_AT_STEP", "0"))


def _poison(batch: dict) -> dict:
  """A NaN loss mask gives a NaN loss and gradient: the step's finiteness guard must catch it."""
  return dict(batch, loss_mask=batch["loss_mask"] * jnp.nan)


def train_and_evaluate(config, workdir: str, *, progress: bool = True) -> dict:
  """Trains `config.train.steps` steps (resuming if WORKDIR has checkpoints); returns the final eval."""
  config = config.copy_and_resolve_references()
  mesh = shd.make_mesh(config.mesh)
  tokenizer = data_pipelines.load_tokenizer(config.model.llm.vocab_size)
  check_config(config, mesh, tokenizer)
  setup = state_lib.make_setup(config, mesh)

  n_proc, p_idx = jax.process_count(), jax.process_index()
  host_ds = data_pipelines.make_train_dataset(config, tokenizer, process_index=p_idx, process_count=n_proc)
  put = global_batch_putter(setup)
  expected_local = batch_lib.shapes_for_config(config, config.train.batch_size // n_proc)
  batches = DevicePrefetcher(iter(host_ds), put, depth=config.data.prefetch, expected_local=expected_local)

  checkpointer = ckpt_lib.Checkpointer(
      ckpt_lib.workdir_checkpoints(workdir), keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  writer = None
  preemption = PreemptionWatch()
  try:
    if checkpointer.latest_step() is not None:
      state = checkpointer.restore(setup.abstract_state, batches)
      origin = f"resumed from step {int(state['step'])}"
    else:
      state = state_lib.init_state(setup)
      origin = "initialised"
      if config.init.from_checkpoint:
        state["params"] = ckpt_lib.load_params(config.init.from_checkpoint, setup.abstract_state["params"])
        origin = f"params from {config.init.from_checkpoint}"
    start = int(jax.device_get(state["step"]))

    moe = config.model.moe
    counts = flops_lib.param_counts(setup.abstract_params, setup.logical, moe.top_k, moe.num_experts)
    step_flops = flops_lib.flops_per_step(config, counts)
    peak = flops_lib.peak_flops_per_device(config.train.peak_tflops_per_device)
    tokens_per_step = config.train.batch_size * config.data.seq_len

    writer = MetricsWriter(workdir, config.train.steps, start, progress=progress)
    writer.message(
        f"mm15_jax: {counts['total'] / 1e6:.2f}M params (vit {counts['vit'] / 1e6:.2f}M, connector "
        f"{counts['connector'] / 1e6:.2f}M, llm {counts['llm'] / 1e6:.2f}M), mesh {dict(mesh.shape)}, {origin}")

    train_fn = step_lib.jit_train_step(setup)
    eval_fn = step_lib.jit_eval_step(setup)
    eval_batches = data_pipelines.make_eval_batches(config, tokenizer, config.eval.batches)

    # Non-finite steps are counted on device (no per-step host sync) and read back at log
    # and save boundaries: "skip" reports them, "stop" raises before anything is saved.
    nonfinite, seen_nonfinite = None, 0  # built from the step's output: same devices on every process
    inject_at = _nan_injection_step()

    def check_finite(done: int) -> int:
      nonlocal seen_nonfinite
      total = 0 if nonfinite is None else int(jax.device_get(nonfinite))
      if total > seen_nonfinite:
        msg = f"{total - seen_nonfinite} non-finite step(s) by step {done}; their updates were skipped"
        if config.train.nan_policy == "stop":
          raise FloatingPointError(
              msg + f"; stopping with the last good checkpoint (step {checkpointer.latest_step()}) intact "
              "(config.train.nan_policy='stop'; 'skip' to continue)")
        writer.message(msg)
        seen_nonfinite = total
      return total

    window_start, window_steps = time.perf_counter(), 0
    first_timed = True
    for step in range(start, config.train.steps):
      batch = next(batches)
      if step + 1 == inject_at:
        batch = _poison(batch)
      state, metrics = train_fn(state, batch)
      bad = (~metrics.pop("finite")).astype(jnp.int32)
      nonfinite = bad if nonfinite is None else nonfinite + bad
      window_steps += 1
      done = step + 1
      last = done == config.train.steps
      if done % config.log_every == 0 or last:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - window_start
        seconds = elapsed / window_steps
        metrics.update(
            tokens_per_s=tokens_per_step / seconds, step_seconds=seconds, skipped_records=batches.skipped_records,
            skipped_steps=check_finite(done), mfu=flops_lib.mfu(step_flops, seconds, peak, jax.device_count()))
        if first_timed:
          metrics["includes_compile"] = 1  # the first window holds the compile
          first_timed = False
        writer.write(done, metrics)
        window_start, window_steps = time.perf_counter(), 0
      writer.advance()
      if not last and preemption.should_stop(done):  # every process answers the same at each step
        check_finite(done)
        checkpointer.save(state, batches, force=True)
        writer.message(f"preempted: saved step {done}; a relaunch resumes from it")
        return dict(preempted_at=done)
      if config.checkpoint.every and (done % config.checkpoint.every == 0 or last):
        check_finite(done)
        checkpointer.save(state, batches, force=last)
      if config.eval.every and done % config.eval.every == 0 and not last:
        writer.write(done, evaluate(eval_fn, state["params"], eval_batches, put), kind="eval")

    result = evaluate(eval_fn, state["params"], eval_batches, put)
    writer.write(int(jax.device_get(state["step"])), result, kind="eval")
    writer.message(
        f"eval: loss {result['loss']:.4f}, token accuracy {result['token_accuracy']:.3f}, "
        f"exact match {result['exact_match']:.3f} on {result['examples']} examples")
    if config.eval.generate_per_task and _all_builtin(config):
      tasks = answer_held_out_questions(config, state["params"], tokenizer, workdir)
      writer.write(int(jax.device_get(state["step"])), tasks, kind="eval_tasks")
      result["tasks"] = tasks
    return result
  finally:
    preemption.close()
    checkpointer.close()
    if writer is not None:
      writer.close()
