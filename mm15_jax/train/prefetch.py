"""Puts the next batches on the devices while the current step runs.

The host iterator runs ahead of training by `depth` batches, so its own state is not the
state to checkpoint: this wrapper remembers the iterator state *before* each queued batch
and reports the one of the next unconsumed batch. It follows grain's checkpointable
iterator protocol (`get_state`/`set_state` with bytes), so `grain.checkpoint.CheckpointSave`
stores it per process.
"""

import collections
import json

import jax
import numpy as np

from data_pipelines import packing
from mm15_jax import batch as batch_lib


class DevicePrefetcher:

  def __init__(self, host_iterator, put_on_devices, depth: int = 2, expected_local: dict | None = None):
    self._it = host_iterator
    self._put = put_on_devices
    self._depth = max(depth, 1)
    self._expected = expected_local
    self._queue = collections.deque()
    # Records the batches consumed so far went without: corrupt/malformed, and too long.
    self.skipped_records = self.overlong_records = 0

  def _fill(self):
    while len(self._queue) < self._depth:
      state = self._it.get_state()
      host_batch = dict(next(self._it))
      skipped = [int(np.sum(host_batch.pop(k, 0))) for k in packing.COUNT_FIELDS]  # counts, not model inputs
      if self._expected is not None:
        batch_lib.check(host_batch, self._expected)
      self._queue.append((state, self._put(host_batch), skipped))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill()
    _, device_batch, skipped = self._queue.popleft()
    self.skipped_records += skipped[0]
    self.overlong_records += skipped[1]
    self._fill()  # dispatch the next transfers before the caller's step
    return device_batch

  def get_state(self) -> bytes:
    state = self._queue[0][0] if self._queue else self._it.get_state()
    return json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    self._queue.clear()
    self._it.set_state(json.loads(state))

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
