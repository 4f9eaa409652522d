"""How the public multimodal corpora lay out a sample, turned into records (records.py).

The Parquet and WebDataset sources read the containers; this module knows the rows:

  LLaVA-style conversation   [{"from": "human" | "gpt", "value": "<image>\\nWhat is it?"}, ...]
                             plus 0..n images -> a text / conversation / multi_image record
  OBELICS-style document     texts[i] or images[i] set at each position i (the other null)
                             -> an interleaved record (a text record when it has no image)
  caption                    a string plus one image -> a caption record
  image cell                 encoded bytes, a {"bytes", "path"} struct (how Hugging Face
                             `datasets` stores an Image feature) or a path under image_root

Functions raise records.MalformedRecord / records.CorruptImage naming the field; the
sources turn those into `records.encode_error` items, counted as skips downstream.
Also here: the file names the Parquet, WebDataset and JSONL sources accept (globs and `{000..099}` braces).
"""

import os
import re

from data_pipelines import records, storage

M = records.IMAGE_MARKER

# LLaVA writes human/gpt; some re-releases use the chat roles themselves.
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# --- shard names ----------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
  """"llava-{000..002}.tar" -> llava-000.tar, llava-001.tar, llava-002.tar; "{a,b}" -> a, b.

  As webdataset and the shell do: a range keeps the zero padding of its bounds, several
  groups give their product in order; a group that is neither (e.g. "{x}") stays literal.
  """
  for match in _BRACE.finditer(pattern):
    body = match.group(1)
    numbers = _RANGE.match(body)
    if numbers:
      low, high = numbers.groups()
      padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (low, high))
      width = max(len(low), len(high)) if padded else 0
      step = 1 if int(high) >= int(low) else -1
      choices = [f"{n:0{width}d}" for n in range(int(low), int(high) + step, step)]
    elif "," in body:
      choices = body.split(",")
    else:
      continue
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]
  return [pattern]


def shard_files(paths, what: str) -> list[str]:
  """A glob, a brace pattern, a file, or a list of these -> the files, in the order named.

  Every file a brace pattern names must exist (a missing shard is an error, not a smaller
  dataset); a glob must match something.
  """
  patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  files, missing = [], []
  for pattern in patterns:
    for name in expand_braces(os.fspath(pattern)):
      if storage.has_magic(name):
        matched = storage.glob(name)
        files.extend(matched)
        missing.extend([] if matched else [name])
      elif storage.isfile(name):
        files.append(name)
      else:
        missing.append(name)
  if missing or not files:
    raise FileNotFoundError(f"{what} paths {paths!r}: {len(missing)} name(s) match no file, e.g. {missing[:3]}; "
                            f"give existing files, a glob, or a brace range like 'shard-{{000..099}}.tar'")
  return files


# --- cells and rows -------------------------------------------------------------------------


def image_bytes(value, image_root: str, field: str, allow_absolute: bool = False) -> bytes:
  """One image cell -> its encoded bytes (not decoded here). Nothing is downloaded."""
  if isinstance(value, dict):  # {"bytes": ..., "path": ...}: embedded bytes win, else the path
    if value.get("bytes"):
      return bytes(value["bytes"])
    if not value.get("path"):
      raise records.MalformedRecord(f"{field}: an image struct with neither bytes nor path")
    value = value["path"]
  if isinstance(value, (bytes, bytearray, memoryview)):
    if not value:
      raise records.CorruptImage(f"{field}: empty bytes")
    return bytes(value)
  if not isinstance(value, str):
    raise records.MalformedRecord(f"{field}: expected image bytes, a {{bytes, path}} struct or a path, "
                                  f"got {type(value).__name__}")
  if _URL.match(value):
    raise records.CorruptImage(f"{field}: {value!r:.120} is a URL and nothing is downloaded; fetch the images "
                               f"first and give their paths under image_root (or embed their bytes)")
  try:
    return storage.read_bytes(storage.under(image_root, value, allow_absolute))
  except ValueError as e:  # outside image_root
    raise records.MalformedRecord(f"{field}: {e}") from e
  except OSError as e:
    raise records.CorruptImage(f"{field}: cannot read {value!r} under image_root {image_root!r}: "
                               f"{e.strerror or e}") from e


def conversation_record(turns, images: list[bytes], field: str = "conversations") -> dict:
  """LLaVA turns + images -> a text (no image), conversation (one) or multi_image record.

  Each "<image>" in a value marks an image, in order. A row with images but no marker at
  all gets them in front of its first turn, as "<image>\\n" (LLaVA's own placement).
  """
  if not isinstance(turns, list) or not turns:
    raise records.MalformedRecord(f"{field}: expected a non-empty list of {{from, value}} turns, got {turns!r:.80}")
  messages = []
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
      raise records.MalformedRecord(f"{field}[{i}]: expected a {{from, value}} turn, got {turn!r:.80}")
    role = SPEAKERS.get(turn["from"])
    if role is None:
      raise records.MalformedRecord(f"{field}[{i}].from: {turn['from']!r} is not one of {sorted(SPEAKERS)}")
    if not isinstance(turn["value"], str):
      raise records.MalformedRecord(f"{field}[{i}].value: expected str, got {type(turn['value']).__name__}")
    messages.append({"role": role, "content": turn["value"]})
  if images and not any(M in m["content"] for m in messages):
    messages[0]["content"] = M * len(images) + "\n" + messages[0]["content"]
  kind = "text" if not images else "conversation" if len(images) == 1 else "multi_image"
  return dict(kind=kind, messages=messages, images=list(images))


def document_record(texts, images, image_of, fields: dict) -> dict:
  """OBELICS texts[i] / images[i] -> an interleaved record (a text record without images).

  Each text is one "text" message; the markers of the images before it open that message,
  images after the last text close it. image_of(cell, field) -> bytes resolves a cell.
  """
  texts_field, images_field = fields["texts"], fields["images"]
  for name, value in ((texts_field, texts), (images_field, images)):
    if not isinstance(value, list):
      raise records.MalformedRecord(f"{name}: expected a list, got {type(value).__name__}")
  if len(texts) != len(images):
    raise records.MalformedRecord(f"{texts_field}/{images_field}: {len(texts)} texts and {len(images)} images; "
                                  f"position i holds {texts_field}[i] or {images_field}[i], so lengths must match")
  messages, data, markers = [], [], ""
  for i, (text, image) in enumerate(zip(texts, images)):
    if text is not None and image is not None:
      raise records.MalformedRecord(f"{texts_field}[{i}], {images_field}[{i}]: both set; a position holds a text "
                                    f"or an image")
    if image is not None:
      data.append(image_of(image, f"{images_field}[{i}]"))
      markers += M
    elif text is not None:
      if not isinstance(text, str):
        raise records.MalformedRecord(f"{texts_field}[{i}]: expected str, got {type(text).__name__}")
      messages.append({"role": "text", "content": markers + text})
      markers = ""
  if markers and messages:
    messages[-1]["content"] += markers
  elif markers:
    messages = [{"role": "text", "content": markers}]
  if not messages:
    raise records.MalformedRecord(f"{texts_field}/{images_field}: a document with no text and no image")
  return dict(kind="interleaved" if data else "text", messages=messages, images=data)


def caption_record(caption, images: list[bytes], field: str = "caption") -> dict:
  """A caption and its image -> a caption record, the marker in front unless already placed."""
  if not isinstance(caption, str):
    raise records.MalformedRecord(f"{field}: expected str, got {type(caption).__name__}")
  if images and M not in caption:
    caption = M * len(images) + caption
  return dict(kind="caption", messages=[{"role": "text", "content": caption}], images=list(images))
