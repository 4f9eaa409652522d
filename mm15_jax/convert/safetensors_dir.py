"""Public model directories: config.json plus safetensors files, read tensor by tensor.

Reading: `PublicCheckpoint(dir)` finds the tensors of a single `model.safetensors`, of shards
listed by `model.safetensors.index.json`, or of every `*.safetensors` file, and reads one
tensor (or one slice of it) at a time from the memory-mapped files, so a 30B checkpoint is
never loaded whole. Writing: `write_checkpoint` shards tensors into files of bounded size
with the index the common tools expect, in a temporary directory renamed into place when
complete.
"""

import json
import os
import shutil
import tempfile

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from data_pipelines import storage

INDEX = "model.safetensors.index.json"


class PublicCheckpoint:
  """config.json and the tensors of a public (Hugging Face layout) model directory."""

  def __init__(self, directory: str):
    self.directory = os.fspath(directory)
    config_path = os.path.join(self.directory, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"--hf={self.directory!r}: no config.json; give a model directory as saved by "
                              "`save_pretrained` (config.json + *.safetensors)")
    with open(config_path) as f:
      self.config = json.load(f)
    self._file_of = self._index()
    self._handles = {}
    self.bytes_read = 0  # what was materialised on this host, for the tests and the log

  def _index(self) -> dict:
    index_path = os.path.join(self.directory, INDEX)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        return dict(json.load(f)["weight_map"])
    files = sorted(name for name in os.listdir(self.directory) if name.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"--hf={self.directory!r}: no *.safetensors files (PyTorch .bin checkpoints are not "
                              "read: re-save with `save_pretrained(..., safe_serialization=True)`)")
    file_of = {}
    for name in files:
      with safe_open(os.path.join(self.directory, name), framework="np") as f:
        file_of.update({key: name for key in f.keys()})
    return file_of

  def _handle(self, name: str):
    file = self._file_of[name]
    if file not in self._handles:
      self._handles[file] = safe_open(os.path.join(self.directory, file), framework="np")
    return self._handles[file]

  def keys(self) -> set:
    return set(self._file_of)

  def shape(self, name: str) -> tuple:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self._handle(name).get_slice(name).get_dtype()

  def read(self, name: str) -> np.ndarray:
    """One whole tensor, in its stored dtype (bfloat16 as ml_dtypes.bfloat16)."""
    if name not in self._file_of:
      raise KeyError(f"tensor {name!r} is not in {self.directory}")
    array = self._handle(name).get_tensor(name)
    self.bytes_read += array.nbytes
    return array

  def load_json(self, filename: str) -> dict | None:
    path = os.path.join(self.directory, filename)
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      return json.load(f)


def write_checkpoint(out_dir: str, tensors, config: dict, *, max_shard_bytes: int = 2 << 30,
                     extra_files: dict | None = None) -> list[str]:
  """Writes (name, array) pairs from the iterable `tensors` as safetensors shards of at most
  `max_shard_bytes` (one tensor may exceed it alone), the index when there are several, and
  config.json; `extra_files` {name: source path} are copied beside. Only one shard's tensors
  are held at a time. Returns the shard file names. A bucket out_dir (gs://) is written in a
  local temporary folder, then uploaded with config.json last (what loaders look for first)."""
  if storage.is_remote(out_dir):
    return _write_to_bucket(out_dir, tensors, config, max_shard_bytes, extra_files)
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"--out={out_dir!r} exists and is not empty; give a new directory")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
  try:
    shards, weight_map, pending, size = [], {}, {}, 0

    def flush():
      nonlocal pending, size
      if pending:
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(pending, os.path.join(tmp, name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({key: name for key in pending})
        pending, size = {}, 0

    for key, array in tensors:
      array = np.ascontiguousarray(array)
      if pending and size + array.nbytes > max_shard_bytes:
        flush()
      pending[key] = array
      size += array.nbytes
    flush()
    if len(shards) == 1:
      os.replace(os.path.join(tmp, shards[0]), os.path.join(tmp, "model.safetensors"))
      shards = ["model.safetensors"]
    else:
      # The common tools expect "-of-N" names; N is known only now.
      renamed = {old: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, old in enumerate(shards)}
      for old, new in renamed.items():
        os.replace(os.path.join(tmp, old), os.path.join(tmp, new))
      weight_map = {key: renamed[file] for key, file in weight_map.items()}
      shards = list(renamed.values())
      total = sum(os.path.getsize(os.path.join(tmp, name)) for name in shards)
      with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    for name, source in (extra_files or {}).items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(storage.read_bytes(source))  # a local file or gs://
    if os.path.exists(out_dir):
      os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return shards


def _write_to_bucket(out_dir: str, tensors, config: dict, max_shard_bytes: int, extra_files) -> list[str]:
  if storage.listdir(out_dir):
    raise FileExistsError(f"--out={out_dir!r} exists and is not empty; give a new directory")
  local = tempfile.mkdtemp(prefix="mm15_export_")
  try:
    shards = write_checkpoint(os.path.join(local, "out"), tensors, config, max_shard_bytes=max_shard_bytes,
                              extra_files=extra_files)
    names = sorted(os.listdir(os.path.join(local, "out")), key=lambda name: name == "config.json")
    for name in names:
      with open(os.path.join(local, "out", name), "rb") as source, storage.open_file(storage.join(out_dir, name),
                                                                                      "wb") as target:
        shutil.copyfileobj(source, target)
  finally:
    shutil.rmtree(local, ignore_errors=True)
  return shards
