"""Prompts -> the model's input arrays: the training chat template and AnyRes tiling.

A prompt is laid out by `ExampleBuilder.prompt`, the code that lays out training examples:
  <bos> "User:" {images' blocks and text} "Assistant:"   -> the answer is generated after.
Rows are left-aligned (row b's prompt in slots [0, n_b), positions 0..n_b - 1, padding after
it with segment id 0), so decoding writes row b's next token at slot n_b, position n_b.
Lengths are padded to power-of-two buckets so that a new prompt rarely means a new compile.
"""

import numpy as np
import PIL.Image

from data_pipelines import records, storage

MIN_BUCKET = 64


def as_image(image) -> np.ndarray:
  """A path, encoded bytes, a PIL image or an array -> uint8 [H, W, 3] RGB."""
  if isinstance(image, str):
    image = storage.read_bytes(image)  # a local file or gs://
  if isinstance(image, bytes):
    return records.decode_image(image)
  if isinstance(image, PIL.Image.Image):
    return np.asarray(image.convert("RGB"))
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
    raise ValueError(f"image: expected uint8 [H, W, 3] (or a path / PIL image), got {array.dtype} {array.shape}")
  return array


def make_record(prompt, images=()) -> dict:
  """A str is one user turn; a list of {"role", "content"} a conversation ending with the
  user's turn. Images whose `<image>` markers the text lacks open the first user turn, one
  "<image>\\n" each, as in the built-in data. One image: coordinates in the text are on its
  0..1000 scale (remapped to the AnyRes canvas like training data)."""
  images = [as_image(im) for im in images or ()]
  messages = [dict(role="user", content=prompt)] if isinstance(prompt, str) else [dict(m) for m in prompt]
  markers = sum(m["content"].count(records.IMAGE_MARKER) for m in messages)
  if markers == 0 and images:
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[first]["content"] = f"{records.IMAGE_MARKER}\n" * len(images) + messages[first]["content"]
  elif markers != len(images):
    raise ValueError(f"the prompt has {markers} {records.IMAGE_MARKER!r} markers for {len(images)} images")
  return dict(kind="conversation", messages=messages, images=images, coords="image" if len(images) == 1 else "none")


def bucket(n: int) -> int:
  """The smallest MIN_BUCKET * 2^k >= n."""
  size = MIN_BUCKET
  while size < n:
    size *= 2
  return size


def batch_arrays(examples, *, rows: int, length: int, max_tiles: int, tile: int, tokens_per_tile: int,
                 bos_id: int) -> dict:
  """Prompts (ExampleBuilder.prompt dicts) -> host arrays of `rows` rows (extra rows: a lone <bos>):
  tokens, positions, segment_ids [rows, length], images [rows, max_tiles, tile, tile, 3],
  image_token_positions [rows, max_tiles * K] (-1 unused), last and lengths [rows]."""
  out = dict(tokens=np.zeros((rows, length), np.int32), positions=np.zeros((rows, length), np.int32),
             segment_ids=np.zeros((rows, length), np.int32),
             images=np.zeros((rows, max_tiles, tile, tile, 3), np.uint8),
             image_token_positions=np.full((rows, max_tiles * tokens_per_tile), -1, np.int32),
             lengths=np.ones((rows,), np.int32))
  out["tokens"][:, 0] = bos_id
  out["segment_ids"][:, 0] = 1
  for r, ex in enumerate(examples):
    n, t = len(ex["tokens"]), len(ex["tiles"])
    out["tokens"][r, :n] = ex["tokens"]
    out["positions"][r, :n] = np.arange(n)
    out["segment_ids"][r, :n] = 1
    out["images"][r, :t] = ex["tiles"]
    out["image_token_positions"][r, :len(ex["image_slots"])] = ex["image_slots"]
    out["lengths"][r] = n
  out["last"] = out["lengths"] - 1
  return out
