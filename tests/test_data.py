"""data_pipelines: tokenizer, shapes dataset, sequences and grain batches.

References are computed here by hand (pixel masks, the CLIP constants, token layout),
never by calling the code under test a second way.
"""

import re

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

import data_pipelines as dp
from data_pipelines import shapes
from mm15_jax import batch as batch_lib
from mm15_jax import configs

K = 4  # tokens_per_tile of the tiny test config
# open_clip OPENAI_DATASET_MEAN / STD, typed in from open_clip/constants.py.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
NUMBERS = re.compile(r"\[([\d, ]+)\]")


def tiny_config(**data):
  c = configs.base()
  c.model.connector.tokens_per_tile = K
  c.data.update(data)
  return c


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return dp.load_tokenizer(512, cache_dir=str(tmp_path_factory.mktemp("tok")))


def rows(batch):
  return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["tokens"]))]


def row_key(row):
  return row["tokens"].tobytes() + row["images"].tobytes()


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


# --- tokenizer ---------------------------------------------------------------

def test_tokenizer_is_deterministic_and_cached(tmp_path, monkeypatch):
  a, b = tmp_path / "a", tmp_path / "b"
  dp.load_tokenizer(512, cache_dir=str(a))
  dp.load_tokenizer(512, cache_dir=str(b))
  (fa,), (fb,) = list(a.iterdir()), list(b.iterdir())
  assert fa.name == fb.name and fa.name.endswith(".model")
  assert fa.read_bytes() == fb.read_bytes()
  # A second load reads the cache instead of training.
  monkeypatch.setattr("data_pipelines.tokenizer._train", lambda *_: pytest.fail("trained again"))
  assert dp.load_tokenizer(512, cache_dir=str(a)).model_proto == fa.read_bytes()


def test_tokenizer_ids_and_round_trip(tok):
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (512, 0, 2, 3)
  # "<image>" is one piece wherever it appears (the leading "▁" is sentencepiece's word start).
  assert tok.encode("<image>")[-1:] == [tok.image_id] and tok.decode(tok.encode("<image>")[:-1]) == ""
  ids = tok.encode("see <image><image> here")
  assert ids.count(tok.image_id) == 2 and tok.decode(ids) == "see <image><image> here"
  assert tok.decode([tok.image_id]) == "<image>"
  assert tok.image_id not in (0, 1, 2, 3)
  for text in ["What color is the circle?", "Where is the red square?", "[12, 345, 678, 1000]",
               "What shape is at [907, 31]?", "purple triangle 0123456789", "unseen words: zebra, Ωmega!"]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 1 not in ids  # byte fallback: never <unk>
  # Digits are single pieces, so a coordinate's tokens are its digits.
  ids = tok.encode("[907, 31]")
  assert [tok.decode([i]) for i in ids if tok.decode([i]).isdigit()] == list("90731")
  # pad/bos/eos decode to nothing.
  assert tok.decode([tok.bos_id] + tok.encode("red") + [tok.eos_id, tok.pad_id]) == "red"


def test_vocab_mismatch_is_a_clear_error(tok):
  c = tiny_config()
  c.model.llm.vocab_size = 600
  with pytest.raises(ValueError, match="vocab_size=600"):
    dp.make_train_dataset(c, tok)
  with pytest.raises(ValueError, match="vocab_size"):
    dp.load_tokenizer(100_000)


# --- shapes dataset ----------------------------------------------------------

def colour_mask(image, name):
  return np.all(image == np.array(shapes.COLORS[name], np.uint8), axis=-1)


def pixel_box(mask):
  ys, xs = np.nonzero(mask)
  return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1  # pixel edges


def shape_of(mask):
  """Classify by the widths of the top and bottom rows of the shape's box."""
  x1, y1, x2, y2 = pixel_box(mask)
  box = mask[y1:y2, x1:x2]
  assert box.shape[0] == box.shape[1]  # all shapes fit a square box
  top, bottom = box[0].sum(), box[-1].sum()
  if box.all():
    return "square"
  if top == bottom:
    assert top < box.shape[1] and box[box.shape[0] // 2].all()  # round: widest in the middle
    return "circle"
  assert top <= 2 and bottom == box.shape[1]  # apex up
  return "triangle"


def test_answers_read_off_the_pixels():
  size = 32
  src = dp.ShapesSource("train", 400, size)
  kinds = set()
  for i in range(len(src)):
    ex = src[i]
    image, q, a = ex["image"], ex["question"], ex["answer"]
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    present = [n for n in shapes.COLORS if colour_mask(image, n).any()]
    assert 1 <= len(present) <= 3
    # Ground truth objects are what the pixels show.
    assert sorted(o["color"] for o in ex["objects"]) == sorted(present)
    for o in ex["objects"]:
      m = colour_mask(image, o["color"])
      assert shape_of(m) == o["shape"]
      assert tuple(pixel_box(m)) == tuple(o["box"])
      cx, cy = o["center"]
      assert m[cy, cx]
    kinds.add(ex["kind"])
    named_colour = [n for n in shapes.COLORS if re.search(rf"\b{n}\b", q)]
    named_shape = [n for n in shapes.SHAPES if re.search(rf"\b{n}\b", q)]
    if ex["kind"] == "color":
      (obj,) = [o for o in ex["objects"] if o["shape"] == named_shape[0]]
      cx, cy = obj["center"]
      assert tuple(image[cy, cx]) == shapes.COLORS[a]
      assert shape_of(colour_mask(image, a)) == named_shape[0]
    elif ex["kind"] == "shape":
      assert shape_of(colour_mask(image, named_colour[0])) == a
    elif ex["kind"] == "count":
      assert int(a) == len(present)
    elif ex["kind"] == "ground":
      m = colour_mask(image, named_colour[0])
      assert shape_of(m) == named_shape[0]
      assert re.fullmatch(r"\[\d+, \d+, \d+, \d+\]", a)
      box = np.array([int(v) for v in NUMBERS.fullmatch(a).group(1).split(",")])
      assert np.all(np.abs(box * size / 1000 - np.array(pixel_box(m))) <= 0.5 * size / 1000 + 1e-9)
    elif ex["kind"] == "refer":
      (point,) = NUMBERS.findall(q)
      x, y = (int(v) for v in point.split(","))
      px, py = int(x * size / 1000), int(y * size / 1000)
      (colour,) = [n for n in shapes.COLORS if tuple(image[py, px]) == shapes.COLORS[n]]
      assert shape_of(colour_mask(image, colour)) == a
  assert kinds == set(shapes.KINDS)


def test_splits_are_disjoint_and_deterministic():
  train, eval_ = dp.ShapesSource("train", 1024, 32), dp.ShapesSource("eval", 256, 32)
  key = lambda ex: ex["image"].tobytes() + ex["question"].encode()  # noqa: E731
  train_keys = {key(train[i]) for i in range(len(train))}
  eval_keys = {key(eval_[i]) for i in range(len(eval_))}
  assert not train_keys & eval_keys
  assert len(train_keys) > 1000  # examples differ
  again = dp.ShapesSource("eval", 256, 32)
  for i in (0, 7, 255):
    assert key(again[i]) == key(eval_[i]) and again[i]["answer"] == eval_[i]["answer"]


# --- sequences ---------------------------------------------------------------

def test_sequence_layout_by_hand(tok):
  c = tiny_config(max_tiles=2, seq_len=32)
  builder = dp.SequenceBuilder.from_config(c, tok)
  image = np.zeros((32, 32, 3), np.uint8)
  image[:, :, 0] = 255
  image[5, 7] = (10, 20, 30)
  row = builder(dict(image=image, question="What color is the circle?", answer="red"))
  batch_lib.check({k: v[None] for k, v in row.items()}, batch_lib.shapes_for_config(c, batch_size=1))
  user, q, asst, ans = (tok.encode(t) for t in ("User:", "What color is the circle?", "Assistant:", "red"))
  expected = [2] + user + [tok.image_id] * K + q + asst + ans + [3]
  n = len(expected)
  np.testing.assert_array_equal(row["tokens"], expected + [0] * (32 - n))
  np.testing.assert_array_equal(row["targets"], expected[1:] + [0] * (33 - n))
  start = 1 + len(user)
  np.testing.assert_array_equal(row["image_token_positions"], list(range(start, start + K)) + [-1] * K)
  prompt_len = n - len(ans) - 1
  np.testing.assert_array_equal(np.flatnonzero(row["loss_mask"]), np.arange(prompt_len - 1, n - 1))
  np.testing.assert_array_equal(row["segment_ids"], [1] * n + [0] * (32 - n))
  np.testing.assert_array_equal(row["positions"], list(range(n)) + [0] * (32 - n))
  # CLIP normalisation; the unused second tile is zero.
  ref = (np.array([1.0, 0, 0]) - MEAN) / STD
  np.testing.assert_allclose(row["images"][0, 0, 0], ref, rtol=1e-6)
  np.testing.assert_allclose(row["images"][0, 5, 7], (np.array([10, 20, 30]) / 255 - MEAN) / STD, rtol=1e-6)
  assert not row["images"][1].any()


def test_overlong_examples_raise_or_drop(tok):
  ex = dict(image=np.zeros((32, 32, 3), np.uint8), question="Where is the red square?", answer="[1, 2, 300, 400]")
  with pytest.raises(ValueError, match="seq_len"):
    dp.SequenceBuilder.from_config(tiny_config(seq_len=20), tok)(ex)
  assert dp.SequenceBuilder.from_config(tiny_config(seq_len=20), tok, drop_overlong=True)(ex) is None
  c = tiny_config(seq_len=24)  # fits colour/shape/count questions only
  ds = dp.make_train_dataset(c, tok, drop_overlong=True)
  for row in rows(next(iter(ds))):
    check_row(row, tok)
    assert "[" not in tok.decode(row["tokens"])  # no grounding or referring question fits


def check_row(row, tok, answer=None):
  n = int(row["segment_ids"].sum())
  tokens = row["tokens"]
  np.testing.assert_array_equal(row["segment_ids"], [1] * n + [0] * (len(tokens) - n))  # padding only at the end
  np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
  assert tokens[0] == tok.bos_id and tokens[n - 1] == tok.eos_id and not tokens[n:].any()
  np.testing.assert_array_equal(row["targets"][:-1], tokens[1:])
  slots = row["image_token_positions"]
  np.testing.assert_array_equal(slots[:K], np.flatnonzero(tokens == tok.image_id))
  assert (slots[K:] == -1).all()
  mask = row["loss_mask"] == 1
  assert set(np.unique(row["loss_mask"])) <= {0.0, 1.0}
  masked = row["targets"][mask]
  assert masked[-1] == tok.eos_id and np.flatnonzero(mask)[-1] == n - 2
  text = tok.decode(tokens[:n])
  _, said = text.split(" Assistant: ")
  assert tok.decode(masked) == said
  assert tok.decode(tokens[:np.flatnonzero(mask)[0] + 1]).endswith("Assistant:")
  if answer is not None:
    assert said == answer
  return text


def test_rows_follow_the_answers(tok):
  c = tiny_config()
  builder = dp.SequenceBuilder.from_config(c, tok)
  src = dp.ShapesSource("train", 64, 32)
  for i in range(len(src)):
    ex = src[i]
    row = builder(ex)
    text = check_row(row, tok, ex["answer"])
    assert text == "User:" + "<image>" * K + f" {ex['question']} Assistant: {ex['answer']}"
    # The image survives normalisation.
    np.testing.assert_allclose((row["images"][0] * STD + MEAN) * 255, ex["image"], atol=1e-3)


# --- grain batches -----------------------------------------------------------

def test_train_and_eval_batches_follow_the_schema(tok):
  c = tiny_config()
  expected = batch_lib.shapes_for_config(c)
  for batch in take(iter(dp.make_train_dataset(c, tok)), 3):
    batch_lib.check(batch, expected)
    for row in rows(batch):
      check_row(row, tok)
  evals = dp.make_eval_batches(c, tok, 3)
  assert len(evals) == 3
  for batch in evals:
    batch_lib.check(batch, expected)
  assert_batches_equal(evals, dp.make_eval_batches(c, tok, 3))
  with pytest.raises(ValueError, match="eval_examples"):
    dp.make_eval_batches(c, tok, 1000)


def test_each_epoch_is_a_new_permutation(tok):
  c = tiny_config(num_examples=16)
  batches = take(iter(dp.make_train_dataset(c, tok)), 4)  # 2 epochs of 2 batches
  epochs = [[row_key(r) for b in batches[e:e + 2] for r in rows(b)] for e in (0, 2)]
  src = dp.ShapesSource("train", 16, 32)
  builder = dp.SequenceBuilder.from_config(c, tok)
  everything = sorted(row_key(builder(src[i])) for i in range(16))
  assert sorted(epochs[0]) == everything and sorted(epochs[1]) == everything
  assert epochs[0] != epochs[1]


def test_resume_is_bitwise_identical(tok, tmp_path):
  c = tiny_config(num_examples=20)  # crosses an epoch within 5 batches
  it = iter(dp.make_train_dataset(c, tok))
  take(it, 3)
  state = it.get_state()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 2)

  fresh = iter(dp.make_train_dataset(c, tok))
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 2), expected)

  restored = iter(dp.make_train_dataset(c, tok))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_batches_equal(take(restored, 2), expected)


def test_host_shards_split_the_global_batch(tok):
  c = tiny_config()
  single = take(iter(dp.make_train_dataset(c, tok)), 3)
  hosts = [take(iter(dp.make_train_dataset(c, tok, process_index=p, process_count=2)), 3) for p in (0, 1)]
  for step in range(3):
    a, b = ([row_key(r) for r in rows(h[step])] for h in hosts)
    assert len(a) == len(b) == c.train.batch_size // 2
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(row_key(r) for r in rows(single[step]))
  with pytest.raises(ValueError, match="batch_size=8"):
    dp.make_train_dataset(c, tok, process_index=0, process_count=3)
