"""kind="jsonl": JSONL files of records whose images (or video frames) are files beside them.

  JsonlSource("data/sft.jsonl", image_root="data/images")
  JsonlFiles([JsonlSource("a.jsonl"), JsonlSource("b.jsonl")])   # several files, in order

A config names the files as the other file kinds do: `paths` / `eval_paths`, a file, a glob,
a brace pattern or a list of these. `path` / `eval_path`, the old names, are still read.
"""

import json
import os
import threading

import numpy as np

from data_pipelines import corpus_formats, records, storage, video_frames
from data_pipelines.sources import specs

KEYS = ("paths", "eval_paths", "image_root", "frames", "allow_absolute_paths")
RENAMED = {"path": "paths", "eval_path": "eval_paths"}  # old name -> new name (a warning names the new one)


class JsonlSource:
  """Serialised records from a JSONL file whose lines are

    {"kind": ..., "messages": [...], "images": ["relative/path.png", ...],
     "category": "...", "coords": "none" | "image"}

  images are paths under image_root (default: the file's folder), read as bytes, not
  decoded. The file and image_root may be local or in a bucket (gs://, storage.py). Other
  keys (an "id", say) are ignored; blank lines are not records. A line that is bad JSON,
  malformed, or names a missing image becomes an error item (data_pipelines/sources/__init__.py).

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


class JsonlFiles:
  """Several JSONL sources as one: the lines of each file in turn, in the order the files are named."""

  def __init__(self, parts: list[JsonlSource]):
    self.parts = list(parts)
    self._starts = np.cumsum([0] + [len(part) for part in self.parts])  # global index of each file's first line

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> bytes:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records in {len(self.parts)} JSONL files")
    part = int(np.searchsorted(self._starts, index, side="right")) - 1  # the last file starting at or before it
    return self.parts[part][int(index - self._starts[part])]

  def __repr__(self) -> str:
    return f"JsonlFiles({len(self.parts)} files, {len(self)} records, first={self.parts[0].path!r})"


def build(name: str, spec, config, split: str) -> JsonlSource | JsonlFiles:
  files = corpus_formats.shard_files(specs.split_paths(name, spec, "jsonl", split, RENAMED), "jsonl")
  # Video lines are sampled to the source's `frames`, else config.video.frames (mm15_video.py).
  frames = specs.field(spec, "frames") or specs.field(specs.field(config, "video") or {}, "frames")
  parts = [JsonlSource(path, specs.field(spec, "image_root"), frames=frames,
                       allow_absolute_paths=specs.field(spec, "allow_absolute_paths", False)) for path in files]
  return parts[0] if len(parts) == 1 else JsonlFiles(parts)
