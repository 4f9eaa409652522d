"""Puts the next batches on the devices while the current step runs.

The host iterator runs ahead of training by `depth` batches, so its own state is not the
state to checkpoint: this wrapper remembers the iterator state *before* each queued batch
and reports the one of the next unconsumed batch. It follows grain's checkpointable
iterator protocol (`get_state`/`set_state` with bytes), so `grain.checkpoint.CheckpointSave`
stores it per process.

It also totals the records the consumed batches went without (packing.COUNT_FIELDS): each
process its own share, kept in its state so the totals continue across a resume.
"""

import collections
import json

import jax
import numpy as np

from data_pipelines import packing, sequence
from mm15_jax import batch as batch_lib


class DevicePrefetcher:

  def __init__(self, host_iterator, put_on_devices, depth: int = 2, expected_local: dict | None = None):
    self._it = host_iterator
    self._put = put_on_devices
    self._depth = max(depth, 1)
    self._expected = expected_local
    self._queue = collections.deque()
    # Records the batches consumed so far went without: corrupt/malformed, too long, and
    # both by reason (sequence.DROP_REASONS).
    self.skipped_records = self.overlong_records = 0
    self.dropped = dict.fromkeys(sequence.DROP_REASONS, 0)

  def _fill(self):
    while len(self._queue) < self._depth:
      state = self._it.get_state()
      host_batch = dict(next(self._it))
      counts = {k: np.asarray(host_batch.pop(k, 0)) for k in packing.COUNT_FIELDS}  # counts, not model inputs
      if self._expected is not None:
        batch_lib.check(host_batch, self._expected)
      self._queue.append((state, self._put(host_batch), counts))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill()
    _, device_batch, counts = self._queue.popleft()
    self.skipped_records += int(counts["num_skipped"].sum())
    self.overlong_records += int(counts["num_overlong"].sum())
    by_reason = counts["num_dropped"]
    if by_reason.ndim:  # [rows, reasons]
      for reason, n in zip(sequence.DROP_REASONS, by_reason.reshape(-1, len(self.dropped)).sum(0)):
        self.dropped[reason] += int(n)
    self._fill()  # dispatch the next transfers before the caller's step
    return device_batch

  def dropped_metrics(self) -> dict:
    """{"dropped/<reason>": records} of the batches consumed so far, for the training log."""
    return {f"dropped/{reason}": n for reason, n in self.dropped.items()}

  def _counts(self) -> dict:
    return dict(skipped_records=self.skipped_records, overlong_records=self.overlong_records, dropped=self.dropped)

  def get_state(self) -> bytes:
    state = self._queue[0][0] if self._queue else self._it.get_state()
    return json.dumps(dict(iterator=state, counts=self._counts())).encode()

  def set_state(self, state: bytes) -> None:
    self._queue.clear()
    state = json.loads(state)
    # A state saved before the counts were part of it is the bare iterator state: they restart at 0.
    if isinstance(state, dict) and set(state) == {"iterator", "counts"}:
      counts, state = state["counts"], state["iterator"]
      self.skipped_records, self.overlong_records = counts["skipped_records"], counts["overlong_records"]
      self.dropped = {reason: int(counts["dropped"].get(reason, 0)) for reason in sequence.DROP_REASONS}
    self._it.set_state(state)

  def start_prefetch(self) -> None:  # grain's restore calls this
    pass


def global_batch_putter(setup):
  """Host-local NumPy batch -> global jax.Arrays sharded over the batch axes."""
  def put(host_batch: dict) -> dict:
    out = {}
    for name, local in host_batch.items():
      local = np.asarray(local)
      sharding = setup.batch_sharding(local.ndim)
      global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
      out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
  return put
