"""data_pipelines/packing.py: examples -> packed batch rows (mm15_jax/batch.py schema).

The inputs are synthetic examples whose token values name them (example i's tokens are
i*1000 + 1, 2, ...) and whose tile pixels name (example, tile), so every row can be taken
apart again with plain NumPy loops and compared with what went in.
"""

import grain
import numpy as np
import pytest

from data_pipelines import packing, sequence
from data_pipelines import tokenizer as tokenizer_lib
from mm15_jax import batch as batch_lib
from mm15_jax import configs

L, T, S, K = 32, 4, 4, 2  # seq_len, max_tiles, tile side, tokens per tile
IMAGE_ID = 7  # a token value no synthetic text token takes (text is i*1000 + 1..)


def synthetic(i, rng):
  """Example i: n tokens, t tiles whose slots are random token positions, random loss."""
  n = int(rng.integers(2, L + 1))
  t = int(rng.integers(0, min(T, (n - 1) // K) + 1))
  tokens = (i * 1000 + 1 + np.arange(n)).astype(np.int32)
  slots = np.sort(rng.choice(np.arange(1, n), t * K, replace=False)).astype(np.int32)
  tokens[slots] = IMAGE_ID
  loss_on = rng.integers(0, 2, n).astype(np.float32)
  loss_on[0] = 0
  tiles = np.zeros((t, S, S, 3), np.uint8)
  for j in range(t):
    tiles[j, ..., 0], tiles[j, ..., 1] = i % 256, j  # the pixel names its example and tile
    tiles[j, ..., 2] = rng.integers(0, 256, (S, S))
  return dict(tokens=tokens, loss_on=loss_on, image_slots=slots, tiles=tiles, kind_id=np.int32(0),
              skipped=np.int32(0))


def skipped(reason=sequence.MALFORMED):
  return dict(tokens=np.zeros(0, np.int32), loss_on=np.zeros(0, np.float32), image_slots=np.zeros(0, np.int32),
              tiles=np.zeros((0, S, S, 3), np.uint8), kind_id=np.int32(-1), skipped=np.int32(reason))


def stream(n=120, seed=0):
  """Examples, a skipped one every 7th (the first too) and an overlong one every 11th (the
  placeholder mixture.ToExample makes of the builder's None)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    out.append(skipped(sequence.TOO_LONG) if i % 11 == 5 else skipped() if i % 7 == 0 else synthetic(i, rng))
  return out


def packed(examples, **kw):
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  return packing.pack(ds, seq_len=L, max_tiles=T, image_size=S, tokens_per_tile=K, **kw)


def unnormalize(images):
  """Rows carry uint8 pixels (the model normalises them on device)."""
  assert images.dtype == np.uint8
  return images.astype(np.int64)


def split_row(row):
  """The examples of a row, by segment, rebuilt with loops over positions."""
  seg, pos = row["segment_ids"], row["positions"]
  out = []
  for s in range(1, seg.max() + 1):
    idx = [p for p in range(L) if seg[p] == s]
    start = idx[0]
    assert idx == list(range(start, start + len(idx))), "a segment is contiguous"
    assert list(pos[idx]) == list(range(len(idx)))
    tokens = row["tokens"][idx]
    loss_on = np.zeros(len(idx), np.float32)
    for k in range(1, len(idx)):
      loss_on[k] = row["loss_mask"][start + k - 1]  # loss_mask is target-aligned
      assert row["targets"][start + k - 1] == tokens[k]
    assert row["targets"][idx[-1]] == tokenizer_lib.PAD_ID  # nothing follows a segment's last token
    assert row["loss_mask"][idx[-1]] == 0
    out.append(dict(start=start, tokens=tokens, loss_on=loss_on, slots=[], tiles=[]))
  # Tiles and slots: tile t's K slots sit inside the segment whose pixels name the tile.
  itp = row["image_token_positions"]
  pixels = unnormalize(row["images"])
  for t in range(T):
    slots = itp[t * K:(t + 1) * K]
    if slots[0] == -1:
      assert (slots == -1).all() and (row["images"][t] == 0).all()
      continue
    ex = out[seg[slots[0]] - 1]
    assert (seg[slots] == seg[slots[0]]).all() and (row["tokens"][slots] == IMAGE_ID).all()
    assert (pixels[t, ..., 0] == ex["tokens"][0] // 1000 % 256).all()  # the tile's own example
    ex["slots"] += [int(p) - ex["start"] for p in slots]
    ex["tiles"].append(pixels[t])
  return out


def test_rows_follow_the_schema_and_hold_every_example_once():
  examples = stream()
  rows = list(packed(examples, num_bins=4))
  expected_shapes = batch_lib.shapes(1, L, T, S, K)
  seen, skipped_count, overlong_count = {}, 0, 0
  for row in rows:
    batch_lib.check({k: v[None] for k, v in row.items()}, expected_shapes)
    assert row["num_skipped"].dtype == np.int32 and row["num_skipped"].shape == ()
    skipped_count += int(row["num_skipped"])
    overlong_count += int(row["num_overlong"])
    seg = row["segment_ids"]
    n_used = int((seg > 0).sum())
    assert (seg[:n_used] > 0).all() and (seg[n_used:] == 0).all(), "padding only at the end"
    assert (np.diff(seg[:n_used]) >= 0).all() and set(seg[:n_used]) == set(range(1, seg.max() + 1))
    assert (row["tokens"][n_used:] == tokenizer_lib.PAD_ID).all() and (row["loss_mask"][n_used:] == 0).all()
    assert (row["targets"][max(n_used - 1, 0):] == tokenizer_lib.PAD_ID).all()
    for ex in split_row(row):
      i = int(ex["tokens"][0]) // 1000  # never an image slot
      assert i not in seen, f"example {i} packed twice"
      seen[i] = ex
  assert skipped_count == sum(1 for e in examples if e["skipped"] == sequence.MALFORMED)
  assert overlong_count == sum(1 for e in examples if e["skipped"] == sequence.TOO_LONG) > 0
  want = {int(e["tokens"][0]) // 1000: e for e in examples if not e["skipped"]}
  assert sorted(seen) == sorted(want)
  for i, e in want.items():
    got = seen[i]
    np.testing.assert_array_equal(got["tokens"], e["tokens"])
    np.testing.assert_array_equal(got["loss_on"], e["loss_on"])
    np.testing.assert_array_equal(got["slots"], e["image_slots"])
    np.testing.assert_array_equal(np.array(got["tiles"]).reshape(-1, S, S, 3), e["tiles"])
    assert len(got["tokens"]) <= L and len(got["tiles"]) <= T
  assert len(rows) < len(want), "packing put several examples in a row"


def test_attention_from_segment_ids_never_crosses_examples():
  for row in packed(stream(60, seed=1), num_bins=3):
    seg, tokens = row["segment_ids"], row["tokens"]
    # The model's mask: causal, same segment, no padding.
    mask = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0) & np.tri(L, dtype=bool)
    # Which example each position came from, read from the token values (image tokens
    # carry no name: take their segment's first token's).
    owner = np.full(L, -1)
    for p in range(L):
      if seg[p]:
        first = p - row["positions"][p]
        owner[p] = tokens[first] // 1000
    for q in range(L):
      for k in range(L):
        if mask[q, k]:
          assert owner[q] == owner[k] != -1


def test_state_restores_bitwise():
  examples = stream(80, seed=2)
  reference = list(packed(examples, num_bins=3, seed=5))
  for cut in (0, 1, 2, 4, 7):
    it = iter(packed(examples, num_bins=3, seed=5))
    for _ in range(cut):
      next(it)
    state = it.get_state()
    resumed = iter(packed(examples, num_bins=3, seed=5))
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - cut
    for a, b in zip(rest, reference[cut:]):
      assert a.keys() == b.keys()
      for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (cut, k)


def test_too_long_example_is_a_clear_error():
  ex = synthetic(1, np.random.default_rng(0))
  ex["tokens"] = np.zeros(L + 1, np.int32)
  with pytest.raises(ValueError, match="data.seq_len"):
    list(packed([ex]))


def test_built_examples_pack_end_to_end(tmp_path):
  tok = tokenizer_lib.load_tokenizer(512, cache_dir=str(tmp_path))
  c = configs.base()
  c.model.connector.tokens_per_tile = K
  c.model.vit.image_size = 8
  c.data.seq_len, c.data.max_tiles = 96, 6
  c.data.anyres = dict(enabled=True, n_min=2, n_max=4, split_max_images=2, indicators="index")
  build = sequence.ExampleBuilder.from_config(c, tok)
  rng = np.random.default_rng(0)
  image = lambda h, w: rng.integers(0, 256, (h, w, 3), np.uint8)  # noqa: E731
  records = [
      dict(kind="caption", messages=[dict(role="text", content="<image> a red circle")], images=[image(8, 8)],
           category="", coords="none"),
      dict(kind="conversation", messages=[dict(role="user", content="<image> Where?"),
                                          dict(role="assistant", content="[0, 0, 500, 500]")],
           images=[image(16, 8)], category="", coords="image"),
      dict(skipped=1, reason="CorruptImage: images[0]"),  # a corrupt record (grain's map never sees None)
      dict(kind="text", messages=[dict(role="text", content="Squares have four sides.")], images=[], category="",
           coords="none"),
  ] * 3
  ds = grain.MapDataset.source(records).to_iter_dataset().map(build)
  rows = list(packing.pack_examples(ds, c))
  shapes = batch_lib.shapes_for_config(c, batch_size=1)
  n_segments = n_tiles = 0
  for row in rows:
    batch_lib.check({k: v[None] for k, v in row.items() if k not in packing.COUNT_FIELDS}, shapes)
    itp = row["image_token_positions"]
    used = itp[itp >= 0]
    np.testing.assert_array_equal(np.sort(used), np.flatnonzero(row["tokens"] == tok.image_id))
    n_segments += row["segment_ids"].max()
    n_tiles += len(used) // K
  # 8x8 with n_min=2: a 1x2 grid + overview; 16x8: 2x1 + overview.
  assert n_segments == 9 and n_tiles == 3 * (3 + 3)
  assert sum(int(r["num_skipped"]) for r in rows) == 3
