"""Random-access sources of SERIALISED records: ArrayRecord shards, tfds, JSONL + image files,
and the public corpora as distributed: Parquet (parquet_source.py) and WebDataset tars
(webdataset_source.py).

Every source is a grain random-access source (`__len__`, `__getitem__`) whose items are
the bytes of `records.encode` (or of `records.encode_error` when the source could not make
a record). Decoding the images is left to the map stage (`records.decode_or_skip`), which
runs in the grain worker processes and turns bad items into skip counts, never crashes:
reading stays cheap and every failure surfaces in one place.

  ArrayRecordSource("data/sft-*.array_record")    # or a list of paths, or convert's --out
  TfdsSource("my_vqa", "train", "/data/tfds", fields=dict(kind="conversation", image="image",
             question="question", answer="answers"))
  JsonlSource("data/sft.jsonl", image_root="data/images")
  ParquetSource("/data/obelics-*.parquet")                 # or LLaVA conversations
  WebDatasetSource("/data/llava-{000000..000099}.tar")

grain reads a source from several threads at once (ReadOptions.num_threads), so reads
share no file position: each uses its own handle or a positional read.
"""

import glob
import json
import os
import threading

import grain
import numpy as np

from data_pipelines import records, storage, video_frames
from data_pipelines.parquet_source import ParquetSource
from data_pipelines.webdataset_source import WebDatasetSource

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


# --- tfds ---------------------------------------------------------------------------------

# How a tfds example becomes a record (TfdsSource's `fields`):
#   kind      the record kind of every example
#   image     feature holding the image (tfds Image) or images (Sequence(Image)); "" for none
#   text      feature with the text of caption / interleaved / text documents
#   question, answer   features of a single-turn conversation (conversation / multi_image,
#             or a text-only conversation); a list-valued answer (e.g. VQA's several
#             answers) contributes its first element
#   category, coords   constants copied into every record
# Images go in front of the text as markers ("<image>" per image; followed by a newline
# before a question) unless the text already holds one marker per image.
TFDS_FIELDS = dict(kind="caption", image="image", text="", question="", answer="", category="", coords="none")


def _text(value) -> str:
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
    if len(value) == 0:
      raise records.MalformedRecord("text feature: empty list")
    value = value[0]
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise records.MalformedRecord(f"text feature: not UTF-8 ({e})") from e
  if not isinstance(value, str):
    raise records.MalformedRecord(f"text feature: expected str or bytes, got {type(value).__name__}")
  return value


def _with_markers(text: str, num_images: int, separator: str) -> str:
  if not num_images or text.count(records.IMAGE_MARKER):
    return text  # already placed (a wrong count is left for validation to report)
  return records.IMAGE_MARKER * num_images + separator + text


def tfds_to_record(example: dict, fields: dict) -> dict:
  """A tfds example (images still encoded bytes) -> record with byte images; see TFDS_FIELDS."""
  fields = {**TFDS_FIELDS, **fields}
  images = []
  if fields["image"]:
    value = example[fields["image"]]
    images = [value] if isinstance(value, bytes) else list(value)
    images = [bytes(image) for image in images]
  kind = fields["kind"]
  if fields["question"]:
    question = _with_markers(_text(example[fields["question"]]), len(images), "\n")
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": _text(example[fields["answer"]])}]
  else:
    text = _with_markers(_text(example[fields["text"]]), len(images), "")
    messages = [{"role": "text", "content": text}]
  return dict(kind=kind, messages=messages, images=images, category=fields["category"], coords=fields["coords"])


def _check_fields(fields: dict, features) -> None:
  unknown = sorted(set(fields) - set(TFDS_FIELDS))
  if unknown:
    raise ValueError(f"tfds fields {unknown} unknown; expected keys of {sorted(TFDS_FIELDS)}")
  merged = {**TFDS_FIELDS, **fields}
  if merged["kind"] not in records.KINDS:
    raise ValueError(f"tfds fields kind={merged['kind']!r} is not one of {records.KINDS}")
  if bool(merged["question"]) != bool(merged["answer"]) or not (merged["question"] or merged["text"]):
    raise ValueError(f"tfds fields {fields}: give `text`, or both `question` and `answer`")
  for key in ("image", "text", "question", "answer"):
    if merged[key] and merged[key] not in features:
      raise ValueError(f"tfds fields {key}={merged[key]!r} is not a feature; features: {sorted(features)}")


class TfdsSource:
  """Serialised records from a tfds dataset prepared on disk (array_record format).

  Images are read as their stored encoded bytes (no decode here, and no TensorFlow).
  Nothing is downloaded: the dataset must already be in data_dir.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None, *, fields: dict):
    self._args = (name, split, data_dir, fields)
    self.name, self.fields = f"{name}/{split}", {**TFDS_FIELDS, **fields}
    self._source = self._open()

  def _open(self):
    try:
      import tensorflow_datasets as tfds  # slow import; only tfds users pay it
    except ImportError as e:
      raise ImportError(f"kind='tfds' sources need tensorflow-datasets ({e}): pip install 'mm15_jax[tfds]'") from e

    class KeepEncoded(tfds.decode.SkipDecoding):
      def decode_batch_example_np(self, serialized):  # Sequence(Image): a list of encoded images
        return serialized

    name, split, data_dir, fields = self._args
    _check_fields(fields, tfds.builder(name, data_dir=data_dir, try_gcs=False).info.features)
    image = self.fields["image"]
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False,
                            decoders={image: KeepEncoded()} if image else None)

  # The decoder's class is local (tfds is imported lazily): pickle the arguments, reopen.
  def __getstate__(self):
    return {key: value for key, value in self.__dict__.items() if key != "_source"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._source = self._open()

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> bytes:
    try:
      return records.LocatedBytes(records.encode(tfds_to_record(self._source[index], self.fields)),
                                  f"tfds {self.name}[{index}]")
    except records.MalformedRecord as e:
      return records.encode_error(f"tfds {self.name}[{index}]: {e}")

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {len(self)} records, fields={self.fields})"


# --- JSONL --------------------------------------------------------------------------------


class JsonlSource:
  """Serialised records from a JSONL file whose lines are

    {"kind": ..., "messages": [...], "images": ["relative/path.png", ...],
     "category": "...", "coords": "none" | "image"}

  images are paths under image_root (default: the file's folder), read as bytes, not
  decoded. The file and image_root may be local or in a bucket (gs://, storage.py). Other
  keys (an "id", say) are ignored; blank lines are not records. A line that is bad JSON,
  malformed, or names a missing image becomes an error item (see module doc).

  A video clip (MM1.5-Video SFT) is a line with "video" instead of "images":

    {"video": "clips/0001/" or "clips/0001.gif", "question": "...", "answer": "..."}
    {"video": "clips/0001.gif", "messages": [{"role": "user", "content": "<video>\\nWhat happens?"}, ...]}

  a folder of frames or an animated GIF under image_root, sampled to `frames` frames as
  inference samples them (video_frames.py). The frames open the first user turn, laid out
  by video_frames.video_prompt (a "<video>" marker there is replaced by them); the record
  is multi_image (conversation for a one-frame clip), category from the line.
  """

  def __init__(self, path: str, image_root: str | None = None, frames: int | None = None,
               allow_absolute_paths: bool = False):
    self.path = storage.absolute(path)
    self.frames = int(frames or video_frames.DEFAULT_FRAMES)
    if self.frames < 1:
      raise ValueError(f"frames={frames}: frames sampled per video must be >= 1 (config.video.frames)")
    self.image_root = storage.dirname(self.path) if image_root is None else os.fspath(image_root)
    self.allow_absolute_paths = bool(allow_absolute_paths)
    starts, lines, offset = [], [], 0
    with storage.open_file(self.path) as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          starts.append(offset)
          lines.append(number)
        offset += len(line)
    self._starts = np.asarray(starts + [offset], np.int64)  # one past the last line: its end
    self._line_numbers = np.asarray(lines, np.int64)
    self._file = None
    self._remote = threading.local() if storage.is_remote(self.path) else None

  def __getstate__(self):  # each worker opens its own handles
    return {**self.__dict__, "_file": None, "_remote": None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._remote = threading.local() if storage.is_remote(self.path) else None

  def __len__(self) -> int:
    return len(self._line_numbers)

  def line_number(self, index: int) -> int:
    return int(self._line_numbers[index])

  def _line(self, index: int) -> bytes:
    start, size = int(self._starts[index]), int(self._starts[index + 1] - self._starts[index])
    if self._remote is not None:  # a bucket object: one handle per reader thread, seek + read
      if getattr(self._remote, "handle", None) is None:
        self._remote.handle = storage.open_file(self.path)
      self._remote.handle.seek(start)
      return self._remote.handle.read(size)
    # Two threads racing here may each open the file; each keeps its own reference for the
    # read, because the handle that loses the race is closed when its last reference goes.
    handle = self._file
    if handle is None:
      handle = self._file = open(self.path, "rb", buffering=0)
    # pread, not seek + read: no shared file position, so grain's reader threads cannot
    # read each other's lines.
    return os.pread(handle.fileno(), size, start)

  def __getitem__(self, index: int) -> bytes:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records in {self.path}")
    where = f"{storage.basename(self.path)} line {self.line_number(index)}"
    try:
      line = json.loads(self._line(index))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      return records.encode_error(f"{where}: bad JSON ({e})")
    if not isinstance(line, dict):
      return records.encode_error(f"{where}: record: expected a JSON object, got {type(line).__name__}")
    if "video" in line:
      return self._video_item(line, where)
    paths = line.get("images", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
      return records.encode_error(f"{where}: images: expected a list of file paths, got {paths!r:.80}")
    images = []
    for i, rel in enumerate(paths):
      try:
        images.append(storage.read_bytes(storage.under(self.image_root, rel, self.allow_absolute_paths)))
      except ValueError as e:  # outside image_root
        return records.encode_error(f"{where}: images[{i}]: {e}")
      except OSError as e:
        return records.encode_error(f"{where}: images[{i}]: cannot read {rel!r}: {e.strerror or e}",
                                    corrupt_image=True)
    record = {key: line[key] for key in ("kind", "messages", "category", "coords") if key in line}
    try:
      return records.LocatedBytes(records.encode({**record, "images": images}), where)
    except records.MalformedRecord as e:
      return records.encode_error(f"{where}: {e}")

  def _video_item(self, line: dict, where: str) -> bytes:
    video = line["video"]
    if not isinstance(video, str) or not video:
      return records.encode_error(f"{where}: video: expected the path of a folder of frames or a GIF, got "
                                  f"{video!r:.80}")
    if "images" in line:
      return records.encode_error(f"{where}: images: a video line's images are its frames; give `video` or "
                                  "`images`, not both")
    try:
      frames = video_frames.load_frame_bytes(storage.under(self.image_root, video, self.allow_absolute_paths),
                                             self.frames)
    except Exception as e:  # noqa: BLE001  Pillow raises OSError, ValueError, SyntaxError, ...
      return records.encode_error(f"{where}: video: cannot read {video!r}: {e}", corrupt_image=True)
    try:
      messages = video_messages(line, len(frames))
      record = dict(kind="multi_image" if len(frames) > 1 else "conversation", messages=messages, images=frames,
                    category=line.get("category", ""))
      return records.LocatedBytes(records.encode(record), where)
    except records.MalformedRecord as e:
      return records.encode_error(f"{where}: {e}")

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r}, {len(self)} records, image_root={self.image_root!r})"


VIDEO_MARKER = "<video>"


def video_messages(line: dict, num_frames: int) -> list[dict]:
  """A video line's turns, its frames' markers opening the first (video_frames.video_prompt)."""
  if "messages" in line:
    messages = line["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
      raise records.MalformedRecord("messages: expected a non-empty list of {'role', 'content'} dicts")
    messages = [dict(m) for m in messages]
  elif "question" in line and "answer" in line:
    messages = [dict(role="user", content=line["question"]), dict(role="assistant", content=line["answer"])]
  else:
    raise records.MalformedRecord("video: a video line needs `question` and `answer`, or `messages`")
  for i, m in enumerate(messages):
    content = m.get("content")
    if not isinstance(content, str):
      raise records.MalformedRecord(f"messages[{i}].content: expected str, got {type(content).__name__}")
    if records.IMAGE_MARKER in content or (i and VIDEO_MARKER in content):
      raise records.MalformedRecord(f"messages[{i}].content: the frames of `video` open the first user turn; "
                                    f"remove its {records.IMAGE_MARKER} markers (a {VIDEO_MARKER} marker is "
                                    "allowed once, in the first turn)")
  if messages[0].get("role") != "user":
    raise records.MalformedRecord(f"messages[0].role: a video conversation starts with the user, got "
                                  f"{messages[0].get('role')!r}")
  first = messages[0]["content"]
  if first.count(VIDEO_MARKER) > 1:
    raise records.MalformedRecord(f"messages[0].content: {first.count(VIDEO_MARKER)} {VIDEO_MARKER} markers; one "
                                  "video per line")
  if VIDEO_MARKER in first:  # LLaVA-style "<video>\nWhat happens?"
    first = first.replace(VIDEO_MARKER + "\n", "").replace(VIDEO_MARKER, "").strip()
  messages[0]["content"] = video_frames.video_prompt(first, num_frames)
  return messages


# config.data.sources[name]["kind"] -> class; the other keys of the entry are its arguments.
SOURCES = {"array_record": ArrayRecordSource, "tfds": TfdsSource, "jsonl": JsonlSource,
           "parquet": ParquetSource, "webdataset": WebDatasetSource}
