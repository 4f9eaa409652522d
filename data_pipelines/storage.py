"""Paths that are local or in a bucket (`gs://bucket/...`): one way to read, write, list and glob.

Local paths go through the OS, as they always did; a path with a scheme (`gs://`, `s3://`)
goes through etils.epath, which reaches Google Cloud Storage through gcsfs (the `gcp` extra:
`pip install -e '.[gcp]'`). Orbax checkpoints take the same epath paths, so a workdir, an
`init.*` path, a data source or a tokenizer may live in a bucket.

Buckets have no append and no rename: `write_text_atomic` writes an object in one request
(an object appears whole or not at all), and `Appender` rewrites the whole object when it is
remote. ArrayRecord readers need local files: see `local_only`.
"""

import contextlib
import glob as _glob
import os
import posixpath
import shutil
import tempfile
import time

from etils import epath


def is_remote(path) -> bool:
  return "://" in os.fspath(path)


def join(base, *parts) -> str:
  if is_remote(base):
    return os.fspath(epath.Path(base).joinpath(*parts))
  return os.path.join(base, *parts)


def under(root, relative, allow_absolute: bool = False) -> str:
  """`relative` joined to `root`, refused (ValueError) if it would leave root: an absolute path, a
  bucket URL or `..` climbing out. A data file's paths then read only what its folder holds;
  `allow_absolute` (a source option) lets absolute paths through as they are."""
  relative = os.fspath(relative)
  if is_remote(relative) or os.path.isabs(relative):
    if allow_absolute:
      return relative
    raise ValueError(f"{relative!r} is an absolute path; paths in records are relative to the image root "
                     f"{os.fspath(root)!r} (set allow_absolute_paths=True on the source to read it as it is)")
  if posixpath.normpath(relative.replace(os.sep, "/")).split("/")[0] == "..":
    raise ValueError(f"{relative!r} climbs out of the image root {os.fspath(root)!r}; paths in records must stay "
                     "under it")
  return join(root, relative)


def absolute(path) -> str:
  return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def dirname(path) -> str:
  """The folder holding `path` (absolute when local)."""
  return os.fspath(epath.Path(path).parent) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def basename(path) -> str:
  return os.path.basename(os.fspath(path).rstrip("/"))


def exists(path) -> bool:
  return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isfile(path) -> bool:
  return epath.Path(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path) -> bool:
  return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path) -> list[str]:
  """Names in a folder (an empty list when it does not exist)."""
  if not isdir(path):
    return []
  if is_remote(path):
    return sorted(p.name for p in epath.Path(path).iterdir())
  return sorted(os.listdir(path))


def makedirs(path) -> None:
  """A bucket has no folders (objects make them), so this is a no-op there."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def rmtree(path) -> None:
  if not exists(path):
    return
  if is_remote(path):
    epath.Path(path).rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def forget_listings(path) -> None:
  """gcsfs caches folder listings for the life of a process, so files another process wrote since
  (a checkpoint a stage's trainer saved) would stay unseen: drop the cached listings."""
  if is_remote(path):
    from etils.epath import backend  # the filesystem instance epath reads buckets through

    backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache()


def open_file(path, mode: str = "rb"):
  return epath.Path(path).open(mode) if is_remote(path) else open(path, mode)


def read_bytes(path) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path) -> str:
  return read_bytes(path).decode("utf-8")


def write_text_atomic(path, text: str) -> None:
  """Readers see the old content or the new, never a half-written file."""
  if is_remote(path):
    epath.Path(path).write_text(text)  # one upload: the object is replaced whole
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def has_magic(pattern) -> bool:
  return _glob.has_magic(os.fspath(pattern))


def glob(pattern) -> list[str]:
  """Sorted matches of a glob; in a bucket, `*`, `?` and `[...]` within the last few path parts
  (no recursive `**`: every match would cost a listing request)."""
  pattern = os.fspath(pattern)
  if not is_remote(pattern):
    return sorted(_glob.glob(pattern))
  scheme, rest = pattern.split("://", 1)
  parts = rest.split("/")
  fixed = next((i for i, part in enumerate(parts) if _glob.has_magic(part)), len(parts))
  if fixed == 0:
    raise ValueError(f"{pattern}: the bucket name cannot be a pattern")
  root = epath.Path(f"{scheme}://" + "/".join(parts[:fixed]))
  if fixed == len(parts):
    return [pattern] if root.exists() else []
  return sorted(os.fspath(p) for p in root.glob("/".join(parts[fixed:])))


def escape(path) -> str:
  return _glob.escape(os.fspath(path))


@contextlib.contextmanager
def local_copy(folder):
  """Yields a local folder with the files of `folder`: itself when local, else a temporary copy of
  a bucket folder's files (not its subfolders), removed afterwards. For readers that need local
  files (safetensors memory-maps them)."""
  if not is_remote(folder):
    yield os.fspath(folder)
    return
  local = tempfile.mkdtemp(prefix="mm15_copy_")
  try:
    for item in epath.Path(folder).iterdir():
      if item.is_file():
        with item.open("rb") as source, open(os.path.join(local, item.name), "wb") as target:
          shutil.copyfileobj(source, target, 16 << 20)
    yield local
  finally:
    shutil.rmtree(local, ignore_errors=True)


class Appender:
  """A text file that grows by lines: appended locally, rewritten whole in a bucket (objects
  cannot be appended to), keeping what an earlier run of the same workdir wrote. In a bucket a
  flush uploads at most every `upload_every_s` seconds (else a long run would upload its whole
  history at every step); `flush(force=True)` and `close()` always upload."""

  def __init__(self, path, upload_every_s: float = 30.0):
    self.path = os.fspath(path)
    self._remote = is_remote(self.path)
    if self._remote:
      self._text = read_text(self.path) if exists(self.path) else ""
      self._pending = False
      self._upload_every_s, self._uploaded_at = upload_every_s, float("-inf")
    else:
      makedirs(os.path.dirname(os.path.abspath(self.path)))
      self._file = open(self.path, "a")

  def write(self, text: str) -> None:
    if self._remote:
      self._text += text
      self._pending = True
    else:
      self._file.write(text)

  def flush(self, force: bool = False) -> None:
    if self._remote:
      if self._pending and (force or time.monotonic() - self._uploaded_at >= self._upload_every_s):
        epath.Path(self.path).write_text(self._text)
        self._pending, self._uploaded_at = False, time.monotonic()
    else:
      self._file.flush()

  def close(self) -> None:
    self.flush(force=True)
    if not self._remote:
      self._file.close()


def local_only(paths, what: str) -> None:
  """Formats whose readers need local files (ArrayRecord, so tfds too): a bucket path is refused
  with the way round. paths: one path or a list."""
  remote = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths) if is_remote(p)]
  if remote:
    raise ValueError(
        f"{what}={remote[0]!r}: ArrayRecord files are read through the local file system; mount the "
        "bucket with GCS FUSE (`gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`, or the GKE GCS FUSE volume in "
        "launch/gke_jobset.yaml) and give the mounted path, or use a JSONL/Parquet/WebDataset source, which "
        "read gs:// directly")
