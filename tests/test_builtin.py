"""data_pipelines.builtin: the generated MM1.5-like mixture.

Every answer is checked against the pixels: objects are found here by a NumPy flood fill
over the shape colours, classified by how much of their box they fill, and boxes/points
are parsed back from the text. Rendered words are found by template matching.
"""

import collections
import hashlib
import pickle
import re

import grain
import numpy as np
import pytest
from rendered_text import glyphs

from data_pipelines import builtin, records

N = 60  # records per source and check
# Typed in from data_pipelines/shapes.py's palette (the generator's, not derived from it).
SHAPE_COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 80, 230), "yellow": (245, 215, 35),
                "purple": (140, 50, 190)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (20, 20, 20), "gray": (128, 128, 128),
               "beige": (235, 225, 200), "slate": (70, 90, 110)}
INKS = {"black": (0, 0, 0), "red": (200, 20, 20), "blue": (30, 60, 200), "white": (250, 250, 250),
        "yellow": (245, 215, 35)}
NUMBERS = re.compile(r"\[([\d, ]+)\]")
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle"}


def make(name, n=N, split="train", **kw):
  src = builtin.SOURCES[name](split, n, **kw)
  return [src[i] for i in range(n)]


def coords(text):
  return [tuple(int(v) for v in m.split(",")) for m in NUMBERS.findall(text)]


def turns(rec):
  msgs = rec["messages"]
  return [(q["content"].split("\n")[-1], a["content"]) for q, a in zip(msgs[::2], msgs[1::2])]


# --- references from pixels -------------------------------------------------------------

def components(mask):
  """4-connected components of a bool mask: list of bool masks (NumPy flood fill)."""
  seen = np.zeros_like(mask)
  out = []
  for r0, c0 in zip(*np.nonzero(mask)):
    if seen[r0, c0]:
      continue
    comp = np.zeros_like(mask)
    stack = [(r0, c0)]
    seen[r0, c0] = True
    while stack:
      r, c = stack.pop()
      comp[r, c] = True
      for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
        if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
          seen[rr, cc] = True
          stack.append((rr, cc))
    out.append(comp)
  return out


def is_color(image, rgb):
  return np.all(image == np.array(rgb, np.uint8), axis=-1)


def bbox(mask):
  rows, cols = np.nonzero(mask)
  return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1  # pixel edges


def find_objects(image):
  """[{color, shape, box, mask}] of every shape, and the background's name."""
  objects = []
  for color, rgb in SHAPE_COLORS.items():
    for comp in components(is_color(image, rgb)):
      x1, y1, x2, y2 = bbox(comp)
      fill = comp.sum() / ((x2 - x1) * (y2 - y1))
      assert x2 - x1 == y2 - y1 >= 6, "shapes are drawn in square boxes of >= 6 px"
      shape = "square" if fill == 1 else "circle" if fill > 0.72 else "triangle"
      objects.append(dict(color=color, shape=shape, box=(x1, y1, x2, y2), mask=comp,
                          name=f"{color} {shape}"))
  rest = ~np.any([o["mask"] for o in objects], axis=0)
  background = [n for n, rgb in BACKGROUNDS.items() if is_color(image, rgb)[rest].all()]
  assert len(background) == 1
  return objects, background[0]


def assert_box(text_box, box, h, w):
  """A Ferret box on the image's 0..1000 canvas matches pixel edges within rounding."""
  want = (box[0] * 1000 / w, box[1] * 1000 / h, box[2] * 1000 / w, box[3] * 1000 / h)
  assert np.allclose(text_box, want, atol=0.5 + 1e-9), (text_box, want)


def at_point(point, h, w):
  """(row, col) of the pixel a [x, y] point on 0..1000 falls in."""
  return int(point[1] * h / 1000), int(point[0] * w / 1000)


def left_to_right(objects):
  return sorted(objects, key=lambda o: (o["box"][0], o["box"][1]))


def caption_of(image):
  objects, background = find_objects(image)
  names = [f"a {o['name']}" for o in left_to_right(objects)]
  listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
  return f"{listed[0].upper()}{listed[1:]} on a {background} background."


# --- structure, determinism, splits -----------------------------------------------------

KIND_OF = {"caption": "caption", "interleaved": "interleaved", "qa": "conversation", "text_rich": "conversation",
           "counting": "conversation", "refer": "conversation", "ground": "conversation",
           "multi_image": "multi_image", "text_doc": "text", "text_chat": "text", "ui": "conversation",
           "video": "multi_image"}
CATEGORIES = {"caption": {"caption"}, "interleaved": {""}, "qa": {"general"}, "text_rich": {"text_rich"},
              "counting": {"general", "math"}, "refer": {"refer_ground"}, "ground": {"refer_ground"},
              "multi_image": {"general", "math"}, "text_doc": {""}, "text_chat": {"general", "math"},
              "ui": {"refer_ground"}, "video": {"general"}}


def digest(rec):
  h = hashlib.sha256(repr([(m["role"], m["content"]) for m in rec["messages"]]).encode())
  for image in rec["images"]:
    h.update(repr(image.shape).encode() + image.tobytes())
  return h.hexdigest()


@pytest.mark.parametrize("name", sorted(builtin.SOURCES))
def test_records_are_valid(name):
  assert set(KIND_OF) == set(builtin.SOURCES)
  for rec in make(name):
    records.validate(rec)
    assert set(rec) == {"kind", "messages", "images", "category", "coords"}
    assert rec["kind"] == KIND_OF[name] and rec["category"] in CATEGORIES[name]
    roles = [m["role"] for m in rec["messages"]]
    if rec["kind"] in ("conversation", "multi_image") or roles[0] != "text":
      assert roles == ["user", "assistant"] * (len(roles) // 2) and 2 <= len(roles) <= 6
      assert all("<image>" not in m["content"] for m in rec["messages"][1:])  # markers open the chat
    else:
      assert set(roles) == {"text"}
    assert sum(m["content"].count("<image>") for m in rec["messages"]) == len(rec["images"])
    for image in rec["images"]:
      assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert rec["coords"] == ("image" if name in ("refer", "ground", "text_rich", "ui") else "none")
    assert records.decode(records.encode(rec))["messages"] == rec["messages"]


@pytest.mark.parametrize("name", sorted(builtin.SOURCES))
def test_deterministic_and_splits_disjoint(name):
  train = [digest(r) for r in make(name, 100)]
  assert train == [digest(r) for r in make(name, 100)]  # a fresh source regenerates the same bytes
  src = builtin.SOURCES[name]("train", 100)
  assert digest(pickle.loads(pickle.dumps(src))[np.int64(7)]) == train[7]  # grain workers pickle sources
  assert digest(src[99]) == train[99] and len(src) == 100
  evals = [digest(r) for r in make(name, 100, split="eval")]
  assert not set(train) & set(evals)
  assert len(set(train)) > 50  # not one record over and over
  assert [digest(r) for r in make(name, 20, seed=1)] != train[:20]


def test_grain_source_and_errors():
  streams = [cls.stream for cls in builtin.SOURCES.values()]
  assert len(set(streams)) == len(streams)  # tasks never draw the same random numbers
  ds = grain.MapDataset.source(builtin.SOURCES["qa"]("eval", 10))
  assert digest(ds[3]) == digest(builtin.SOURCES["qa"]("eval", 10)[3])
  with pytest.raises(IndexError):
    builtin.SOURCES["qa"]("train", 10)[10]
  with pytest.raises(ValueError, match="split"):
    builtin.SOURCES["qa"]("test", 10)
  with pytest.raises(ValueError, match="image_scale"):
    builtin.SOURCES["qa"]("train", 10, image_scale=0.1)


def test_image_sizes_and_aspect_ratios_vary():
  sizes = [im.shape[:2] for r in make("caption", 100) for im in r["images"]]
  assert all(24 <= s <= 96 for hw in sizes for s in hw)
  ratios = [w / h for h, w in sizes]
  assert min(ratios) < 0.6 and max(ratios) > 1.7 and len(set(sizes)) > 80
  big = [im.shape[:2] for r in make("ground", 20, image_scale=2.0) for im in r["images"]]
  assert all(48 <= s <= 192 for hw in big for s in hw) and max(max(hw) for hw in big) > 96


def test_mixtures():
  for stage, want in (("sft", {"conversation": 0.8, "multi_image": 0.1, "text": 0.1}),
                      ("pretrain", {"caption": 0.5, "interleaved": 0.1, "text": 0.4})):
    weights = builtin.default_mixture(stage)
    assert set(weights) <= set(builtin.SOURCES) and abs(sum(weights.values()) - 1) < 1e-9
    by_kind = collections.Counter()
    for name, w in weights.items():
      by_kind[KIND_OF[name]] += w
    assert {k: round(v, 6) for k, v in by_kind.items()} == want
  assert builtin.default_mixture() == builtin.default_mixture("sft")
  with pytest.raises(ValueError, match="stage"):
    builtin.default_mixture("rl")


# --- answers from pixels ----------------------------------------------------------------

def test_captions_match_pixels():
  for rec in make("caption"):
    (image,) = rec["images"]
    assert rec["messages"][0]["content"] == "<image>\n" + caption_of(image)


def test_qa_answers_match_pixels():
  seen = set()
  for rec in make("qa", 100):
    objects, background = find_objects(rec["images"][0])
    assert len({o["shape"] for o in objects}) == len({o["color"] for o in objects}) == len(objects)
    for q, a in turns(rec):
      if q == "What color is the background?":  # before "What color is the {shape}?"
        kind, want = "background", [background]
      elif m := re.fullmatch(r"(?:What color is the|Which color does the) (\w+)(?: have)?\?", q):
        kind, want = "color", [o["color"] for o in objects if o["shape"] == m[1]]
      elif m := re.fullmatch(r"(?:Which shape is|What is the shape of the) (\w+)(?: object)?\?", q):
        kind, want = "shape", [o["shape"] for o in objects if o["color"] == m[1]]
      elif m := re.fullmatch(r"Is there a (\w+) (\w+)\?", q):
        kind, want = "exists", ["yes" if any(o["name"] == f"{m[1]} {m[2]}" for o in objects) else "no"]
      elif q == "Which shape is furthest to the left?":
        kind, want = "left", [left_to_right(objects)[0]["shape"]]
      else:
        raise AssertionError(q)
      assert [a] == want, (q, a, want)
      seen.add((kind, a) if kind == "exists" else kind)
  assert seen >= {"color", "shape", ("exists", "yes"), ("exists", "no"), "background", "left"}


def test_counting_answers_match_pixels():
  categories = collections.Counter()
  for rec in make("counting", 100):
    objects, _ = find_objects(rec["images"][0])
    ((q, a),) = turns(rec)
    count = lambda objects=objects, **kw: sum(all(o[k] == v for k, v in kw.items()) for o in objects)
    if q == "How many shapes are there?":
      want = len(objects)
    elif m := re.fullmatch(r"How many (\w+) are there\?", q):
      want = count(shape=PLURAL[m[1]])
    elif m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
      want = count(color=m[1])
    elif m := re.fullmatch(r"How many (\w+) and (\w+) are there together\?", q):
      want = count(shape=PLURAL[m[1]]) + count(shape=PLURAL[m[2]])
    elif m := re.fullmatch(r"If (\d) more shapes were added, how many shapes would there be\?", q):
      want = len(objects) + int(m[1])
    else:
      raise AssertionError(q)
    assert a == str(want), (q, a, want)
    categories[rec["category"]] += 1
  assert categories["math"] > 10 and categories["general"] > 40


def test_referring_answers_match_pixels():
  for rec in make("refer", 100):
    image = rec["images"][0]
    h, w = image.shape[:2]
    objects, _ = find_objects(image)
    for q, a in turns(rec):
      (c,) = coords(q)
      if len(c) == 2:  # the pixel the point falls in belongs to the named object
        r, col = at_point(c, h, w)
        (obj,) = [o for o in objects if o["mask"][r, col]]
        assert a == (obj["color"] if q.startswith("What color") else obj["name"])
      else:  # the box is exactly one object's box
        (obj,) = [o for o in objects if np.allclose(c, np.array(o["box"]) * 1000 / [w, h, w, h], atol=0.5)]
        assert a == obj["name"]


def test_grounding_boxes_match_pixels():
  phrases = set()
  for rec in make("ground", 100):
    image = rec["images"][0]
    h, w = image.shape[:2]
    objects, _ = find_objects(image)
    for q, a in turns(rec):
      if q == "Find all shapes.":
        parts = re.findall(r"(\w+ \w+) (\[[\d, ]+\])", a)
        assert ", ".join(f"{name} {box}" for name, box in parts) == a
        assert [name for name, _ in parts] == [o["name"] for o in left_to_right(objects)]
        for (_, text_box), obj in zip(parts, left_to_right(objects)):
          assert_box(coords(text_box)[0], obj["box"], h, w)
        continue
      phrase = re.fullmatch(r"(?:Where is the|Give the box of the) (.+?)\.?\??", q)[1]
      phrases.add(len(phrase.split()))
      (obj,) = [o for o in objects if phrase in (o["name"], o["shape"], f"{o['color']} object")]
      (box,) = coords(a)
      assert a == "[{}, {}, {}, {}]".format(*box)
      assert_box(box, obj["box"], h, w)
  assert phrases == {1, 2}


def test_multi_image_answers_match_pixels():
  kinds = collections.Counter()
  for rec in make("multi_image", 100):
    found = [find_objects(image)[0] for image in rec["images"]]
    n = len(found)
    assert 2 <= n <= 4
    assert rec["messages"][0]["content"].startswith("<image>\n" * n)  # named by the tile indicators
    for q, a in turns(rec):
      if q == "Which image has the most shapes?":
        counts = [len(f) for f in found]
        want = f"Image {counts.index(max(counts)) + 1}"
        assert counts.count(max(counts)) == 1
      elif m := re.fullmatch(r"Which image has a (\w+ \w+)\?", q):
        (k,) = [k for k, f in enumerate(found) if any(o["name"] == m[1] for o in f)]
        want = f"Image {k + 1}"
      elif m := re.fullmatch(r"Do image (\d) and image (\d) have a shape of the same color\?", q):
        colors = [{o["color"] for o in found[int(m[i]) - 1]} for i in (1, 2)]
        want = "yes" if colors[0] & colors[1] else "no"
      elif q == "How many shapes are there in all the images?":
        want = str(sum(len(f) for f in found))
        assert rec["category"] == "math"
      elif m := re.fullmatch(r"What color is the (\w+) in image (\d)\?", q):
        (want,) = [o["color"] for o in found[int(m[2]) - 1] if o["shape"] == m[1]]
      else:
        raise AssertionError(q)
      assert a == want, (q, a, want)
      kinds[" ".join(q.split()[:3])] += 1
  assert len(kinds) >= 5, kinds


def test_interleaved_text_matches_pixels():
  for rec in make("interleaved"):
    texts = [m["content"] for m in rec["messages"]]
    images = rec["images"]
    assert len(texts) == len(images) + 2 and all(t.count("<image>") == 1 for t in texts[1:-1])
    total = 0
    for k, (text, image) in enumerate(zip(texts[1:-1], images)):
      n = len(find_objects(image)[0])
      total += n
      shapes_ = "1 shape" if n == 1 else f"{n} shapes"
      assert text in (f"Picture {k + 1}: <image>\n{caption_of(image)} It has {shapes_}.",
                      f"Picture {k + 1} shows {shapes_}. <image>\n{caption_of(image)}")
    assert texts[-1].endswith(f" {total} shape{'s' * (total != 1)}.")


# --- text-rich --------------------------------------------------------------------------

def locate(ink, word):
  """Every (x, y) where the word's glyphs match the ink exactly (window and glyph equal)."""
  g = glyphs(word)
  if g.shape[0] > ink.shape[0] or g.shape[1] > ink.shape[1]:
    return []
  windows = np.lib.stride_tricks.sliding_window_view(ink, g.shape)
  ys, xs = np.nonzero(np.all(windows == g, axis=(-2, -1)))
  return [(int(x), int(y)) for x, y in zip(xs, ys)]


def test_text_rich_words_are_in_the_pixels():
  kinds = set()
  for rec in make("text_rich", 80):
    image = rec["images"][0]
    h, w = image.shape[:2]
    colors, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    paper = colors[counts.argmax()]
    ink = ~np.all(image == paper, axis=-1)
    for q, a in turns(rec):
      if q == "What is written in the image?":  # every word, top to bottom, and nothing else
        placed = [locate(ink, word) for word in a.split()]
        assert all(len(p) == 1 for p in placed), (a, placed)
        ys = [p[0][1] for p in placed]
        assert ys == sorted(ys)
        assert ink.sum() == sum(glyphs(word).sum() for word in a.split())
      elif q in ("What is the first word?", "What is the last word?"):
        (x, y), = locate(ink, a)
        above = ink[:y].any() if q.endswith("first word?") else ink[y + glyphs(a).shape[0]:].any()
        assert not above
      elif m := re.fullmatch(r"What word is in (\[.*\])\?", q):
        (box,) = coords(m[1])
        x1, y1 = round(box[0] * w / 1000), round(box[1] * h / 1000)
        x2, y2 = round(box[2] * w / 1000), round(box[3] * h / 1000)
        assert np.array_equal(ink[y1:y2, x1:x2], glyphs(a))
      elif q == "How many words are there?":
        rows_with_ink = ink.any(axis=1).astype(int)
        assert int(a) == np.sum(np.diff(rows_with_ink, prepend=0) == 1)  # one word per line
      elif m := re.fullmatch(r"What color is the word (\w+)\?", q):
        (x, y), = locate(ink, m[1])
        g = glyphs(m[1])
        assert np.all(image[y:y + g.shape[0], x:x + g.shape[1]][g] == INKS[a])
      else:
        raise AssertionError(q)
      kinds.add(" ".join(q.split()[:4]))
  assert len(kinds) == 6


# --- text-only --------------------------------------------------------------------------

def test_text_only_facts_are_true_and_split():
  sentences = {}
  for split in ("train", "eval"):
    sentences[split] = set()
    for rec in make("text_chat", 150, split=split):
      for q, a in turns(rec):
        if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", q):
          assert rec["category"] == "math" and int(a) == eval(f"{m[1]} {m[2]} {m[3]}")
          assert int(a) >= 0
        else:
          assert rec["category"] == "general"
        sentences[split].add(q)
    for rec in make("text_doc", 150, split=split):
      (msg,) = rec["messages"]
      for s in re.split(r"(?<=\.) ", msg["content"]):
        if m := re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)\.", s):
          assert int(m[4]) == eval(f"{m[1]} {m[2]} {m[3]}")
          sentences[split].add(f"What is {m[1]} {m[2]} {m[3]}?")
        else:
          assert re.fullmatch(r"(The opposite of \w+ is \w+|An? \w+ is an? \w+|The \w+ is \w+)\.", s), s
          sentences[split].add(s)
  assert not sentences["train"] & sentences["eval"]
  assert len(sentences["eval"]) > 40


def test_corpus_covers_the_text():
  lines = builtin.corpus(num_per_source=5)
  assert lines == builtin.corpus(num_per_source=5) and len(lines) == len(set(lines))
  assert not any("<image>" in line for line in lines)
  assert "What is the first word?" in " ".join(builtin.corpus(num_per_source=40))
