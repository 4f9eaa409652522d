"""kind="webdataset": WebDataset tar shards as a random-access source of serialised records.

  WebDatasetSource("/data/llava-{000000..000099}.tar")   # or a glob, or a list

A sample is a run of consecutive tar members sharing a key (the name up to the first dot
of its last path component): `0001.jpg` + `0001.json`, or `0001.0.jpg` + `0001.1.png` +
`0001.json` for several images (ordered by the number before the image extension).
  .json with `conversations`  a LLaVA conversation (see corpus_formats.py)
  .json with `caption`        a caption record; so is a `.txt` member
Other members (`.cls`, ...) are ignored.

Shards must be uncompressed tars: each one's headers are scanned once, when the source is
made, into member offsets (tarfile's offset_data), and a sample is read by seeking to its
members. The index travels with the source when grain pickles it into worker processes.
"""

import json
import tarfile

import numpy as np

from data_pipelines import corpus_formats, records, storage
from data_pipelines.sources import specs

KEYS = ("paths", "eval_paths", "fields")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
FIELDS = dict(conversations="conversations", caption="caption")  # keys of the .json member


def split_name(name: str) -> tuple[str, str]:
  """"dir/0001.0.jpg" -> ("dir/0001", "0.jpg"): the key and the extension, as webdataset splits them."""
  folder, _, base = name.rpartition("/")
  key, _, extension = base.partition(".")
  return (f"{folder}/{key}" if folder else key), extension


def index_shard(path: str) -> list[tuple[str, list[tuple[str, int, int]]]]:
  """[(key, [(extension, data offset, size), ...]), ...]: the shard's samples in tar order."""
  samples = []
  try:
    # "r:": no compression, so members lie at fixed offsets.
    with storage.open_file(path) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
      for member in tar:
        key, extension = split_name(member.name)
        if not member.isfile() or not key or key.rpartition("/")[2].startswith("."):
          continue  # folders, links, and hidden files (e.g. macOS "._0001.jpg")
        if not samples or samples[-1][0] != key:
          samples.append((key, []))
        samples[-1][1].append((extension, member.offset_data, member.size))
  except (OSError, tarfile.TarError) as e:
    raise ValueError(f"webdataset {path}: cannot read it as an uncompressed tar ({type(e).__name__}: {e}); shards "
                     f"are read by seeking, so decompress .tar.gz shards first, or drop a damaged one") from e
  return samples


def _image_order(extension: str) -> int:
  number = extension.rpartition(".")[0]
  return int(number) if number.isdigit() else -1


def sample_record(key: str, members: dict, fields: dict) -> dict:
  """{extension: bytes} of one sample -> record (raises MalformedRecord naming the member)."""
  images = [extension for extension in members if extension.rpartition(".")[2].lower() in IMAGE_EXTENSIONS]
  images = [members[extension] for extension in sorted(images, key=_image_order)]  # stable: else tar order
  if "json" in members:
    try:
      meta = json.loads(members["json"])
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise records.MalformedRecord(f"{key}.json: bad JSON ({e})") from e
    if not isinstance(meta, dict):
      raise records.MalformedRecord(f"{key}.json: expected a JSON object, got {type(meta).__name__}")
    if fields["conversations"] in meta:
      return corpus_formats.conversation_record(meta[fields["conversations"]], images,
                                                f"{key}.json {fields['conversations']}")
    if fields["caption"] in meta:
      return corpus_formats.caption_record(meta[fields["caption"]], images, f"{key}.json {fields['caption']}")
    if "txt" not in members:
      raise records.MalformedRecord(f"{key}.json: neither {fields['conversations']!r} nor {fields['caption']!r} "
                                    f"among its keys {sorted(meta)[:10]}, and no .txt member; name the key with "
                                    f"fields=dict(conversations=...) or fields=dict(caption=...)")
  if "txt" in members:
    try:
      caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
      raise records.MalformedRecord(f"{key}.txt: not UTF-8 ({e})") from e
    return corpus_formats.caption_record(caption, images, f"{key}.txt")
  raise records.MalformedRecord(f"{key}: no .json or .txt member (members: {sorted(members)})")


class WebDatasetSource:
  """Serialised records from WebDataset tar shards, indexed globally in shard order."""

  def __init__(self, paths, *, fields: dict | None = None):
    """paths: a brace pattern ("x-{000..099}.tar"), a glob, a file, or a list of these."""
    self.paths = corpus_formats.shard_files(paths, "webdataset")
    unknown = sorted(set(fields or {}) - set(FIELDS))
    if unknown:
      raise ValueError(f"webdataset fields {unknown} unknown; the keys are {sorted(FIELDS)}")
    self.fields = {**FIELDS, **(fields or {})}
    keys, shard_of, starts, extensions, offsets, sizes = [], [], [0], [], [], []
    for shard, path in enumerate(self.paths):
      for key, members in index_shard(path):
        keys.append(key)
        shard_of.append(shard)
        for extension, offset, size in members:
          extensions.append(extension)
          offsets.append(offset)
          sizes.append(size)
        starts.append(len(offsets))
    if not keys:
      raise ValueError(f"webdataset paths {paths!r}: {len(self.paths)} shard(s) but no samples")
    # Sample i: members _member_starts[i]:_member_starts[i+1] of the flat member arrays.
    self._keys, self._extensions = keys, extensions
    self._shard = np.asarray(shard_of, np.int32)
    self._member_starts = np.asarray(starts, np.int64)
    self._offsets, self._sizes = np.asarray(offsets, np.int64), np.asarray(sizes, np.int64)

  def __len__(self) -> int:
    return len(self._keys)

  def members(self, index: int) -> dict:
    """{extension: bytes} of sample `index`, read by seeking (a handle per call: thread-safe)."""
    begin, end = self._member_starts[index], self._member_starts[index + 1]
    out = {}
    with storage.open_file(self.paths[self._shard[index]]) as f:
      for m in range(begin, end):
        f.seek(int(self._offsets[m]))
        data = f.read(int(self._sizes[m]))
        if len(data) != self._sizes[m]:
          raise records.MalformedRecord(f"{self._keys[index]}.{self._extensions[m]}: {len(data)} of "
                                        f"{self._sizes[m]} bytes; the shard is shorter than when it was indexed")
        out[self._extensions[m]] = data
    return out

  def __getitem__(self, index: int) -> bytes:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} samples in {len(self.paths)} webdataset shards")
    where, key = storage.basename(self.paths[self._shard[index]]), self._keys[index]
    try:
      record = sample_record(key, self.members(index), self.fields)
    except OSError as e:
      return records.encode_error(f"{where}: {key}: cannot read ({e.strerror or e})")
    except records.MalformedRecord as e:
      return records.encode_error(f"{where}: {e}")  # the message names the member
    try:
      return records.LocatedBytes(records.encode(record), f"{where}: {key}")
    except records.MalformedRecord as e:
      return records.encode_error(f"{where}: {key}: {e}")

  def __repr__(self) -> str:
    return f"WebDatasetSource({len(self.paths)} shards, {len(self)} samples, first={self.paths[0]!r})"


def build(name: str, spec, config, split: str) -> WebDatasetSource:
  return WebDatasetSource(specs.split_paths(name, spec, "webdataset", split), fields=specs.field_map(spec))
