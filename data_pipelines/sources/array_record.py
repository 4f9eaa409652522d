"""kind="array_record": ArrayRecord shards, e.g. those `python -m data_pipelines.convert` writes.

  ArrayRecordSource("data/sft-*.array_record")    # or a list of paths, or convert's --out
"""

import glob
import json
import os

import grain

from data_pipelines import records, storage
from data_pipelines.sources import specs

KEYS = ("paths", "eval_paths")

SHARD_SUFFIX = ".array_record"
INDEX_SUFFIX = ".index.json"


def shard_name(prefix: str, shard: int, num_shards: int) -> str:
  return f"{prefix}-{shard:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def _expand(path: str) -> list[str]:
  """A glob, a file, or convert's --out prefix (its index, else its shards) -> files."""
  path = os.fspath(path)
  storage.local_only(path, "ArrayRecord path")
  if glob.has_magic(path):
    return sorted(glob.glob(path))
  if os.path.isfile(path):
    return [path]
  if os.path.isfile(path + INDEX_SUFFIX):
    with open(path + INDEX_SUFFIX) as f:
      shards = json.load(f)["shards"]
    return [os.path.join(os.path.dirname(path), name) for name in shards]
  return sorted(glob.glob(f"{glob.escape(path)}-*-of-*{SHARD_SUFFIX}"))


def shard_paths(paths_or_pattern) -> list[str]:
  patterns = [paths_or_pattern] if isinstance(paths_or_pattern, (str, os.PathLike)) else list(paths_or_pattern)
  paths = [p for pattern in patterns for p in _expand(pattern)]
  if not paths:
    raise FileNotFoundError(f"no ArrayRecord files match {paths_or_pattern!r}; give a glob, file paths, "
                            f"or the --out prefix of `python -m data_pipelines.convert`")
  return paths


class ArrayRecordSource:
  """Serialised records from ArrayRecord shards, indexed globally in shard order.

  Global index i is record i - (records in earlier shards) of its shard, so shards are
  disjoint index ranges. Picklable (grain workers reopen the files). Items are
  records.LocatedBytes: "<first shard> record <global index>".
  """

  def __init__(self, paths):
    """paths: a glob, a file, convert's --out prefix, or a list of these."""
    self.paths = shard_paths(paths)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    self._label = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} shards)"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> bytes:
    return records.LocatedBytes(self._source[index], f"{self._label} record {int(index)}")

  def __getitems__(self, indices) -> list[bytes]:
    return [records.LocatedBytes(data, f"{self._label} record {int(i)}")
            for i, data in zip(indices, self._source.__getitems__(indices))]

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records, first={self.paths[0]!r})"


def build(name: str, spec, config, split: str) -> ArrayRecordSource:
  paths = specs.split_paths(name, spec, "array_record", split)
  storage.local_only(paths, f"{specs.where(name)}.{specs.paths_key(split)}")
  return ArrayRecordSource(paths)
