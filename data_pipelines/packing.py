"""Examples (sequence.py) -> packed batch rows in the schema of mm15_jax/batch.py.

grain's FirstFitPackIterDataset does the packing: it holds `num_bins` rows, puts each
example into the first row where every feature still fits (tokens/loss_on: seq_len,
image_slots: max_tiles*K, tiles: max_tiles; a feature's length is its first dimension, so
tiles [n, S, S, 3] pack along n), and when one does not fit emits the rows (shuffled by
seed) and starts again with it. Its iterator state (the parent's state at the last emitted
packed batch plus the next row) makes get_state/set_state resume exactly. A map then turns
each packed row into the batch row:

  tokens, targets, loss_mask, segment_ids, positions, images, image_token_positions
      (mm15_jax/batch.py): segment ids 1.. in row order, positions restarting per segment,
      padding only at the end; targets/loss_mask are next-token within a segment (the last
      token of a segment has no target); image_token_positions are each example's
      image_slots plus the row position where its segment starts, -1 unused; images stay
      uint8 pixels (a quarter of float32's bytes to move to the devices; the model
      normalises them on device), unused tiles zero.
  num_skipped  int32 scalar: an extra field besides the schema, the number of corrupt or
      malformed records (sequence.Example skipped=MALFORMED) that fell to this row;
  num_overlong int32 scalar: likewise the records dropped as longer than a row (with
      data.overlong="drop", or a truncation that kept no trained token: placeholders of
      ExampleBuilder.build, skipped=TOO_LONG).
  num_dropped  int32 [len(sequence.DROP_REASONS)]: the same records by reason
      (Example drop_reason; DROP_REASONS[i] for entry i): num_skipped + num_overlong in all.
  COUNT_FIELDS names them: counts for the logs, not model inputs.

A skipped example has no tokens and no tiles: it takes no room and only leaves a gap in
the packer's segment numbering, which the row map closes.
"""

import collections

import grain
import numpy as np
from absl import logging

from data_pipelines import sequence
from data_pipelines import tokenizer as tokenizer_lib

DEFAULT_BINS = 8
COUNT_FIELDS = ("num_skipped", "num_overlong", "num_dropped")


class _CheckFits:
  """An example longer than a row is a builder/config mismatch: say which field to change."""

  def __init__(self, seq_len: int, max_tiles: int, tokens_per_tile: int):
    self.seq_len, self.max_tiles, self.k = seq_len, max_tiles, tokens_per_tile

  def __call__(self, ex: dict) -> dict:
    n, t = len(ex["tokens"]), len(ex["tiles"])
    if n > self.seq_len or t > self.max_tiles or len(ex["image_slots"]) != t * self.k:
      raise ValueError(f"example of {n} tokens, {t} tiles, {len(ex['image_slots'])} image slots does not fit a "
                       f"row of data.seq_len={self.seq_len}, data.max_tiles={self.max_tiles} with K={self.k} slots "
                       "per tile; build examples with sequence.ExampleBuilder.from_config of the same config")
    return ex


class DropGuard:
  """Between the examples and the packer: shows why records are dropped, and stops a pipeline
  that would never fill a row. The first `show` drops with a known cause are logged in full (the
  source's file and line or row); `limit` dropped records in a row raise an error naming the
  reasons and their counts, where the packer would wait for a usable example forever."""

  def __init__(self, limit: int = 1000, show: int = 5):
    self.limit, self.show = limit, show
    self.run, self.shown = 0, 0
    self.counts = collections.Counter()
    self.notes = []

  def __call__(self, ex: dict) -> dict:
    note = ex.get("drop_note")
    if note is not None:
      ex = {key: value for key, value in ex.items() if key != "drop_note"}
    code = int(ex.get("drop_reason", 0))
    if not code:
      self.run = 0
      return ex
    self.run += 1
    reason = sequence.DROP_REASONS[code - 1]
    self.counts[reason] += 1
    if self.shown < self.show:  # a decode failure says where; an overlong example only why
      self.shown += 1
      if note:
        self.notes.append(note)
      logging.warning("data: dropped a record (%s)%s", reason, f": {note}" if note else "")
    if self.run >= self.limit:
      top = ", ".join(f"{r} {n}" for r, n in self.counts.most_common())
      hint = ("every example is longer than a row: raise data.seq_len / data.max_tiles or lower the AnyRes "
              "settings" if set(self.counts) <= {"too_many_tokens", "too_many_tiles"} else
              "check the sources' files (e.g. `python -m data_pipelines.inspect`)")
      raise RuntimeError(f"data: the last {self.run} records were all dropped, no usable example to train on "
                         f"(drops so far by reason: {top}); {hint}" +
                         (f". First dropped: {'; '.join(self.notes[:3])}" if self.notes else ""))
    return ex


class RowFromPacked:
  """Callable for grain `map`: one packed row of FirstFitPackIterDataset -> a batch row."""

  def __init__(self, seq_len: int, max_tiles: int, image_size: int, tokens_per_tile: int,
               pad_id: int = tokenizer_lib.PAD_ID):
    self.seq_len, self.max_tiles, self.image_size, self.k = seq_len, max_tiles, image_size, tokens_per_tile
    self.pad_id = pad_id

  def __call__(self, p: dict) -> dict:
    raw, pos = p["tokens_segment_ids"], p["tokens_positions"]  # [L]
    used = raw > 0
    # Renumber 1..m in row order (skipped examples took packer ids but no tokens).
    renumber = np.zeros(int(raw.max()) + 1, np.int32)
    present = np.unique(raw[used])
    renumber[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    segment_ids = renumber[raw]
    tokens = np.where(used, p["tokens"], self.pad_id).astype(np.int32)
    same = used[1:] & (raw[1:] == raw[:-1])  # token i+1 continues token i's example
    targets = np.full(self.seq_len, self.pad_id, np.int32)
    targets[:-1] = np.where(same, tokens[1:], self.pad_id)
    loss_mask = np.zeros(self.seq_len, np.float32)
    loss_mask[:-1] = np.where(same, p["loss_on"][1:], 0.0)

    # Row offset of each segment: its first token's index, i - positions[i] on any of its tokens.
    start = np.zeros(len(renumber), np.int32)
    start[raw[used]] = (np.arange(self.seq_len) - pos)[used]
    slot_seg = p["image_slots_segment_ids"]
    image_token_positions = np.where(slot_seg > 0, p["image_slots"] + start[slot_seg], -1).astype(np.int32)

    s = self.image_size
    images = np.zeros((self.max_tiles, s, s, 3), np.uint8)
    tiles_used = p["tiles_segment_ids"] > 0  # a prefix: tiles pack contiguously
    images[tiles_used] = p["tiles"][tiles_used]
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids,
                positions=np.where(used, pos, 0).astype(np.int32), images=images,
                image_token_positions=image_token_positions,
                num_skipped=np.int32(np.sum(np.asarray(p["skipped"]) == sequence.MALFORMED)),
                num_overlong=np.int32(np.sum(np.asarray(p["skipped"]) == sequence.TOO_LONG)),
                num_dropped=dropped_by_reason(p["drop_reason"]))


def dropped_by_reason(codes) -> np.ndarray:
  """int32 [len(DROP_REASONS)]: how many of the codes (Example drop_reason, 0 = none) name each reason."""
  n = len(sequence.DROP_REASONS)
  return np.bincount(np.asarray(codes, np.int64).reshape(-1), minlength=n + 1)[1:n + 1].astype(np.int32)


def _with_drop_reason(ex: dict) -> dict:
  """Examples made without drop_reason (by hand, older builders) get it from skipped."""
  if "drop_reason" in ex:
    return ex
  return dict(ex, drop_reason=np.int32(ex["skipped"]))  # MALFORMED -> malformed, TOO_LONG -> too_many_tokens


def pack(ds: grain.IterDataset, *, seq_len: int, max_tiles: int, image_size: int, tokens_per_tile: int,
         num_bins: int = DEFAULT_BINS, seed: int = 0, shuffle_bins: bool = True) -> grain.IterDataset:
  """IterDataset of Examples (None allowed, dropped uncounted: mixture.ToExample gives counted
  placeholders instead) -> IterDataset of batch rows (unbatched).

  num_bins: rows packed at once; more bins, less padding, more host memory
  (num_bins * max_tiles * S * S * 3 bytes of tiles).
  """
  ds = ds.filter(lambda ex: ex is not None)
  ds = ds.map(_CheckFits(seq_len, max_tiles, tokens_per_tile)).map(_with_drop_reason).map(DropGuard())
  k = tokens_per_tile
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=dict(tokens=seq_len, loss_on=seq_len, image_slots=max_tiles * k, tiles=max_tiles),
      num_packing_bins=num_bins, seed=seed, shuffle_bins=shuffle_bins, meta_features=("skipped", "drop_reason"))
  return ds.map(RowFromPacked(seq_len, max_tiles, image_size, tokens_per_tile))


def pack_examples(ds: grain.IterDataset, config) -> grain.IterDataset:
  """`pack` with the config's sizes; bins from data.pack_bins, seed from config.seed."""
  return pack(ds, seq_len=config.data.seq_len, max_tiles=config.data.max_tiles,
              image_size=config.model.vit.image_size, tokens_per_tile=config.model.connector.tokens_per_tile,
              num_bins=config.data.pack_bins, seed=config.seed)
