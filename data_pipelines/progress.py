"""Progress of a long job (conversion, evaluation, import/export, planner sweeps) with its ETA.

On a terminal a tqdm bar on stderr; in a log (stderr a file or a pipe, as under launchers and
batch schedulers) one plain line every `every_s` seconds and one at the end:

  convert: 12,800/100,000 items (13%), 431 items/s, eta 3m22s
"""

import sys
import time

import tqdm


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
  """`unit` in the plural ("items", "bytes"). `update(n)` as work gets done; `close()` (or a
  `with` block) at the end. enabled=False (e.g. processes other than 0) makes every call a no-op."""

  def __init__(self, total: int, desc: str, unit: str = "items", *, enabled: bool = True, every_s: float = 30.0,
               stream=None):
    self.total, self.desc, self.unit, self.done = int(total), desc, unit, 0
    self._stream = stream or sys.stderr
    self._enabled, self._every_s = enabled, every_s
    self._bar = None
    if enabled and self._stream.isatty():
      self._bar = tqdm.tqdm(total=self.total, desc=desc, unit=unit, file=self._stream, dynamic_ncols=True)
    self._start = self._last = time.monotonic()
    self._shown = -1  # `done` when the last line was printed

  def update(self, n: int = 1) -> None:
    self.done += n
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.update(n)
    elif time.monotonic() - self._last >= self._every_s:
      self._line()

  def line(self) -> str:
    elapsed = max(time.monotonic() - self._start, 1e-9)
    rate = self.done / elapsed
    text = f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
    text += f", {rate:,.1f} {self.unit}/s" if rate < 10 else f", {rate:,.0f} {self.unit}/s"
    if 0 < self.done < self.total:
      text += f", eta {duration((self.total - self.done) / rate)}"
    elif self.done >= self.total:
      text += f", done in {duration(elapsed)}"
    return text

  def _line(self) -> None:
    print(self.line(), file=self._stream, flush=True)
    self._last, self._shown = time.monotonic(), self.done

  def close(self) -> None:
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self._shown != self.done:
      self._line()
    self._enabled = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
