"""Checkpoint integrity: a checksum table per saved step, verified before a step is used.

When a step's save has finished, process 0 writes STEP/checksums.json, the size and CRC32 of
every file in the step. A step is good when every listed file is there with that size and
checksum; a step without the file (a save from before this check existed, or a kill between the
save and its checksums) is accepted if it is not empty, as unverified. A bad step is set aside
(renamed STEP.bad-N, never deleted) so it counts toward nothing, and the newest good step
before it is used (README, "What a run writes").
"""

import json
import os
import shutil
import zlib

import jax
from etils import epath

from data_pipelines import storage

CHECKSUMS = "checksums.json"


def _step_files(step_dir: str) -> list[str]:
  """Paths of every file under step_dir, relative to it, sorted."""
  if not storage.is_remote(step_dir):
    return sorted(os.path.relpath(os.path.join(folder, name), step_dir)
                  for folder, _, names in os.walk(step_dir) for name in names)
  out, stack = [], [epath.Path(step_dir)]
  while stack:
    for item in stack.pop().iterdir():
      if item.is_dir():
        stack.append(item)
      else:
        out.append(os.path.relpath(os.fspath(item), step_dir))
  return sorted(out)


def _crc32(path: str) -> tuple[int, int]:
  size, crc = 0, 0
  with storage.open_file(path) as f:
    while chunk := f.read(16 << 20):
      size, crc = size + len(chunk), zlib.crc32(chunk, crc)
  return size, crc


def write_checksums(step_dir: str) -> None:
  files = [f for f in _step_files(step_dir) if f != CHECKSUMS]
  table = {name: list(_crc32(storage.join(step_dir, name))) for name in files}
  storage.write_text_atomic(storage.join(step_dir, CHECKSUMS), json.dumps({"files": table}, sort_keys=True))


def step_problem(step_dir: str) -> str | None:
  """What is wrong with a step directory (one line naming the file), or None if it is good."""
  step_dir = os.fspath(step_dir)
  if not storage.isdir(step_dir):
    return "missing"
  files = _step_files(step_dir)
  if not files:
    return "empty folder (a save that never started writing)"
  if CHECKSUMS not in files:
    return None if "_CHECKPOINT_METADATA" in files or any(f.startswith("params/") for f in files) else (
        f"incomplete: no params/ or _CHECKPOINT_METADATA among {files[:3]}")
  try:
    table = json.loads(storage.read_text(storage.join(step_dir, CHECKSUMS)))["files"]
  except (ValueError, KeyError) as e:
    return f"{CHECKSUMS} unreadable ({e})"
  for name, (size, crc) in sorted(table.items()):
    path = storage.join(step_dir, name)
    if not storage.exists(path):
      return f"{name} is missing"
    got_size, got_crc = _crc32(path)
    if got_size != size:
      return f"{name} has {got_size} bytes, {size} when saved (truncated or overwritten)"
    if got_crc != crc:
      return f"{name} fails its checksum (its bytes changed since the save)"
  return None


def _quarantine(step_dir: str) -> str:
  """Renames a bad step out of orbax's sight (never deletes it); returns the new name."""
  for n in range(1000):
    target = f"{os.fspath(step_dir).rstrip('/')}.bad-{n}"
    if not storage.exists(target):
      if storage.is_remote(step_dir):  # a bucket has no rename: copy every object, then delete
        for name in _step_files(step_dir):
          with storage.open_file(storage.join(step_dir, name)) as source, \
              storage.open_file(storage.join(target, name), "wb") as copy:
            shutil.copyfileobj(source, copy)
        storage.rmtree(step_dir)
      else:
        os.rename(step_dir, target)
      return target
  raise RuntimeError(f"{step_dir}: too many quarantined copies beside it")


def good_steps(directory: str, report=None, quarantine: bool = False) -> list[int]:
  """The step numbers under `directory` that pass step_problem, newest first. Each bad one is
  reported through `report` (one line: which step, which file, what is wrong) and, with
  `quarantine` (process 0 of a training run), renamed aside."""
  directory = os.fspath(directory)
  storage.forget_listings(directory)
  steps = sorted((int(name) for name in storage.listdir(directory) if name.isdigit()), reverse=True)
  good = []
  for step in steps:
    step_dir = storage.join(directory, str(step))
    problem = step_problem(step_dir)
    if problem is None:
      good.append(step)
      continue
    where = step_dir
    if quarantine and jax.process_index() == 0:
      where = f"{step_dir}, set aside as {storage.basename(_quarantine(step_dir))}"
    if report is not None:
      report(f"checkpoint step {step} is damaged: {problem} ({where}); using an older step")
  return good
