"""kind="parquet": Parquet shards of the public corpora as a random-access source of serialised records.

  ParquetSource("/data/obelics/*.parquet")                        # texts + images columns
  ParquetSource("/data/llava-{0000..0009}.parquet", image_root="/data/coco",
                fields=dict(conversations="conversations", image="image"))

Two layouts (corpus_formats.py has the row conventions), auto-detected from the columns:
  "interleaved"    OBELICS: `texts` (list of str|null) and `images` (list of null|image)
  "conversations"  LLaVA: `conversations` (list of {from, value}) and `image` (one image
                   or null) or `images` (a list of images)
An image cell is bytes, a {bytes, path} struct, or a path under image_root (default: the
shard's folder); a URL cannot be fetched, so its row is skipped with that reason.

Rows of all shards are indexed globally in shard order (disjoint ranges, as in
ArrayRecordSource). A row is read from its row group; the last few row groups stay cached,
so in-order reading (eval, the converter) reads each group once, while shuffled reading
pays a row group per row: keep row groups small, or convert to ArrayRecord for long runs.
"""

import collections
import contextlib
import os
import threading

import numpy as np

from data_pipelines import corpus_formats, records, storage
from data_pipelines.sources import specs

KEYS = ("paths", "eval_paths", "image_root", "layout", "allow_absolute_paths", "fields")

LAYOUTS = ("interleaved", "conversations")
# The columns each record field is read from; None or "" marks a column the data lacks.
FIELDS = dict(texts="texts", images="images", conversations="conversations", image="image")
CACHED_ROW_GROUPS = 4  # a few, so grain's reader threads working near each other share them


def _columns(layout: str, fields: dict, names, path: str) -> list[str]:
  """The columns a layout reads; for conversations, the image column the first shard has."""
  if layout == "interleaved":
    return [fields["texts"], fields["images"]]
  wanted = [fields[key] for key in ("image", "images") if fields[key]]  # LLaVA's single `image` first
  present = [column for column in wanted if column in names]
  if wanted and not present:
    raise ValueError(f"parquet {path}: no image column {' or '.join(map(repr, wanted))} among {names}; name it "
                     f"with fields=dict(image=...) (one image) or fields=dict(images=...) (a list), or give "
                     f"fields=dict(image=None, images=None) if the conversations are text-only")
  return [fields["conversations"]] + present[:1]


def _check_columns(columns: list[str], names, path: str) -> None:
  missing = [column for column in columns if column not in names]
  if missing:
    raise ValueError(f"parquet {path}: no column {missing[0]!r} (columns: {names}); every shard needs {columns}; "
                     f"map yours with fields=dict({', '.join(f'{key}=...' for key in FIELDS)})")


def _detect_layout(fields: dict, names, path: str) -> str:
  if fields["conversations"] in names:
    return "conversations"
  if fields["texts"] in names and fields["images"] in names:
    return "interleaved"
  raise ValueError(f"parquet {path}: columns {names} fit no layout: 'conversations' needs column "
                   f"{fields['conversations']!r}, 'interleaved' needs {fields['texts']!r} and {fields['images']!r}; "
                   f"name your columns with fields=dict(conversations=..., image=...) or dict(texts=..., images=...)")


class _Entry:
  def __init__(self):
    self.lock, self.value = threading.Lock(), None


class _RowGroupCache:
  """The last few row groups read; grain's reader threads share it and read each group once."""

  def __init__(self, read, size: int):
    self._read, self._size = read, size
    self._lock, self._entries = threading.Lock(), collections.OrderedDict()

  def get(self, key):
    with self._lock:
      entry = self._entries.get(key)
      if entry is None:
        entry = self._entries[key] = _Entry()
        while len(self._entries) > self._size:
          self._entries.popitem(last=False)
      self._entries.move_to_end(key)
    with entry.lock:
      if entry.value is None:
        entry.value = self._read(key)
      return entry.value


def _pyarrow():
  """pyarrow, imported on first use: only Parquet users need it (the `parquet` extra)."""
  try:
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401  (pa.parquet)
  except ImportError as e:
    raise ImportError(f"Parquet sources need pyarrow ({e}): pip install 'mm15_jax[parquet]'") from e
  return pa


@contextlib.contextmanager
def _parquet_file(path: str):
  """A local file is opened by path (memory-mapped reads); a bucket object through its file object."""
  pq = _pyarrow().parquet
  if not storage.is_remote(path):
    with pq.ParquetFile(path) as f:
      yield f
    return
  with storage.open_file(path) as raw, pq.ParquetFile(raw) as f:
    yield f


class ParquetSource:
  """Serialised records from Parquet shards; picklable (grain workers reopen the files)."""

  def __init__(self, paths, *, image_root: str | None = None, fields: dict | None = None,
               layout: str | None = None, allow_absolute_paths: bool = False):
    """paths: a glob, a brace pattern, a file, or a list of these. fields: columns (FIELDS).
    Image paths in cells stay under image_root unless allow_absolute_paths."""
    self.allow_absolute_paths = bool(allow_absolute_paths)
    self.paths = corpus_formats.shard_files(paths, "parquet")
    unknown = sorted(set(fields or {}) - set(FIELDS))
    if unknown:
      raise ValueError(f"parquet fields {unknown} unknown; the keys are {sorted(FIELDS)}")
    self.fields = {**FIELDS, **(fields or {})}
    if layout is not None and layout not in LAYOUTS:
      raise ValueError(f"parquet layout={layout!r}: choose one of {LAYOUTS}, or None to detect it from the columns")
    self.image_root = None if image_root is None else os.fspath(image_root)
    self.layout, self.columns = layout, None
    group_rows, group_shard = [], []
    for shard, path in enumerate(self.paths):
      names, rows = self._read_footer(path)
      if self.columns is None:
        self.layout = self.layout or _detect_layout(self.fields, names, path)
        self.columns = _columns(self.layout, self.fields, names, path)
      _check_columns(self.columns, names, path)
      group_rows += rows
      group_shard += [shard] * len(rows)
    # Global index of each row group's first row, then one past the last row.
    self._group_starts = np.concatenate([[0], np.cumsum(group_rows, dtype=np.int64)])
    self._group_shard = np.asarray(group_shard, np.int64)
    self._group_in_shard = np.concatenate(
        [np.zeros(0, np.int64)] + [np.arange(n) for n in np.bincount(self._group_shard, minlength=len(self.paths))])
    if not len(self):
      raise ValueError(f"parquet paths {paths!r}: {len(self.paths)} shard(s) but no rows")
    self._cache = _RowGroupCache(self._read_group, CACHED_ROW_GROUPS)

  @staticmethod
  def _read_footer(path: str) -> tuple[list[str], list[int]]:
    try:
      with _parquet_file(path) as f:
        return f.schema_arrow.names, [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
    except (OSError, _pyarrow().ArrowException) as e:
      raise ValueError(f"parquet {path}: cannot read the file's footer ({type(e).__name__}: {e}); is it a complete "
                       f"Parquet file? Remove it from paths or fetch it again") from e

  def __getstate__(self):
    return {key: value for key, value in self.__dict__.items() if key != "_cache"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._cache = _RowGroupCache(self._read_group, CACHED_ROW_GROUPS)

  def __len__(self) -> int:
    return int(self._group_starts[-1])

  def _read_group(self, group: int):
    """The row group's table, or the exception that reading it raised (its rows become errors)."""
    path = self.paths[self._group_shard[group]]
    try:
      with _parquet_file(path) as f:
        return f.read_row_group(int(self._group_in_shard[group]), columns=self.columns)
    except (OSError, _pyarrow().ArrowException) as e:
      return e

  def locate(self, index: int) -> tuple[str, int]:
    """(shard path, row within the shard) of a global index."""
    group = int(np.searchsorted(self._group_starts, index, side="right")) - 1
    shard = int(self._group_shard[group])
    first_group = int(np.searchsorted(self._group_shard, shard, side="left"))
    return self.paths[shard], int(index - self._group_starts[first_group])

  def row(self, index: int) -> dict:
    """The raw row: {column: Python value} (raises records.MalformedRecord if unreadable)."""
    group = int(np.searchsorted(self._group_starts, index, side="right")) - 1
    table = self._cache.get(group)
    if isinstance(table, Exception):
      raise records.MalformedRecord(f"cannot read row group {self._group_in_shard[group]}: "
                                    f"{type(table).__name__}: {table}")
    offset = int(index - self._group_starts[group])
    return {column: table.column(column)[offset].as_py() for column in self.columns}

  def __getitem__(self, index: int) -> bytes:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} rows in {len(self.paths)} parquet shards")
    path, row_in_shard = self.locate(index)
    where = f"{storage.basename(path)} row {row_in_shard}"
    image_root = storage.dirname(path) if self.image_root is None else self.image_root
    image_of = lambda cell, field: corpus_formats.image_bytes(cell, image_root, field, self.allow_absolute_paths)
    try:
      row = self.row(index)
      if self.layout == "interleaved":
        record = corpus_formats.document_record(row[self.columns[0]], row[self.columns[1]], image_of, self.fields)
      else:
        record = corpus_formats.conversation_record(row[self.columns[0]], self._images(row, image_of),
                                                    self.columns[0])
      return records.LocatedBytes(records.encode(record), where)
    except records.CorruptImage as e:
      return records.encode_error(f"{where}: {e}", corrupt_image=True)
    except records.MalformedRecord as e:
      return records.encode_error(f"{where}: {e}")

  def _images(self, row: dict, image_of) -> list[bytes]:
    """The conversation's images: none (no column, or null: a text-only row), one, or a list."""
    value = row[self.columns[1]] if len(self.columns) > 1 else None
    if value is None:
      return []
    if not isinstance(value, list):
      return [image_of(value, self.columns[1])]
    return [image_of(cell, f"{self.columns[1]}[{i}]") for i, cell in enumerate(value)]

  def __repr__(self) -> str:
    return (f"ParquetSource({len(self.paths)} shards, {len(self)} rows, layout={self.layout!r}, "
            f"columns={self.columns}, first={self.paths[0]!r})")


def build(name: str, spec, config, split: str) -> ParquetSource:
  return ParquetSource(specs.split_paths(name, spec, "parquet", split), image_root=specs.field(spec, "image_root"),
                       layout=specs.field(spec, "layout"),
                       allow_absolute_paths=specs.field(spec, "allow_absolute_paths", False),
                       fields=specs.field_map(spec))
