"""Per-step metrics to the console, WORKDIR/metrics.jsonl and the trackers (trackers.py:
TensorBoard by default, Weights & Biases with config.log.wandb).

The console: a progress bar on a terminal; without one (`--no_progress`, or stdout a file or a
pipe, as under every launcher) one plain line per logged step, e.g.
  step 120/450 (27%) loss 2.3456 lr 2.90e-03 grad_norm 0.512 tokens/s 19,930 mfu 8.3% data_wait 34% eta 1m23s
Events (evaluations, checkpoint saves, resumes, handoffs) are printed either way, above the bar.

Rows of kind "train" (no "kind" key) and others ("eval", "eval_tasks") share the file;
TensorBoard tags are "<kind>/<name>", e.g. "train/data_wait_fraction", "eval/qa/loss".

One row per step across relaunches: a run resuming from step S drops the rows after S that the
interrupted launch logged (it logs those steps again), rewriting the file whole, and writes a
{"kind": "launch", "step": S, "resumed_from": S} row; TensorBoard is told to purge its events
after S (purge_step). A finished run relaunched evaluates its last step again: its earlier final
eval rows go too.
"""

import json
import sys
import time

import jax
import tqdm

from data_pipelines import storage
from data_pipelines.progress import duration
from mm15_jax.train.trackers import make_trackers


class MetricsWriter:
  """Only process 0 writes; every process may call it."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, progress: bool = True, *,
               config=None, run_record: dict | None = None):
    self.active = jax.process_index() == 0
    self._bar = None
    self._jsonl = None
    self._trackers = []
    if not self.active:
      return
    # In a bucket the file is rewritten whole (no appends there), at most every 30 s for train rows,
    # and TensorBoard uploads its event file through google-cloud-storage (the `gcp` extra).
    path = storage.join(workdir, "metrics.jsonl")
    relaunch = storage.exists(path)  # also from step 0: a launch killed before its first save logged rows
    if relaunch:
      _drop_rows_after(path, initial_step, final=initial_step >= total_steps)
    self._jsonl = storage.Appender(path)
    self._trackers = make_trackers(config if config is not None else {}, workdir, initial_step if relaunch else None)
    for tracker in self._trackers:
      tracker.start(config.to_dict() if config is not None else {}, run_record or {})
    self._jsonl.write(json.dumps({"step": int(initial_step), "kind": "launch", "resumed_from": int(initial_step),
                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    self._jsonl.flush(force=True)
    self._total = total_steps
    if progress and sys.stdout.isatty():
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, metrics: dict, kind: str = "train") -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    if kind != "train":
      record = {"step": int(step), "kind": kind, **{k: v for k, v in record.items() if k != "step"}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush(force=kind != "train")  # evaluations are few: seen at once
    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "kind")}
    for tracker in self._trackers:
      tracker.scalars(int(step), kind, scalars)
    if self._bar is None and kind == "train":
      print(log_line(record, self._total), flush=True)
    if self._bar is not None and kind == "train":
      self._bar.set_postfix(
          loss=f"{record['loss']:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}",
          mfu=f"{100 * record.get('mfu', 0):.1f}%",
          data_wait=f"{100 * record.get('data_wait_fraction', 0):.0f}%",  # near 100%: input-bound
          refresh=False)

  def flush(self) -> None:
    if self.active:
      self._jsonl.flush(force=True)

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def message(self, text: str) -> None:
    if self.active:
      (self._bar.write if self._bar is not None else print)(text)

  def close(self) -> None:
    if not self.active:
      return
    if self._bar is not None:
      self._bar.close()
    self._jsonl.close()
    for tracker in self._trackers:
      tracker.close()


def log_line(row: dict, total_steps: int) -> str:
  """One train row as a line for a log file; fields a row lacks are left out."""
  step = row["step"]
  parts = [f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%)"]
  formats = (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "grad_norm {:.3g}"),
             ("tokens_per_s", "tokens/s {:,.0f}"))
  parts += [fmt.format(row[key]) for key, fmt in formats if isinstance(row.get(key), (int, float))]
  if isinstance(row.get("mfu"), (int, float)):
    parts.append(f"mfu {100 * row['mfu']:.1f}%")
  if isinstance(row.get("data_wait_fraction"), (int, float)):
    parts.append(f"data_wait {100 * row['data_wait_fraction']:.0f}%")
  if isinstance(row.get("step_seconds"), (int, float)) and not row.get("includes_compile"):
    parts.append(f"eta {duration(row['step_seconds'] * max(total_steps - step, 0))}")
  return " ".join(parts)


def _drop_rows_after(path: str, step: int, final: bool) -> None:
  """Keeps the rows up to `step` (and, unless `final`, every row at it), replacing the file whole."""
  kept = []
  for line in storage.read_text(path).splitlines(keepends=True):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      continue  # a line cut short by a kill
    if row.get("step", 0) < step or (row.get("step") == step and not (final and row.get("kind") in EVAL_KINDS)):
      kept.append(line if line.endswith("\n") else line + "\n")
  storage.write_text_atomic(path, "".join(kept))


EVAL_KINDS = ("eval", "eval_tasks")


def _plain(v):
  v = jax.device_get(v)
  if getattr(v, "ndim", 0) > 0:
    return [float(x) for x in v.reshape(-1)]  # e.g. per-expert load: jsonl only
  try:
    return float(v) if getattr(v, "dtype", None) is None or v.dtype.kind == "f" else int(v)
  except TypeError:
    return v
