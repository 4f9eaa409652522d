"""Where the wall time of a logging window went: waiting for input data, or everything else.

The loop never waits for the device inside a window: it dispatches each step and moves on,
and the window ends with the device_get of its last step's metrics, which waits for all of
the window's device work. So the window's wall time covers its compute, and the time the
host spent blocked in `next(batches)` (host decoding, packing and the transfers the
DevicePrefetcher issues) is exactly the time the device could starve for input.

  step_seconds        wall time per step over the window
  data_wait_s         of which blocked in next(batches), per step
  data_wait_fraction  data_wait_s / step_seconds: near 1 is input-bound, near 0 compute-bound

Measuring adds no device sync: only host clock reads around calls the loop makes anyway.
"""

import contextlib
import time


class StepTimer:

  def __init__(self):
    self._begin_window()

  def _begin_window(self) -> None:
    self._start = time.perf_counter()
    self._steps = 0
    self._data_wait = 0.0
    self._paused = 0.0

  @contextlib.contextmanager
  def waiting_for_data(self):
    """Around `next(batches)`; counts one step."""
    t = time.perf_counter()
    try:
      yield
    finally:
      self._data_wait += time.perf_counter() - t
      self._steps += 1

  @contextlib.contextmanager
  def paused(self):
    """Around work that is not a training step (evaluation): left out of the window."""
    t = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - t

  def end_window(self) -> dict:
    """Call after waiting for the window's last step (the log's device_get); starts the next window."""
    elapsed = max(time.perf_counter() - self._start - self._paused, 1e-9)
    steps = max(self._steps, 1)
    out = dict(step_seconds=elapsed / steps, data_wait_s=self._data_wait / steps,
               data_wait_fraction=min(self._data_wait / elapsed, 1.0))
    self._begin_window()
    return out
