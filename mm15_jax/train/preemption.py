"""Preemption: a SIGTERM asks the loop to save at the next step boundary and exit cleanly.

Multi-process runs must all stop at the same step, or the collective save would hang. Under
`jax.distributed` JAX's preemption service already catches SIGTERM on any process and agrees
on a step for all of them (`reached_preemption_sync_point`); we only ask it. A single
process has no service, so a Python SIGTERM handler sets a flag instead.

A single process also never waits forever for that boundary: if none comes within
`grace_s` of the SIGTERM (a stall, a long compile, a hung input), it exits with status 143
without saving (the last complete checkpoint stays the resume point), and a second SIGTERM or
a SIGINT exits at once. (Under the service JAX's own handler takes SIGTERM.)
"""

import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils


def _service_running() -> bool:
  from jax._src import distributed  # the public API has no "is the service on" query
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionWatch:
  """`should_stop(step)` at every step boundary; True on all processes at the same step."""

  def __init__(self, grace_s: float = 120.0):
    self.requested = False
    self._grace_s = grace_s
    self._timer = None
    self._previous = {}
    self._service = jax.process_count() > 1 and _service_running()
    # Without the service, or where our handler would override JAX's own, rely on the flag.
    if not self._service and threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del frame
    if self.requested:  # a second SIGTERM, or a SIGINT after the first
      _exit_now(f"signal {signum} again: exiting without saving")
    self.requested = True
    self._previous.setdefault(signal.SIGINT, signal.signal(signal.SIGINT, self._on_sigterm))
    self._timer = threading.Timer(self._grace_s, _exit_now, [
        f"SIGTERM: no step boundary within checkpoint.sigterm_grace_s={self._grace_s:g} s; exiting without saving "
        "(the last complete checkpoint is the resume point)"])
    self._timer.daemon = True
    self._timer.start()

  def should_stop(self, step: int) -> bool:
    if self._timer is not None:  # a step boundary came: the save that follows may take its time
      self._timer.cancel()
      self._timer = None
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() > 1:  # no service: agree on the flag with a (blocking) collective
      flags = multihost_utils.process_allgather(jax.numpy.array(int(self.requested)))
      return bool(flags.max())
    return self.requested

  def close(self) -> None:
    if self._timer is not None:
      self._timer.cancel()
      self._timer = None
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def _exit_now(message: str) -> None:
  print(f"mm15_jax: {message}", file=sys.stderr, flush=True)
  os._exit(143)  # 128 + SIGTERM; from any thread, whatever the main thread is blocked in
