"""The record: one training document or conversation, as every source hands it over.

A decoded record is a dict:
  kind      one of KINDS
  messages  [{"role": "user" | "assistant" | "text", "content": str}, ...]
            caption / interleaved: only "text" messages (loss on all their text);
            conversation (one image) / multi_image: "user", "assistant", "user", ...,
            ending with "assistant" (loss on assistant turns only);
            text: either only "text" messages or a text-only conversation.
            Each image is the literal IMAGE_MARKER inside content, in image order; the
            number of markers equals len(images).
  images    decoded: uint8 [H, W, 3] arrays; serialised: encoded PNG/JPEG bytes. A video
            clip is a multi_image record of its sampled frames (video_frames.py).
  category  str, "" if none ("text_rich", "refer_ground", "general", ...).
  coords    "image" when the text holds Ferret coordinates normalised to the record's
            single image (remapped to the AnyRes canvas later), else "none".

Serialised form (what ArrayRecord files and the sources' __getitem__ hold): a msgpack map
of the same fields with images as encoded bytes. A source that cannot produce a record
(bad JSON line, missing image file) serialises an error instead (`encode_error`), so the
failure surfaces in `decode` inside the map stage, where `decode_or_skip` counts it.
"""

import io
import re

import msgpack
import numpy as np
import PIL.Image

KINDS = ("caption", "interleaved", "conversation", "multi_image", "text")
ROLES = ("user", "assistant", "text")
IMAGE_MARKER = "<image>"
COORDS = ("none", "image")

# Allowed image counts per kind: (min, max); None = unbounded.
_IMAGE_COUNTS = {
    "caption": (1, 1),
    "interleaved": (1, None),
    "conversation": (1, 1),
    "multi_image": (2, None),
    "text": (0, 0),
}
_FIELDS = ("kind", "messages", "images", "category", "coords")
_ERROR = "error"  # key of a serialised source failure


class MalformedRecord(ValueError):
  """A record with a bad structure or field; the message names the field."""


class CorruptImage(ValueError):
  """An image that cannot be read or decoded; the message names the image."""


def _fail(field: str, problem: str):
  raise MalformedRecord(f"{field}: {problem}")


def _check_roles(kind: str, roles: list[str]) -> None:
  if kind in ("caption", "interleaved"):
    for i, role in enumerate(roles):
      if role != "text":
        _fail(f"messages[{i}].role", f"{kind} records hold only 'text' messages, got {role!r}")
    return
  if kind == "text" and all(r == "text" for r in roles):
    return
  # A conversation: user, assistant, user, ..., assistant.
  for i, role in enumerate(roles):
    expected = "user" if i % 2 == 0 else "assistant"
    if role != expected:
      _fail(f"messages[{i}].role", f"a {kind} conversation alternates user/assistant starting with user; "
            f"expected {expected!r}, got {role!r}")
  if roles[-1] != "assistant":
    _fail(f"messages[{len(roles) - 1}].role", f"a {kind} conversation must end with an assistant turn")


def _check_image(i: int, image) -> None:
  if isinstance(image, bytes):
    if not image:
      _fail(f"images[{i}]", "empty bytes")
    return
  if not isinstance(image, np.ndarray):
    _fail(f"images[{i}]", f"expected encoded bytes or a uint8 [H, W, 3] array, got {type(image).__name__}")
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
    _fail(f"images[{i}]", f"expected a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")


def validate(record) -> None:
  """Raises MalformedRecord naming the first bad field. category/coords may be absent."""
  if not isinstance(record, dict):
    _fail("record", f"expected a dict, got {type(record).__name__}")
  unknown = [key for key in record if key not in _FIELDS]
  if unknown:
    _fail(str(unknown[0]), f"unknown field; a record has {_FIELDS}")
  for field in ("kind", "messages"):
    if field not in record:
      _fail(field, "missing")
  kind = record["kind"]
  if kind not in KINDS:
    _fail("kind", f"{kind!r} is not one of {KINDS}")
  messages = record["messages"]
  if not isinstance(messages, list) or not messages:
    _fail("messages", "expected a non-empty list of {'role', 'content'} dicts")
  markers = 0
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or set(message) != {"role", "content"}:
      _fail(f"messages[{i}]", f"expected a dict with exactly 'role' and 'content', got {message!r:.80}")
    if message["role"] not in ROLES:
      _fail(f"messages[{i}].role", f"{message['role']!r} is not one of {ROLES}")
    if not isinstance(message["content"], str):
      _fail(f"messages[{i}].content", f"expected str, got {type(message['content']).__name__}")
    markers += message["content"].count(IMAGE_MARKER)
  _check_roles(kind, [m["role"] for m in messages])
  images = record.get("images", [])
  if not isinstance(images, list):
    _fail("images", f"expected a list, got {type(images).__name__}")
  for i, image in enumerate(images):
    _check_image(i, image)
  low, high = _IMAGE_COUNTS[kind]
  if len(images) < low or (high is not None and len(images) > high):
    allowed = f"exactly {low}" if low == high else f"at least {low}"
    _fail("images", f"a {kind} record has {allowed} image(s), got {len(images)}")
  if markers != len(images):
    _fail("messages", f"{markers} {IMAGE_MARKER} marker(s) for {len(images)} image(s); they must match")
  category = record.get("category", "")
  if not isinstance(category, str):
    _fail("category", f"expected str, got {type(category).__name__}")
  coords = record.get("coords", "none")
  if coords not in COORDS:
    _fail("coords", f"{coords!r} is not one of {COORDS}")
  if coords == "image" and len(images) != 1:
    _fail("coords", f"'image' coordinates need exactly one image, got {len(images)}")


def encode_image(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  # Fast compression: records are written once and read often, PNG decode speed is the same.
  PIL.Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  """Encoded PNG/JPEG/... bytes -> uint8 [H, W, 3] RGB (alpha dropped). Raises CorruptImage."""
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      image.load()  # force a full decode: truncated files fail here, not later
      array = np.asarray(image.convert("RGB"))
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
    # PIL names the buffer by its repr ("<_io.BytesIO object at 0x...>"): say what it is instead.
    message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image bytes", str(e))
    raise CorruptImage(f"cannot decode image ({len(data)} bytes): {type(e).__name__}: {message}") from e
  if array.ndim != 3 or 0 in array.shape:
    raise CorruptImage(f"decoded image has shape {array.shape}")
  return array


def encode(record) -> bytes:
  """Validates, PNG-encodes array images (bytes are kept as they are), msgpack-serialises."""
  validate(record)
  images = [im if isinstance(im, bytes) else encode_image(im) for im in record.get("images", [])]
  return msgpack.packb({
      "kind": record["kind"],
      "messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]],
      "images": images,
      "category": record.get("category", ""),
      "coords": record.get("coords", "none"),
  }, use_bin_type=True)


class LocatedBytes(bytes):
  """A serialised record that knows where it was read (`where`: a file and line, row or index),
  so one that fails to decode later is reported with its place (mixture.ToExample)."""

  def __new__(cls, data: bytes, where: str):
    item = super().__new__(cls, data)
    item.where = where
    return item

  def __reduce__(self):  # grain may pickle items between processes
    return LocatedBytes, (bytes(self), self.where)


def encode_error(reason: str, *, corrupt_image: bool = False) -> bytes:
  """A serialised source failure: `decode` raises CorruptImage / MalformedRecord with reason."""
  return msgpack.packb({_ERROR: reason, "corrupt_image": corrupt_image}, use_bin_type=True)


def decode(data: bytes, *, decode_images: bool = True) -> dict:
  """Serialised bytes -> validated record with all five fields.

  decode_images=False keeps images as encoded bytes (for checks and copying).
  Raises MalformedRecord or CorruptImage; the message names the field or image.
  """
  try:
    obj = msgpack.unpackb(data, raw=False)
  except Exception as e:  # noqa: BLE001  msgpack raises many types on garbage
    raise MalformedRecord(f"record: not a msgpack record ({type(e).__name__}: {e})") from e
  if isinstance(obj, dict) and _ERROR in obj:
    raise (CorruptImage if obj.get("corrupt_image") else MalformedRecord)(str(obj[_ERROR]))
  validate(obj)
  record = {"category": "", "coords": "none", "images": [], **obj}
  if decode_images:
    images = []
    for i, image in enumerate(record["images"]):
      try:
        images.append(decode_image(image))
      except CorruptImage as e:
        raise CorruptImage(f"images[{i}]: {e}") from e
    record["images"] = images
  return record


def decode_or_skip(data: bytes, *, decode_images: bool = True):
  """(record, None), or (None, reason) for a malformed record or corrupt image; never raises those.

  reason is "MalformedRecord: <field>: <problem>" or "CorruptImage: images[i]: <problem>";
  the part before the colon is a stable key for counting.
  """
  try:
    return decode(data, decode_images=decode_images), None
  except (MalformedRecord, CorruptImage) as e:
    return None, f"{type(e).__name__}: {e}"
