"""Keeps the params of the best evaluation so far under WORKDIR/best.

  WORKDIR/best/<step>/params   the params at that step (orbax)
  WORKDIR/best/best.json       {"step", "metric", "value", "mode"}: which step is the best, and why

`config.init.from_checkpoint=WORKDIR/best` or `inference.load_model(config, "WORKDIR/best")`
loads it. best.json is the commit point: a new best's params are written completely first
(orbax writes a temporary directory and renames it), then best.json is replaced whole,
and only then is the previous best deleted. A run killed at any moment leaves best.json
naming complete params; a resumed run reads it back, so the best so far survives restarts.
"""

import json
import math

import jax
import orbax.checkpoint as ocp
from etils import epath

from data_pipelines import storage
from mm15_jax import modes

RECORD = "best.json"


def best_dir(workdir: str) -> str:
  return storage.join(workdir, "best")


def read_record(workdir: str) -> dict | None:
  """The committed best of a run ({"step", "metric", "value", "mode"}), or None."""
  path = storage.join(best_dir(workdir), RECORD)
  if not storage.exists(path):
    return None
  return json.loads(storage.read_text(path))


class BestCheckpoint:
  """Call `update` after each evaluation; every process calls it with the same metrics."""

  def __init__(self, workdir: str, metric: str, mode: str = "min"):
    mode = modes.parse(modes.BestMode, mode).value  # plain: it goes into the record's JSON
    self.directory = best_dir(workdir)
    self.metric, self.mode = metric, mode
    committed = read_record(workdir)
    self.record, self.note = committed, ""  # note: what became of an earlier record, for the run's log
    if committed is not None:
      if (committed.get("metric"), committed.get("mode")) != (metric, mode):
        self.record = None  # another metric: its best stays on disk until this run commits one
        self.note = f"best checkpoint: {committed} was chosen by another metric; starting over by {metric}"
      elif not storage.isdir(self._params_path(committed["step"])):
        raise FileNotFoundError(
            f"{storage.join(self.directory, RECORD)} names step {committed['step']} but its params are missing; "
            f"delete {self.directory} to start the best checkpoint over")
    if jax.process_index() == 0:
      self._remove_all_but(committed["step"] if committed else None)

  def _params_path(self, step: int) -> str:
    return storage.join(self.directory, str(int(step)), "params")

  def _remove_all_but(self, step: int | None) -> None:
    """Step directories best.json does not name: replaced bests, or a save a kill interrupted."""
    for name in storage.listdir(self.directory):
      if name != RECORD and name != str(step) and storage.isdir(storage.join(self.directory, name)):
        storage.rmtree(storage.join(self.directory, name))

  def is_better(self, value: float) -> bool:
    if not math.isfinite(value):
      return False
    if self.record is None:
      return True
    best = self.record["value"]
    return value < best if self.mode == modes.BestMode.MIN else value > best

  def update(self, step: int, metrics: dict, params) -> bool:
    """Saves `params` as the new best if metrics[self.metric] beats the record; True if it did."""
    if self.metric not in metrics:
      raise KeyError(f"config.eval.best_metric={self.metric!r} is not an eval metric; choose one of "
                     f"{sorted(k for k, v in metrics.items() if isinstance(v, float))}")
    value = float(metrics[self.metric])
    if not self.is_better(value) or (self.record is not None and self.record["step"] == step):
      return False  # the same step again (a resumed run re-evaluating it): its params are saved already
    checkpointer = ocp.StandardCheckpointer()
    try:
      checkpointer.save(epath.Path(storage.absolute(self._params_path(step))), params)
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()
    record = dict(step=int(step), metric=self.metric, value=value, mode=self.mode)
    if jax.process_index() == 0:
      storage.write_text_atomic(storage.join(self.directory, RECORD), json.dumps(record))
      self._remove_all_but(step)
    self.record = record
    return True
