"""data_pipelines/inspect.py: examples.json and the PNGs against independent expectations."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from data_pipelines import anyres, mixture, records
from data_pipelines import inspect as inspect_lib
from experiments import tiny

ZOOM = 4
_BOX = re.compile(r"\[(\d+), (\d+), (\d+), (\d+)\]")


def expected_png_hw(layouts, tile):
  """One row per image: canvas (+ gap + overview tile when split), rows GAP apart."""
  rows = []
  for lay in layouts:
    if lay.grid != (0, 0):
      ch, cw = lay.grid[0] * tile, lay.grid[1] * tile
      rows.append((max(ch, tile) * ZOOM, cw * ZOOM + inspect_lib.GAP + tile * ZOOM))
    else:
      rows.append((tile * ZOOM, tile * ZOOM))
  return sum(h for h, _ in rows) + inspect_lib.GAP * (len(rows) - 1), max(w for _, w in rows)


@pytest.fixture(scope="module")
def config():
  c = tiny.get_config()
  c.data.num_examples = 200
  return c


def test_examples_json_and_pngs(config, tmp_path):
  num = 10
  entries = inspect_lib.inspect(config, num, str(tmp_path), "train", zoom=ZOOM)
  with open(tmp_path / "examples.json") as f:
    assert json.load(f) == entries
  assert [e["index"] for e in entries] == list(range(num))
  ds = mixture.mixed_records(config, "train")
  tile, k = config.model.vit.image_size, config.model.connector.tokens_per_tile
  built = 0
  for e in entries:
    record = ds[e["index"]]
    assert e["kind"] == record["kind"]
    if "dropped" in e:
      continue
    built += 1
    sizes = [im.shape[:2] for im in record["images"]]
    layouts = anyres.plan_images(sizes, tile=tile, anyres=config.data.anyres)
    assert [im["size"] for im in e["images"]] == [[h, w] for h, w in sizes]
    assert [tuple(im["grid"]) for im in e["images"]] == [lay.grid for lay in layouts]
    total_tiles = sum(lay.num_tiles for lay in layouts)
    assert e["num_image_tokens"] == total_tiles * k
    assert e["text"].count(f"<image>*{k}") == total_tiles
    assert e["num_tokens"] > e["num_image_tokens"]
    if not sizes:
      assert "png" not in e
      continue
    path = tmp_path / e["png"]
    with Image.open(path) as png:
      png.verify()
    with Image.open(path) as png:
      assert png.format == "PNG"
      assert (png.height, png.width) == expected_png_hw(layouts, tile)
  assert built >= num // 2


def _first_box(record):
  for m in record["messages"]:
    found = _BOX.search(m["content"])
    if found:
      return tuple(int(v) for v in found.groups())
  return None


def test_grounding_box_drawn_where_the_text_says(config, tmp_path):
  c = config.copy_and_resolve_references()
  c.data.sources = dict(ground=dict(kind="builtin", weight=1.0))
  entries = inspect_lib.inspect(c, 4, str(tmp_path), "eval", zoom=ZOOM)
  ds = mixture.mixed_records(c, "eval")
  tile = c.model.vit.image_size
  color = np.array(inspect_lib.BOX_COLORS[0])
  checked = 0
  for e in entries:
    record = ds[e["index"]]
    box = _first_box(record)
    if box is None or "png" not in e:
      continue
    (lay,) = anyres.plan_images([record["images"][0].shape[:2]], tile=tile, anyres=c.data.anyres)
    # Image units (0..1000 of the image) -> zoomed canvas pixels: the image fills resized_hw.
    rh, rw = lay.resized_hw
    x1, y1, x2, y2 = (box[0] * rw * ZOOM / 1000, box[1] * rh * ZOOM / 1000,
                      box[2] * rw * ZOOM / 1000, box[3] * rh * ZOOM / 1000)
    png = np.asarray(Image.open(tmp_path / e["png"]).convert("RGB")).astype(int)
    hit = np.all(png == color, axis=-1)

    def near(rows, cols, hit=hit):
      return hit[max(rows.start, 0):rows.stop, max(cols.start, 0):cols.stop].any()

    inner_x = range(int(x1 + 0.25 * (x2 - x1)) + 1, int(x2 - 0.25 * (x2 - x1)))
    inner_y = range(int(y1 + 0.25 * (y2 - y1)) + 1, int(y2 - 0.25 * (y2 - y1)))
    assert len(inner_x) and len(inner_y)
    band = 2  # rounding of the canvas remap and the pixel edges, plus the 2 px outline
    for x in inner_x:
      assert near(slice(int(y1) - band, int(y1) + band + 1), slice(x, x + 1)), (e["index"], "top", x)
      assert near(slice(int(y2) - band - 1, int(y2) + band), slice(x, x + 1)), (e["index"], "bottom", x)
    for y in inner_y:
      assert near(slice(y, y + 1), slice(int(x1) - band, int(x1) + band + 1)), (e["index"], "left", y)
      assert near(slice(y, y + 1), slice(int(x2) - band - 1, int(x2) + band)), (e["index"], "right", y)
    # The outline, not a fill: the box's middle is not the box colour.
    assert not hit[int((y1 + y2) / 2), int((x1 + x2) / 2)]
    checked += 1
  assert checked >= 2


def test_corrupt_and_serialised_records(config, tmp_path, monkeypatch):
  good = mixture.mixed_records(config, "train")[0]
  items = [b"not a record", records.encode(good)]
  monkeypatch.setattr(inspect_lib.mixture, "mixed_records", lambda config, split: items)
  entries = inspect_lib.inspect(config, 2, str(tmp_path), "train", zoom=1)
  assert entries[0]["index"] == 0 and entries[0]["skipped"].startswith("MalformedRecord")
  assert entries[1]["kind"] == good["kind"]
  assert [im["size"] for im in entries[1]["images"]] == [list(im.shape[:2]) for im in good["images"]]
  assert os.path.exists(tmp_path / entries[1]["png"])
