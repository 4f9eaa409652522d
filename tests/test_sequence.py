"""data_pipelines/sequence.py: records -> examples (template, loss, image blocks, overlong).

References are hand-written: the expected decoded text of each template, and the expected
ids/loss built span by span from the template in the module docstring.
"""

import re

import numpy as np
import pytest

from data_pipelines import anyres, records, sequence
from data_pipelines import tokenizer as tokenizer_lib
from mm15_jax import configs

K = 2  # tokens per tile
S = 8  # tile side
IMG = "<image>"
SPLIT = dict(enabled=True, n_min=2, n_max=4, split_max_images=2)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer_lib.load_tokenizer(512, cache_dir=str(tmp_path_factory.mktemp("tok")))


def builder(tok, **kw):
  args = dict(seq_len=512, tile=S, tokens_per_tile=K, anyres=dict(enabled=False), indicators="none",
              overlong="drop", max_tiles=16)
  args.update(kw)
  return sequence.ExampleBuilder(tok, **args)


def image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def chat(*turns, images=(), kind="conversation", coords="none"):
  roles = ["user", "assistant"] * len(turns)
  return dict(kind=kind, messages=[dict(role=r, content=c) for r, c in zip(roles, turns)], images=list(images),
              category="", coords=coords)


def doc(*texts, images=(), kind="interleaved"):
  return dict(kind=kind, messages=[dict(role="text", content=t) for t in texts], images=list(images),
              category="", coords="none")


def expected(tok, spans):
  """(ids, loss) from hand-listed spans: (text or id list, loss flag)."""
  ids, loss = [], []
  for span, on in spans:
    new = tok.encode(span) if isinstance(span, str) else list(span)
    ids += new
    loss += [float(on)] * len(new)
  return np.array(ids, np.int32), np.array(loss, np.float32)


def check_example(tok, ex, spans, text):
  ids, loss = expected(tok, spans)
  np.testing.assert_array_equal(ex["tokens"], ids)
  np.testing.assert_array_equal(ex["loss_on"], loss)
  assert tok.decode(ex["tokens"]) == text
  assert ex["tokens"].dtype == np.int32 and ex["loss_on"].dtype == np.float32
  assert ex["loss_on"][0] == 0 and ex["tokens"][0] == tok.bos_id
  # Slots: exactly the <image> tokens, tile-major, K per tile.
  assert ex["image_slots"].dtype == np.int32 and ex["tiles"].dtype == np.uint8
  assert len(ex["image_slots"]) == len(ex["tiles"]) * K
  np.testing.assert_array_equal(ex["image_slots"], np.flatnonzero(ex["tokens"] == tok.image_id))
  assert not ex["loss_on"][ex["image_slots"]].any()
  assert ex["skipped"] == 0


def test_single_turn_conversation(tok):
  ex = builder(tok)(chat("<image> What color is the circle?", "red", images=[image(12, 20)]))
  img = [tok.image_id] * K
  check_example(tok, ex, [([tok.bos_id], 0), ("User:", 0), (img, 0), ("What color is the circle?", 0),
                          ("Assistant:", 0), ("red", 1), ([tok.eos_id], 1)],
                "User:<image><image> What color is the circle? Assistant: red")
  assert ex["tiles"].shape == (1, S, S, 3) and ex["kind_id"] == records.KINDS.index("conversation")
  np.testing.assert_array_equal(ex["tiles"], anyres.render_tiles(image(12, 20), anyres.plan(12, 20, tile=S, n_min=1,
                                                                                             n_max=1, split=False)))


def test_multi_turn_split_image_index_indicators(tok):
  # A 16x8 image on 8 px tiles is exactly 2 rows x 1 col at full resolution.
  im = image(16, 8)
  layout, = anyres.plan_images([(16, 8)], tile=S, anyres=SPLIT)
  assert layout.grid == (2, 1) and layout.num_tiles == 3
  ex = builder(tok, anyres=SPLIT, indicators="index")(chat("<image> Which shape?", "a circle", "And the colour?",
                                                           "blue", images=[im]))
  img = [tok.image_id] * K
  check_example(tok, ex, [
      ([tok.bos_id], 0), ("User:", 0),
      ("Image 1 row 1 col 1:", 0), (img, 0), ("Image 1 row 2 col 1:", 0), (img, 0), ("Image 1 overview:", 0),
      (img, 0), ("Which shape?", 0), ("Assistant:", 0), ("a circle", 1), ([tok.eos_id], 1),
      ("User:", 0), ("And the colour?", 0), ("Assistant:", 0), ("blue", 1), ([tok.eos_id], 1)],
      "User: Image 1 row 1 col 1:<image><image> Image 1 row 2 col 1:<image><image> Image 1 overview:<image><image>"
      " Which shape? Assistant: a circle User: And the colour? Assistant: blue")
  np.testing.assert_array_equal(ex["tiles"], anyres.render_tiles(im, layout))
  # Loss exactly on the two answers and their <eos>.
  trained = ex["tokens"][ex["loss_on"] == 1]
  assert tok.decode(trained) == "a circle blue" and list(trained).count(tok.eos_id) == 2


def test_interleaved_seps_indicators(tok):
  # Two images (<= split_max_images) are both split: 16x8 -> 2x1, 8x16 -> 1x2.
  ims = [image(16, 8, 1), image(8, 16, 2)]
  assert [l.grid for l in anyres.plan_images([(16, 8), (8, 16)], tile=S, anyres=SPLIT)] == [(2, 1), (1, 2)]
  ex = builder(tok, anyres=SPLIT, indicators="seps")(doc("A red circle <image> is next to", "<image> a blue square.",
                                                        images=ims))
  img = [tok.image_id] * K
  nl, comma, colon = ([tok._sp.piece_to_id(p)] for p in ("<0x0A>", ",", ":"))
  check_example(tok, ex, [
      ([tok.bos_id], 0), ("A red circle", 1), (img + nl + img + nl + colon + img, 0), ("is next to", 1),
      (img + comma + img + nl + colon + img, 0), ("a blue square.", 1), ([tok.eos_id], 1)],
      "A red circle<image><image>\n<image><image>\n:<image><image> is next to"
      "<image><image>,<image><image>\n:<image><image> a blue square.")
  assert ex["tiles"].shape == (6, S, S, 3)


def test_caption_and_text_kinds(tok):
  b = builder(tok)
  ex = b(doc("<image> a red circle", images=[image(10, 10)], kind="caption"))
  check_example(tok, ex, [([tok.bos_id], 0), ([tok.image_id] * K, 0), ("a red circle", 1), ([tok.eos_id], 1)],
                "<image><image> a red circle")
  ex = b(doc("Circles are round.", "Squares are not.", kind="text"))
  check_example(tok, ex, [([tok.bos_id], 0), ("Circles are round.", 1), ("Squares are not.", 1), ([tok.eos_id], 1)],
                "Circles are round. Squares are not.")
  assert ex["tiles"].shape == (0, S, S, 3) and ex["image_slots"].shape == (0,)
  ex = b(chat("Name a colour.", "red", kind="text"))
  check_example(tok, ex, [([tok.bos_id], 0), ("User:", 0), ("Name a colour.", 0), ("Assistant:", 0), ("red", 1),
                          ([tok.eos_id], 1)], "User: Name a colour. Assistant: red")
  assert ex["kind_id"] == records.KINDS.index("text")


def test_three_images_are_not_split_and_indexed_in_order(tok):
  ims = [image(16, 8, i) for i in range(3)]
  ex = builder(tok, anyres=SPLIT, indicators="index")(
      chat("<image> <image> <image> Which differs?", "the second", images=ims, kind="multi_image"))
  text = tok.decode(ex["tokens"])
  assert re.findall(r"Image \d[^<]*:", text) == ["Image 1:", "Image 2:", "Image 3:"]
  assert ex["tiles"].shape == (3, S, S, 3) and len(ex["image_slots"]) == 3 * K
  np.testing.assert_array_equal(ex["image_slots"], np.flatnonzero(ex["tokens"] == tok.image_id))


def test_index_indicators_order_for_a_grid(tok):
  # 16x24 on 8 px tiles is 2 rows x 3 cols (6 <= n_max=6): row-major, then the overview.
  split = dict(SPLIT, n_min=2, n_max=6)
  ex = builder(tok, anyres=split, indicators="index")(chat("<image> Read it.", "ok", images=[image(16, 24)]))
  names = re.findall(r"Image 1 (row \d col \d|overview):<image><image>", tok.decode(ex["tokens"]))
  assert names == ["row 1 col 1", "row 1 col 2", "row 1 col 3", "row 2 col 1", "row 2 col 2", "row 2 col 3",
                   "overview"]
  assert len(ex["image_slots"]) == 7 * K


def test_coordinates_are_remapped_to_the_canvas(tok):
  # 20 high x 10 wide, unsplit on a 10 px tile: resized to 10x5 top-left, so x halves.
  b = builder(tok, tile=10)
  r = chat("<image> What is at [500, 500]?", "a dot [0, 0, 1000, 1000]", images=[image(20, 10)], coords="image")
  assert tok.decode(b(r)["tokens"]).endswith("What is at [250, 500]? Assistant: a dot [0, 0, 500, 1000]")
  r["coords"] = "none"
  assert tok.decode(b(r)["tokens"]).endswith("What is at [500, 500]? Assistant: a dot [0, 0, 1000, 1000]")


def test_truncate_never_cuts_an_image_block(tok):
  ims = [image(10, 10, 1), image(10, 10, 2)]
  r = doc("one", "<image> two three four", "<image> five", images=ims)
  full = builder(tok)(r)
  blocks = np.flatnonzero(full["tokens"] == tok.image_id)  # 2 images x K
  second = blocks[K]  # first slot of the second image
  # A cut inside the second image's block moves back to its start; its tiles go too.
  ex = builder(tok, seq_len=second + 1, overlong="truncate")(r)
  np.testing.assert_array_equal(ex["tokens"], full["tokens"][:second])
  np.testing.assert_array_equal(ex["loss_on"], full["loss_on"][:second])
  np.testing.assert_array_equal(ex["tiles"], full["tiles"][:1])
  np.testing.assert_array_equal(ex["image_slots"], full["image_slots"][:K])
  # A cut in text keeps every block before it.
  ex = builder(tok, seq_len=len(full["tokens"]) - 1, overlong="truncate")(r)
  np.testing.assert_array_equal(ex["tokens"], full["tokens"][:-1])
  assert len(ex["tiles"]) == 2
  # The tile budget cuts the same way.
  ex = builder(tok, max_tiles=1, overlong="truncate")(r)
  np.testing.assert_array_equal(ex["tokens"], full["tokens"][:second])
  # With indicators, the block starts at its indicator text: a cut inside that moves back too.
  full = builder(tok, indicators="index")(r)
  start = np.flatnonzero(full["tokens"] == tok.image_id)[K] - len(tok.encode("Image 2:"))
  assert tok.decode(full["tokens"][start:]).startswith("Image 2:")
  ex = builder(tok, indicators="index", seq_len=start + 2, overlong="truncate")(r)
  np.testing.assert_array_equal(ex["tokens"], full["tokens"][:start])
  assert len(ex["tiles"]) == 1
  full = builder(tok)(r)
  # Drop: None whenever anything would be cut.
  assert builder(tok, seq_len=len(full["tokens"]) - 1)(r) is None
  assert builder(tok, max_tiles=1)(r) is None
  assert builder(tok, seq_len=len(full["tokens"]))(r) is not None
  # Nothing left to train on (the answer cut off): dropped even when truncating.
  c = chat("<image> long question here", "answer", images=ims[:1])
  n_prompt = len(builder(tok)(c)["tokens"]) - len(tok.encode("answer")) - 1
  assert builder(tok, seq_len=n_prompt, overlong="truncate")(c) is None


def test_corrupt_and_malformed_records_become_skipped(tok):
  b = builder(tok)
  for r in (None, dict(skipped=1), chat("<image> <image> two markers", "one image", images=[image(8, 8)]),
            chat("no marker", "but an image", images=[image(8, 8)]),
            dict(kind="text", messages=[dict(role="text", content="a"), dict(role="user", content="b")], images=[])):
    ex = b(r)
    assert ex["skipped"] == 1, r
    assert ex["tokens"].shape == (0,) and ex["tokens"].dtype == np.int32
    assert ex["loss_on"].dtype == np.float32 and ex["image_slots"].shape == (0,)
    assert ex["tiles"].shape == (0, S, S, 3) and ex["tiles"].dtype == np.uint8


def test_from_config_and_bad_choices(tok):
  c = configs.base()
  c.model.connector.tokens_per_tile = K
  b = sequence.ExampleBuilder.from_config(c, tok)
  assert (b.seq_len, b.tile, b.k, b.max_tiles) == (c.data.seq_len, c.model.vit.image_size, K, c.data.max_tiles)
  assert (b.indicators, b.overlong) == (c.data.anyres.indicators, c.data.overlong) == ("index", "drop")
  c.data.anyres = dict(enabled=True, n_min=2, n_max=4, split_max_images=2, indicators="seps")
  c.data.overlong = "truncate"
  b = sequence.ExampleBuilder.from_config(c, tok)
  assert (b.indicators, b.overlong) == ("seps", "truncate")
  with pytest.raises(ValueError, match="indicators"):
    builder(tok, indicators="tiles")
  with pytest.raises(ValueError, match="overlong"):
    builder(tok, overlong="cut")
