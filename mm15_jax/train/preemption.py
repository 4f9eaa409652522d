"""Preemption: a SIGTERM asks the loop to save at the next step boundary and exit cleanly.

Multi-process runs must all stop at the same step, or the collective save would hang. Under
`jax.distributed` JAX's preemption service already catches SIGTERM on any process and agrees
on a step for all of them (`reached_preemption_sync_point`); we only ask it. A single
process has no service, so a Python SIGTERM handler sets a flag instead.

No process waits forever for that boundary: if none comes within `grace_s` of the SIGTERM (a
stall, a long compile, a hung input), it exits with status 143 without saving (the last
complete checkpoint stays the resume point), and a second SIGTERM or a SIGINT exits at once.
Under the service our handler starts that timer and then calls the service's own (C) handler,
read with sigaction, so JAX still learns of the notice (Linux).
"""

import ctypes
import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils


def _service_running() -> bool:
  from jax._src import distributed  # the public API has no "is the service on" query
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class _SigAction(ctypes.Structure):  # glibc's struct sigaction (x86_64 and aarch64 Linux)
  _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
              ("restorer", ctypes.c_void_p)]


_SA_SIGINFO = 4


def native_handler(signum: int):
  """(call, restore) for the handler of `signum` installed outside Python (JAX's preemption
  notifier; Python's signal.getsignal still reports SIG_DFL for it): `call()` runs it,
  `restore()` puts it back in place of ours. None if there is none (SIG_DFL/SIG_IGN, a Python
  handler) or not on Linux."""
  if not sys.platform.startswith("linux"):
    return None
  libc, old = ctypes.CDLL(None), _SigAction()
  if libc.sigaction(signum, None, ctypes.byref(old)) != 0 or (old.handler or 0) <= 1:
    return None
  if callable(signal.getsignal(signum)):  # a Python handler: signal.signal() handles that one
    return None
  if old.flags & _SA_SIGINFO:
    function = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(old.handler)
    call = lambda: function(signum, None, None)
  else:
    function = ctypes.CFUNCTYPE(None, ctypes.c_int)(old.handler)
    call = lambda: function(signum)
  return call, lambda: libc.sigaction(signum, ctypes.byref(old), None)


class PreemptionWatch:
  """`should_stop(step)` at every step boundary; True on all processes at the same step."""

  def __init__(self, grace_s: float = 120.0):
    self.requested = False
    self._grace_s = grace_s
    self._timer = None
    self._previous = {}
    self._service = jax.process_count() > 1 and _service_running()
    # Under the service JAX's own handler is chained (the module docstring); without it, the flag.
    native = native_handler(signal.SIGTERM) if self._service else None
    self._chained, self._restore_native = native or (None, None)
    if (native or not self._service) and threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del frame
    if self.requested:  # a second SIGTERM, or a SIGINT after the first
      _exit_now(f"signal {signum} again: exiting without saving")
    self.requested = True
    if self._chained is not None:
      self._chained()  # JAX's preemption service takes the notice and agrees on a step
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
      if signum == signal.SIGTERM and self._restore_native is not None:
        self._restore_native()  # set outside Python (JAX's), unknown to signal.signal: put back by hand
    self._previous = {}


def _exit_now(message: str) -> None:
  print(f"mm15_jax: {message}", file=sys.stderr, flush=True)
  os._exit(143)  # 128 + SIGTERM; from any thread, whatever the main thread is blocked in
