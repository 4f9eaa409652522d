"""Preemption: a SIGTERM asks the loop to save at the next step boundary and exit cleanly.

Multi-process runs must all stop at the same step, or the collective save would hang. Under
`jax.distributed` JAX's preemption service already catches SIGTERM on any process and agrees
on a step for all of them (`reached_preemption_sync_point`); we only ask it. A single
process has no service, so a Python SIGTERM handler sets a flag instead.
"""

import signal
import threading

import jax
from jax.experimental import multihost_utils


def _service_running() -> bool:
  from jax._src import distributed  # the public API has no "is the service on" query
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionWatch:
  """`should_stop(step)` at every step boundary; True on all processes at the same step."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._service = jax.process_count() > 1 and _service_running()
    # Without the service, or where our handler would override JAX's own, rely on the flag.
    if not self._service and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() > 1:  # no service: agree on the flag with a (blocking) collective
      flags = multihost_utils.process_allgather(jax.numpy.array(int(self.requested)))
      return bool(flags.max())
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
