"""The tile budget per packed row (data.max_tiles) and the records dropped, counted by reason.

The paper budgets are checked on the largest samples the splitting rule makes, built by the
real sequence builder at the paper sizes (672 px tiles, 144 tokens per tile, 4096-token
rows, "index" indicators). The tokenizer is the built-in one (512 pieces): the paper
configs' 32768-piece tokenizer is a file the runs bring, so the indicator and chat text
token counts here are this tokenizer's, not that one's.
"""

import json

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_setup import tiny_config

from data_pipelines import mixture, packing, records, sequence, sources
from data_pipelines import tokenizer as tokenizer_lib
from mm15_jax import configs
from mm15_jax.train.config_checks import check_config, tile_budget_errors
from mm15_jax.train.prefetch import DevicePrefetcher


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer_lib.load_tokenizer(512, cache_dir=str(tmp_path_factory.mktemp("tok")))


def multi_image(images, question="How many?", answer="2"):
  markers = "".join(records.IMAGE_MARKER for _ in images)
  return dict(kind="multi_image", images=list(images),
              messages=[dict(role="user", content=f"{markers} {question}"), dict(role="assistant", content=answer)])


def layout_length(tok, grids, question, answer):
  """Tokens of a one-turn conversation whose images have these (rows, cols) grids (None:
  unsplit), counted from the layout sequence.py documents, span by span."""
  n = 1 + len(tok.encode_span(sequence.USER))  # <bos> User:
  for k, grid in enumerate(grids, 1):
    if grid is None:
      spans = [f"Image {k}:"]
    else:
      rows, cols = grid
      spans = [f"Image {k} row {i} col {j}:" for i in range(1, rows + 1) for j in range(1, cols + 1)]
      spans.append(f"Image {k} overview:")
    n += sum(len(tok.encode_span(s)) + 144 for s in spans)
  n += len(tok.encode_span(f" {question}")) + len(tok.encode_span(sequence.ASSISTANT))
  return n + len(tok.encode_span(answer)) + 1  # <eos>


@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_paper_budget_holds_two_images_split_into_n_max(tok, stage):
  c = configs.mm15("1b", stage)
  a = c.data.anyres
  assert c.model.connector.tokens_per_tile == 144 and c.data.seq_len == 4096
  # A square of 3 x 3 tiles at full resolution: no grid of fewer than 9 tiles holds it unscaled,
  # so AnyRes picks n_max = 9 sub-images.
  assert a.n_max == 9
  side = 3 * c.model.vit.image_size
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (side, side, 3), np.uint8) for _ in range(a.split_max_images)]
  question, answer = "Which page says more?", "The first one."
  ex = sequence.ExampleBuilder.from_config(c, tok).build(multi_image(images, question, answer))
  largest = a.split_max_images * (a.n_max + 1)  # 2 x (9 + overview)
  assert ex["drop_reason"] == 0 and len(ex["tiles"]) == largest == 20
  assert largest <= c.data.max_tiles and len(ex["image_slots"]) == largest * 144
  n = len(ex["tokens"])
  assert n == layout_length(tok, [(3, 3)] * 2, question, answer) <= c.data.seq_len
  # The sub-images are the image's own pixels, tile by tile (no resize at full resolution).
  np.testing.assert_array_equal(ex["tiles"][4], images[0][672:1344, 672:1344])


@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_paper_budget_is_the_most_unsplit_images_a_row_holds(tok, stage):
  """3 or more images are one tile each: max_tiles of them fit the row's tokens with a short
  question, one more does not fit the tokens whatever the tile budget."""
  c = configs.mm15("1b", stage)
  t = c.data.max_tiles
  small = np.zeros((40, 64, 3), np.uint8)
  ex = sequence.ExampleBuilder.from_config(c, tok).build(multi_image([small] * t))
  assert ex["drop_reason"] == 0 and len(ex["tiles"]) == t
  assert len(ex["tokens"]) == layout_length(tok, [None] * t, "How many?", "2") <= c.data.seq_len
  c.data.max_tiles = t + 1
  over = sequence.ExampleBuilder.from_config(c, tok).build(multi_image([small] * (t + 1)))
  assert over["drop_reason"] == sequence.TOO_MANY_TOKENS
  assert layout_length(tok, [None] * (t + 1), "How many?", "2") > c.data.seq_len


def test_pretraining_budget_is_mm1s_16_images(tok):
  c = configs.mm15("1b", "pretrain")
  assert not c.data.anyres.enabled and c.data.max_tiles == 16 and c.model.vit.image_size == 378
  im = np.zeros((300, 500, 3), np.uint8)
  builder = sequence.ExampleBuilder.from_config(c, tok)
  ex = builder.build(multi_image([im] * 16))
  assert ex["drop_reason"] == 0 and len(ex["tiles"]) == 16
  assert len(ex["tokens"]) == layout_length(tok, [None] * 16, "How many?", "2") <= c.data.seq_len
  assert builder.build(multi_image([im] * 17))["drop_reason"] == sequence.TOO_MANY_TILES


# --- config checks ---------------------------------------------------------------------------


def errors_of(c):
  with pytest.raises(ValueError) as e:
    check_config(c, paths=False)
  return str(e.value)


def test_a_budget_below_the_largest_split_sample_names_the_fields_and_the_fix():
  c = configs.mm15("1b", "sft")
  c.data.max_tiles = 10  # the budget before: one split image
  need = c.data.anyres.split_max_images * (c.data.anyres.n_max + 1)
  msg = errors_of(c)
  for part in ("data.max_tiles=10", "data.anyres.split_max_images=2", "data.anyres.n_max=9", f"{need} tiles",
               f"--config.data.max_tiles={need}"):
    assert part in msg, (part, msg)
  c.data.max_tiles = need
  check_config(c, paths=False)
  c.data.anyres.enabled = False  # nothing is split: any budget that fits the row
  c.data.max_tiles = 4
  check_config(c, paths=False)


def test_tiles_that_overflow_the_row_are_an_error():
  c = configs.mm15("1b", "sft")
  c.data.max_tiles = 29  # 29 x 144 = 4176 > 4096
  msg = errors_of(c)
  for part in ("data.max_tiles=29", "model.connector.tokens_per_tile=144", "= 4176", "data.seq_len=4096",
               f"--config.data.max_tiles={4096 // 144}"):
    assert part in msg, (part, msg)
  # A split sample that only a longer row holds: the fix says so.
  c.data.max_tiles, c.data.anyres.n_max = 28, 14
  assert "data.seq_len >= 4320" in errors_of(c)  # 2 x 15 tiles x 144


@pytest.mark.parametrize("field,value,message", [
    ("max_tiles", 0, "data.max_tiles=0: must be an integer >= 1"),
    ("anyres.n_min", 0, "data.anyres.n_min=0, data.anyres.n_max=4: need 1 <= n_min <= n_max"),
    ("anyres.n_min", 5, "data.anyres.n_min=5, data.anyres.n_max=4: need 1 <= n_min <= n_max"),
    ("anyres.split_max_images", -1, "data.anyres.split_max_images=-1: must be >= 0"),
])
def test_bad_budget_fields_are_clear_errors(field, value, message):
  c = tiny_config()
  if field.startswith("anyres."):
    c.data.anyres[field.split(".")[1]] = value
  else:
    c.data[field] = value
  assert message in errors_of(c)


def test_split_max_images_zero_never_splits_so_needs_no_split_budget():
  c = tiny_config()
  c.data.anyres.split_max_images, c.data.max_tiles = 0, 1
  assert tile_budget_errors(c) == []


# --- drops by reason -------------------------------------------------------------------------


def png(h=16, w=12, value=90):
  return records.encode_image(np.full((h, w, 3), value, np.uint8))


def url_rows(tmp_path, n):
  """n OBELICS-style Parquet rows whose image is a URL, read by the real source."""
  path = tmp_path / "url.parquet"
  table = pa.table({"texts": [[None, "x"]] * n, "images": [["https://example.com/a.jpg", None]] * n},
                   schema=pa.schema([("texts", pa.list_(pa.string())), ("images", pa.list_(pa.string()))]))
  pq.write_table(table, path)
  source = sources.ParquetSource(str(path))
  return [source[i] for i in range(n)]


def hand_made(tmp_path):
  """Serialised items with known numbers of each drop reason (tiny config: 256 tokens, 16 tiles)."""
  good = records.encode(dict(kind="conversation", images=[png()], messages=[
      dict(role="user", content="<image> What color?"), dict(role="assistant", content="gray")]))
  long_text = records.encode(dict(kind="text", messages=[dict(role="text", content=" ".join(["circle"] * 600))]))
  many_images = records.encode(dict(kind="multi_image", images=[png()] * 17, messages=[
      dict(role="user", content="<image>" * 17 + " How many?"), dict(role="assistant", content="17")]))
  corrupt = records.encode(dict(kind="caption", images=[b"\x89PNG\r\n\x1a\nnot a png"],
                                messages=[dict(role="text", content="<image> a cat")]))
  want = dict(malformed=3, too_many_tokens=2, too_many_tiles=4, corrupt_image=2, url_image=1)
  items = ([b"not msgpack", records.encode_error("jsonl line 3: bad JSON"),
            records.encode_error("x", corrupt_image=False)] + [long_text] * 2 + [many_images] * 4
           + [corrupt, records.encode_error("images[0]: cannot read 'a.png'", corrupt_image=True)]
           + url_rows(tmp_path, 1) + [good] * 7)
  order = np.random.default_rng(0).permutation(len(items))
  return [items[i] for i in order], want, 7


def packed_rows(c, tok, items, batch):
  ds = grain.MapDataset.source(items).map(mixture.ToExample(sequence.ExampleBuilder.from_config(c, tok)))
  return packing.pack_examples(ds.to_iter_dataset(), c).batch(batch, drop_remainder=False)


def test_drops_are_counted_by_reason(tok, tmp_path):
  c = tiny_config()
  # Tiles alone fit a row (16 x 4 tokens), and 17 images' tokens would too: only the budget drops them.
  assert c.data.max_tiles == 16 and 17 * (c.model.connector.tokens_per_tile + 6) < c.data.seq_len
  items, want, good = hand_made(tmp_path)
  rows = list(packed_rows(c, tok, items, batch=1))
  total = sum(r["num_dropped"] for r in rows)[0]
  assert dict(zip(sequence.DROP_REASONS, total.tolist())) == want
  assert sum(int(r["num_skipped"].sum()) for r in rows) == want["malformed"] + want["corrupt_image"] + want["url_image"]
  assert sum(int(r["num_overlong"].sum()) for r in rows) == want["too_many_tokens"] + want["too_many_tiles"]
  assert sum(int(r["segment_ids"].max()) for r in rows) == good


def test_prefetcher_totals_by_reason_survive_a_resume(tok, tmp_path):
  c = tiny_config()
  items, want, _ = hand_made(tmp_path)
  items = items * 4  # several rows, so the state is taken mid-way
  want = {k: 4 * v for k, v in want.items()}
  rows = list(packed_rows(c, tok, items, batch=1))
  assert len(rows) >= 4

  class Replay:  # the host iterator: a position in the rows
    def __init__(self):
      self.i = 0

    def get_state(self):
      return {"i": self.i}

    def set_state(self, state):
      self.i = state["i"]

    def __next__(self):
      self.i += 1
      return rows[(self.i - 1) % len(rows)]  # the prefetcher reads ahead of the last row

  def count(it, n):
    for _ in range(n):
      batch = next(it)
      assert not set(packing.COUNT_FIELDS) & set(batch)  # counts never reach the model
    return it

  unbroken = count(DevicePrefetcher(Replay(), lambda b: b, depth=2), len(rows) - 1)
  assert unbroken.dropped_metrics() == {f"dropped/{k}": sum(int(r["num_dropped"][:, i].sum()) for r in rows[:-1])
                                        for i, k in enumerate(sequence.DROP_REASONS)}
  first = count(DevicePrefetcher(Replay(), lambda b: b, depth=2), 2)
  state = first.get_state()
  resumed = DevicePrefetcher(Replay(), lambda b: b, depth=2)
  resumed.set_state(state)
  count(resumed, len(rows) - 1 - 2)
  assert resumed.dropped_metrics() == unbroken.dropped_metrics()
  assert (resumed.skipped_records, resumed.overlong_records) == (unbroken.skipped_records, unbroken.overlong_records)
  # All rows: the hand-made numbers, and the old totals are their sums.
  count(unbroken, 1)
  assert unbroken.dropped == want
  assert unbroken.skipped_records == want["malformed"] + want["corrupt_image"] + want["url_image"]
  assert unbroken.overlong_records == want["too_many_tokens"] + want["too_many_tiles"]
  # A state saved before the counts were part of it (the bare iterator state) still restores.
  old = DevicePrefetcher(Replay(), lambda b: b, depth=2)
  old.set_state(json.dumps({"i": 2}).encode())
  assert next(old) is not None and old.skipped_records == int(rows[2]["num_skipped"].sum())


def test_overlong_reason_is_tiles_first_in_drop_and_truncate(tok):
  """Over both budgets: too_many_tiles; over the tokens only: too_many_tokens; a truncation
  that keeps nothing to train on is dropped for the same reason."""
  c = tiny_config()
  im = np.zeros((10, 10, 3), np.uint8)
  many = multi_image([im] * 17, question=" ".join(["circle"] * 300))  # 17 tiles > 16 and > 256 tokens
  long = multi_image([im] * 3, question=" ".join(["circle"] * 300))
  for overlong in ("drop", "truncate"):
    c.data.overlong = overlong
    builder = sequence.ExampleBuilder.from_config(c, tok)
    assert builder.build(many)["drop_reason"] == sequence.TOO_MANY_TILES
    assert builder(many) is None  # the builder's call keeps None for overlong records
    # The question is user text (no loss): truncation keeps nothing to train on either.
    assert builder.build(long)["drop_reason"] == sequence.TOO_MANY_TOKENS
  assert int(builder.build(long)["skipped"]) == sequence.TOO_LONG  # the old total's code


def test_training_log_carries_the_drops_across_a_resume(tmp_path):
  """metrics.jsonl has dropped/<reason> beside the old totals, and a run stopped at its step-2
  checkpoint and resumed logs the same totals as an unbroken run."""
  from mm15_jax.train.loop import train_and_evaluate

  good = {"kind": "conversation", "images": ["ok.png"], "messages": [
      {"role": "user", "content": "<image> What color is the image?"}, {"role": "assistant", "content": "gray"}]}
  long_text = {"kind": "text", "messages": [{"role": "text", "content": " ".join(["circle"] * 600)}]}
  lines = [json.dumps(good)] * 6 + ["{not json", json.dumps({**good, "images": ["missing.png"]}),
                                    json.dumps(long_text)]
  (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
  from PIL import Image
  Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(tmp_path / "ok.png")

  def run(workdir, steps):
    data = str(tmp_path / "data.jsonl")
    c = tiny_config(**{"data.sources": {"mine": dict(kind="jsonl", weight=1.0, path=data, eval_path=data)}})
    c.train.steps, c.checkpoint.every, c.eval.generate_per_task = steps, 2, 0
    train_and_evaluate(c, str(workdir), progress=False)
    with open(workdir / "metrics.jsonl") as f:
      return [r for r in map(json.loads, f) if "kind" not in r]

  unbroken = run(tmp_path / "a", 4)[-1]
  stopped = run(tmp_path / "b", 2)[-1]
  resumed = run(tmp_path / "b", 4)[-1]
  keys = ["skipped_records", "overlong_records"] + [f"dropped/{r}" for r in sequence.DROP_REASONS]
  # Drops before the stop, and more after it: the resumed totals include both.
  assert 0 < sum(stopped[k] for k in keys[2:]) < sum(resumed[k] for k in keys[2:])
  assert resumed["step"] == unbroken["step"] == 4
  assert {k: resumed[k] for k in keys} == {k: unbroken[k] for k in keys}
  assert unbroken["dropped/malformed"] > 0 and unbroken["dropped/corrupt_image"] > 0
  assert unbroken["dropped/too_many_tokens"] > 0 and unbroken["dropped/too_many_tiles"] == 0
  assert unbroken["skipped_records"] == unbroken["dropped/malformed"] + unbroken["dropped/corrupt_image"]
  assert unbroken["overlong_records"] == unbroken["dropped/too_many_tokens"]
