"""The training loop: mesh, data, state (fresh, resumed or from a previous stage), steps, eval.

Around the steps: held-out evaluation per data source every `eval.every` steps and at the end
(in_training_eval.py), the best checkpoint by `eval.best_metric` (best_checkpoint.py), a
profiler trace of `profile.steps` (profiling.py) and the data-wait share of the step time
(step_timing.py).
"""

import os
import time

import jax
import jax.numpy as jnp

import data_pipelines
from data_pipelines import mixture
from data_pipelines import pipeline as pipeline_lib
from mm15_jax import batch as batch_lib
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import distributed, modes, run_record
from mm15_jax import sharding as shd
from mm15_jax.models.mm15 import position_grids
from mm15_jax.train import flops as flops_lib
from mm15_jax.train import in_training_eval, upcycle
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib
from mm15_jax.train.best_checkpoint import BestCheckpoint
from mm15_jax.train.config_checks import check_config
from mm15_jax.train.metrics import MetricsWriter
from mm15_jax.train.preemption import PreemptionWatch
from mm15_jax.train.prefetch import DevicePrefetcher, global_batch_putter
from mm15_jax.train.profiling import StepProfiler
from mm15_jax.train.step_timing import StepTimer


def _stall_before_first_step() -> None:
  """Test hooks: MM15_STALL_BEFORE_FIRST_STEP=1 hangs the run before its first step, as a stalled
  input or a compile would (only a SIGTERM's grace period ends it)."""
  while os.environ.get("MM15_STALL_BEFORE_FIRST_STEP") == "1":
    time.sleep(0.1)
  # MM15_LATE_PROCESS=P:S: process P starts its first step S seconds after the others, as a
  # process that compiles slower on a busy host would.
  late, _, seconds = os.environ.get("MM15_LATE_PROCESS", "").partition(":")
  if late and int(late) == jax.process_index():
    time.sleep(float(seconds))


def _nan_injection_step() -> int:
  """Test hook: MM15_INJECT_NAN_AT_STEP=N makes step N's loss NaN (0 = off)."""
  return int(os.environ.get("MM15_INJECT_NAN_AT_STEP", "0"))


def _poison(batch: dict) -> dict:
  """A NaN loss mask gives a NaN loss and gradient: the step's finiteness guard must catch it."""
  return dict(batch, loss_mask=batch["loss_mask"] * jnp.nan)


def train_and_evaluate(config, workdir: str, *, progress: bool = True) -> dict:
  """Trains `config.train.steps` steps (resuming if WORKDIR has checkpoints); returns the final eval."""
  config = config.copy_and_resolve_references()
  mesh = shd.mesh_for_config(config)
  check_config(config, mesh)  # before the tokenizer is built: a vocabulary it cannot have is refused here
  tokenizer = data_pipelines.tokenizer_for_config(config)
  check_config(config, mesh, tokenizer)
  setup = state_lib.make_setup(config, mesh)
  launch = run_record.write_run_files(config, workdir, mesh)  # the resolved config, and where it ran

  n_proc, p_idx = jax.process_count(), jax.process_index()
  host_ds = data_pipelines.make_train_dataset(config, tokenizer, process_index=p_idx, process_count=n_proc)
  put = global_batch_putter(setup)
  expected_local = batch_lib.shapes_for_config(config, config.train.batch_size // n_proc)
  batches = DevicePrefetcher(iter(host_ds), put, depth=config.data.prefetch, expected_local=expected_local)

  checkpointer = ckpt_lib.Checkpointer(
      ckpt_lib.workdir_checkpoints(workdir), keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
      compress=config.checkpoint.compress)
  writer = None
  preemption = PreemptionWatch(config.checkpoint.sigterm_grace_s)
  profiler = StepProfiler(config.profile, workdir)
  try:
    handoff_notes = []  # one line per position grid resized for this stage's image size
    damaged = []  # one line per damaged step set aside (checkpoint_integrity.py)
    resume_step = checkpointer.latest_good_step(report=damaged.append)
    if jax.process_index() == 0:
      for note in damaged:
        print(f"mm15_jax: {note}", flush=True)
    if resume_step is not None:
      # A resume, never a handoff: params, optimizer, step, RNG and data order as saved.
      state = checkpointer.restore(setup.abstract_state, batches, step=resume_step)
      origin = f"resumed from step {int(state['step'])}"
    else:
      # A new run or a new stage: fresh optimizer state, schedule and data iterator; params
      # from the previous stage where given, position grids resized to this stage's image size.
      state = state_lib.init_state(setup)
      origin = "initialised"
      grids = position_grids(config.model)
      if config.init.from_checkpoint:
        state["params"] = ckpt_lib.load_params(config.init.from_checkpoint, setup.abstract_state["params"],
                                               grids=grids, report=handoff_notes.append)
        origin = f"params from {config.init.from_checkpoint}"
      if config.init.upcycle_from:  # MoE from a dense run: experts copy its FFNs, routers fresh
        state["params"] = upcycle.load_upcycled(config.init.upcycle_from, setup, state["params"],
                                                grids=grids, report=handoff_notes.append)
        origin += f", upcycled from {config.init.upcycle_from}"
      parts = {part: config.init[f"{part}_from"] for part in ("llm", "vit", "connector") if config.init[f"{part}_from"]}
      if parts:  # public weights brought in by `python -m mm15_jax.convert import`, an encoder stage
        state["params"] = ckpt_lib.load_param_parts(state["params"], setup.abstract_state["params"], parts,
                                                    grids=grids, report=handoff_notes.append)
        origin += ", " + ", ".join(f"{part} from {path}" for part, path in parts.items())
    start = int(jax.device_get(state["step"]))

    moe = config.model.moe
    counts = flops_lib.param_counts(setup.abstract_params, setup.logical, moe.top_k, moe.num_experts)
    step_flops = flops_lib.flops_per_step(config, counts)
    peak = flops_lib.peak_flops_per_device(config.train.peak_tflops_per_device)
    tokens_per_step = config.train.batch_size * config.data.seq_len

    writer = MetricsWriter(workdir, config.train.steps, start, progress=progress, config=config,
                           run_record=launch)
    writer.message(
        f"mm15_jax: {counts['total'] / 1e6:.2f}M params (vit {counts['vit'] / 1e6:.2f}M, connector "
        f"{counts['connector'] / 1e6:.2f}M, llm {counts['llm'] / 1e6:.2f}M), mesh {dict(mesh.shape)}, {origin}")
    for note in handoff_notes:
      writer.message(note)

    # Each process compiles a step before any runs it (distributed.CompiledTogether).
    train_fn = distributed.CompiledTogether(step_lib.jit_train_step(setup), "train step")
    held_out = in_training_eval.HeldOutEval(
        distributed.CompiledTogether(step_lib.jit_eval_step(setup), "eval step"), put,
        pipeline_lib.make_eval_batches_per_source(
            config, tokenizer, config.eval.batches, process_index=p_idx, process_count=n_proc))
    generation = None
    if config.eval.generate_per_task and mixture.all_builtin(config):
      generation = in_training_eval.TaskGeneration(config, tokenizer, workdir)
    best = None
    if config.eval.best_metric:
      best = BestCheckpoint(workdir, config.eval.best_metric, config.eval.best_mode)
      if best.note:
        writer.message(best.note)

    def evaluate(state, final: bool) -> dict:
      """The held-out metrics of state's params, logged; the best checkpoint follows them."""
      step = int(jax.device_get(state["step"]))
      result = held_out(state["params"])
      writer.write(step, result, kind="eval")
      writer.message(f"step {step} " + in_training_eval.describe(result, held_out.batches_per_source))
      if generation is not None:
        result["tasks"] = generation(state["params"], report=final)
        writer.write(step, result["tasks"], kind="eval_tasks")
        result.update(in_training_eval.task_metrics(result["tasks"]))  # eval.best_metric may name them
      if best is not None and best.update(step, result, state["params"]):
        writer.message(f"best checkpoint: step {step}, {best.metric} {best.record['value']:.4f} -> {best.directory}")
      return result

    # Non-finite steps are counted on device (no per-step host sync) and read back at log
    # and save boundaries: "skip" reports them, "stop" raises before anything is saved.
    nonfinite, seen_nonfinite = None, 0  # built from the step's output: same devices on every process
    inject_at = _nan_injection_step()

    def check_finite(done: int) -> int:
      nonlocal seen_nonfinite
      total = 0 if nonfinite is None else int(distributed.host_value(nonfinite))
      if total > seen_nonfinite:
        msg = f"{total - seen_nonfinite} non-finite step(s) by step {done}; their updates were skipped"
        if modes.parse(modes.NanPolicy, config.train.nan_policy) == modes.NanPolicy.STOP:
          raise FloatingPointError(
              msg + f"; stopping with the last good checkpoint (step {checkpointer.latest_good_step()}) intact "
              "(config.train.nan_policy='stop'; 'skip' to continue)")
        writer.message(msg)
        seen_nonfinite = total
      return total

    if in_training_eval.missed_at(config, workdir, start):  # preempted at an eval step
      evaluate(state, final=False)

    _stall_before_first_step()
    timer = StepTimer()
    first_timed = True
    for step in range(start, config.train.steps):
      with profiler.step(step):
        with timer.waiting_for_data():
          batch = next(batches)
        if step + 1 == inject_at:
          batch = _poison(batch)
        state, metrics = train_fn(state, batch)
      if profiler.ends_at(step):
        jax.block_until_ready((state, metrics))  # the trace holds the traced steps' device work
        with timer.paused():  # writing the trace is no step's time
          profiler.stop()
      bad = (~metrics.pop("finite")).astype(jnp.int32)
      nonfinite = bad if nonfinite is None else nonfinite + bad
      done = step + 1
      last = done == config.train.steps
      if done % config.log_every == 0 or last:
        # Waits for the window's steps (its wall time holds their compute); host_value: a
        # metric may come out sharded over devices of several processes.
        metrics = distributed.host_value(metrics)
        timing = timer.end_window()
        seconds = timing["step_seconds"]
        metrics.update(
            timing, tokens_per_s=tokens_per_step / seconds, skipped_records=batches.skipped_records,
            overlong_records=batches.overlong_records, **batches.dropped_metrics(),
            skipped_steps=check_finite(done), mfu=flops_lib.mfu(step_flops, seconds, peak, jax.device_count()))
        if first_timed:
          metrics["includes_compile"] = 1  # the first window holds the compile
          first_timed = False
        writer.write(done, metrics)
      writer.advance()
      if not last and preemption.should_stop(done):  # every process answers the same at each step
        check_finite(done)
        checkpointer.save(state, batches, force=True)
        writer.message(f"preempted: saved step {done}; a relaunch resumes from it")
        return dict(preempted_at=done)
      if config.checkpoint.every and (done % config.checkpoint.every == 0 or last):
        check_finite(done)
        started = time.perf_counter()
        checkpointer.save(state, batches, force=last)
        writer.flush()  # a resume from this step finds every row before it, even in a bucket
        writer.message(f"checkpoint: step {done} saved in {time.perf_counter() - started:.1f} s"
                       + (" (written in the background)" if config.checkpoint.async_save else ""))
      if config.eval.every and done % config.eval.every == 0 and not last:
        jax.block_until_ready(state)  # the steps so far stay in the timed window, the eval does not
        with timer.paused():
          evaluate(state, final=False)

    return evaluate(state, final=True)
  finally:
    profiler.stop()  # a run that ends inside the traced range still writes its trace
    preemption.close()
    checkpointer.close()
    if writer is not None:
      writer.close()
