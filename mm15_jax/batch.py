"""The batch the trainer consumes: the seam between data_pipelines and the model.

A batch is a dict of NumPy (host) or jax (device) arrays, global shape below,
B = sequences, L = `data.seq_len`, T = `data.max_tiles`, S = `model.vit.image_size`,
K = `model.connector.tokens_per_tile`:

  tokens                 int32   [B, L]      input token ids
  targets                int32   [B, L]      next-token ids (tokens shifted left)
  loss_mask              float32 [B, L]      1 where the target is trained on
  segment_ids            int32   [B, L]      packed-example id, 1.. ; 0 = padding
  positions              int32   [B, L]      position within its example (restarts per segment)
  images                 uint8   [B, T, S, S, 3]  image tiles as pixels (the model applies the CLIP
                                             normalisation on device); unused tiles are zero
  image_token_positions  int32   [B, T*K]    where in the sequence each image token goes; -1 = unused

Tile t of a row fills sequence slots image_token_positions[b, t*K:(t+1)*K], which are the
image-placeholder tokens of that row, in order.
"""

import numpy as np

FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "images", "image_token_positions")
# What the model reads of a batch, in the order of MM15.__call__'s arguments.
MODEL_INPUTS = ("tokens", "positions", "segment_ids", "images", "image_token_positions")


def shapes(batch_size: int, seq_len: int, max_tiles: int, image_size: int, tokens_per_tile: int) -> dict:
  """Global shape and dtype of every field."""
  b, l, t = batch_size, seq_len, max_tiles
  return {
      "tokens": ((b, l), np.int32),
      "targets": ((b, l), np.int32),
      "loss_mask": ((b, l), np.float32),
      "segment_ids": ((b, l), np.int32),
      "positions": ((b, l), np.int32),
      "images": ((b, t, image_size, image_size, 3), np.uint8),
      "image_token_positions": ((b, t * tokens_per_tile), np.int32),
  }


def shapes_for_config(config, batch_size: int | None = None) -> dict:
  return shapes(
      batch_size or config.train.batch_size,
      config.data.seq_len,
      config.data.max_tiles,
      config.model.vit.image_size,
      config.model.connector.tokens_per_tile,
  )


def check(batch: dict, expected: dict) -> None:
  """Raises a clear error when a batch does not follow the schema."""
  missing = [k for k in expected if k not in batch]
  if missing:
    raise ValueError(f"batch is missing fields {missing}; expected {list(expected)} (see mm15_jax/batch.py)")
  for name, (shape, dtype) in expected.items():
    got = batch[name]
    if tuple(got.shape) != tuple(shape) or np.dtype(got.dtype) != np.dtype(dtype):
      raise ValueError(
          f"batch[{name!r}] has shape {tuple(got.shape)} dtype {got.dtype}, expected {shape} {np.dtype(dtype)}; "
          "check data.seq_len, data.max_tiles, model.vit.image_size, model.connector.tokens_per_tile")
