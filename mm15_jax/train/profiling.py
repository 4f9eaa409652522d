"""A jax.profiler trace of a range of training steps, viewable in TensorBoard/XProf.

`config.profile.steps = (start, end)` traces the steps whose index (the step count before
them, 0-based: metrics.jsonl logs step index i as step i + 1) is in [start, end). Step 0
holds the compile; start at 2 or later to see the steady state. The trace goes to
WORKDIR/profile, from process 0 only, or from every process into WORKDIR/profile/process_<i>
with `profile.all_processes`. Open it with `tensorboard --logdir WORKDIR/profile`
(Profile tab) or XProf.

The host dispatches steps ahead of the device, so the loop blocks on the last traced step's
result before the trace stops: the trace holds the device work of every traced step.
"""

import contextlib
import os
import shutil
import tempfile

import jax
from etils import epath

from data_pipelines import storage


def check_steps(profile, train_steps: int) -> list[str]:
  """Errors in config.profile, each naming the field and a fix."""
  steps = tuple(profile.steps or ())
  if not steps:
    return []
  if len(steps) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
    return [f"profile.steps={steps!r}: give two step indices (start, end), e.g. --config.profile.steps='(5, 8)', "
            "or () for no trace"]
  start, end = steps
  if not 0 <= start < end <= train_steps:
    return [f"profile.steps=({start}, {end}): need 0 <= start < end <= train.steps={train_steps} "
            "(steps [start, end) are traced), e.g. (5, 8)"]
  return []


def trace_dir(workdir: str, all_processes: bool) -> str:
  base = storage.join(workdir, "profile")
  return storage.join(base, f"process_{jax.process_index()}") if all_processes else base


class StepProfiler:
  """`with profiler.step(i): ...` around each step; when `ends_at(i)`, block on its result and `stop()`."""

  def __init__(self, profile, workdir: str):
    steps = tuple(profile.steps or ())
    self.start, self.end = steps if steps else (0, 0)
    self.enabled = bool(steps) and (profile.all_processes or jax.process_index() == 0)
    self.directory = trace_dir(workdir, profile.all_processes)
    self.active = False
    self._local = None  # a bucket workdir: the trace is written here, then uploaded

  @contextlib.contextmanager
  def step(self, index: int):
    """Starts the trace at the first step in range (also after a resume inside it) and marks each
    traced step for the trace viewer's step view."""
    if self.enabled and not self.active and self.start <= index < self.end:
      if storage.is_remote(self.directory):
        self._local = tempfile.mkdtemp(prefix="mm15_profile_")
      storage.makedirs(self.directory)
      jax.profiler.start_trace(self._local or self.directory)
      self.active = True
    if self.active:
      with jax.profiler.StepTraceAnnotation("train", step_num=index):
        yield
    else:
      yield

  def ends_at(self, index: int) -> bool:
    """True after the last traced step: block on its result, then `stop()`."""
    return self.active and index + 1 >= self.end

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      if self._local:
        _upload(self._local, self.directory)
        shutil.rmtree(self._local, ignore_errors=True)
        self._local = None


def _upload(local_dir: str, remote_dir: str) -> None:
  for folder, _, files in os.walk(local_dir):
    for name in files:
      source = os.path.join(folder, name)
      target = epath.Path(remote_dir) / os.path.relpath(source, local_dir)
      target.write_bytes(epath.Path(source).read_bytes())
