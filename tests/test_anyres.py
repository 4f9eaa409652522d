"""AnyRes splitting and coordinates under resize + pad, against hand-worked cases.

The rule under test (anyres.py): maximise the effective scale min(s, 1) with
s = min(rows*t/h, cols*t/w); then fewest tiles; then largest s; then fewer rows.
"""

import ml_collections
import numpy as np
import pytest

from data_pipelines import anyres, coordinates

# (h, w, tile, n_min, n_max, expected grid, reason)
GRID_CASES = [
    # The final recipe: tile 672, (4, 9).
    (1000, 1000, 672, 4, 9, (2, 2), "2x672=1344 >= 1000 both ways; 4 tiles is the fewest allowed"),
    (2016, 2016, 672, 4, 9, (3, 3), "needs 3 rows and 3 cols (2016 = 3*672) for full resolution"),
    (1300, 1300, 672, 4, 9, (2, 2), "1344 >= 1300: 2x2 holds it at full resolution"),
    (1400, 1400, 672, 4, 9, (3, 3), "1344 < 1400: full resolution needs 3x3"),
    (4000, 4000, 672, 4, 9, (3, 3), "no grid holds it; 3x3 gives the largest s = 2016/4000"),
    (10000, 10000, 672, 4, 9, (3, 3), "huge square: min(rows, cols) = 3 is the most possible"),
    (672, 2016, 672, 4, 9, (1, 4), "3:1 wide needs cols >= 3; of 4-tile grids only 1x4 does"),
    (50, 200, 672, 4, 9, (1, 4), "tiny 1:4 wide: 4 tiles all full-res; 1x4 fills best (s 13.44 vs 6.72, 3.36)"),
    (100, 100, 672, 4, 9, (2, 2), "tiny square: 4 tiles; 2x2 fills best (s 13.44 vs 6.72)"),
    (1344, 4032, 672, 4, 9, (2, 4), "3:1 too big for 9 tiles; s = min(r/2, c/6) is 2/3 at 2x4, <= 1/2 elsewhere"),
    (4000, 1000, 672, 4, 9, (4, 1), "1:4 tall too big; s = 0.672 for (4..9, 1) and (4, 2); 4x1 has fewest tiles"),
    (2000, 500, 672, 4, 9, (4, 1), "1:4 tall needs rows >= 3, so 4x1 is the fewest tiles at full resolution"),
    (1000, 20000, 672, 4, 9, (1, 9), "1:20 wide: cols limit s = c*672/20000, most at 9 columns"),
    (1000, 1500, 672, 4, 9, (2, 3), "3:2 needs rows >= 2, cols >= 3: 2x3 (6 tiles)"),
    (1344, 2100, 672, 4, 9, (2, 4), "needs rows >= 2, cols >= 4 (3*672 = 2016 < 2100): 2x4"),
    # Small tiles, (1, 4).
    (10, 10, 10, 1, 4, (1, 1), "fits one tile exactly"),
    (5, 5, 10, 1, 4, (1, 1), "tiny: one tile at full resolution, no upscaling to more tiles"),
    (10, 15, 10, 1, 4, (1, 2), "needs 2 cols; 1x2 beats 2x2 (same full resolution, fewer tiles)"),
    (10, 25, 10, 1, 4, (1, 3), "needs 3 cols; 1x3 beats 1x4"),
    (15, 15, 10, 1, 4, (2, 2), "needs 2x2"),
    (10, 40, 10, 1, 4, (1, 4), "exactly 1x4"),
    (10, 41, 10, 1, 4, (1, 4), "none full-res; 1x4 loses least (40/41)"),
    (20, 25, 10, 1, 4, (2, 2), "none full-res; s = 0.8 at 2x2, <= 0.5 elsewhere"),
    (100, 100, 10, 1, 4, (2, 2), "huge square: 2x2 gives s = 0.2, the rest 0.1"),
    (60, 16, 10, 1, 4, (4, 1), "tall: s = min(40/60, 10/16) = 0.625 at 4x1, 0.5 at 3x1"),
    (60, 20, 10, 1, 4, (3, 1), "tall: s = 0.5 at both 3x1 and 4x1; 3x1 has fewer tiles"),
    # n_min == n_max.
    (10, 10, 10, 4, 4, (2, 2), "4 tiles forced: 2x2 fills best (s 2 vs 1)"),
    (30, 30, 10, 4, 4, (2, 2), "none full-res: 2x2 s = 2/3, 1x4 and 4x1 1/3"),
    (10, 35, 10, 4, 4, (1, 4), "wide: only 1x4 holds 35 columns"),
    (50, 10, 10, 4, 4, (4, 1), "tall: 4x1 s = 0.8, 2x2 0.4"),
    (10, 10, 10, 6, 6, (2, 3), "square in 6 tiles: 2x3 and 3x2 tie at s = 2; fewer rows wins"),
    (10, 30, 10, 4, 9, (1, 4), "3:1 wide at tile 10, same as the 672 case"),
    (10, 30, 10, 1, 9, (1, 3), "3:1 wide with n_min = 1: exactly 1x3"),
    (123, 457, 10, 1, 1, (1, 1), "(1, 1) is the only candidate"),
    (3, 2000, 10, 1, 1, (1, 1), "(1, 1) is the only candidate, whatever the aspect"),
]


@pytest.mark.parametrize("h, w, tile, n_min, n_max, expected, reason", GRID_CASES)
def test_choose_grid(h, w, tile, n_min, n_max, expected, reason):
  assert anyres.choose_grid(h, w, tile=tile, n_min=n_min, n_max=n_max) == expected, reason


def test_candidates():
  assert anyres.candidates(4, 9) == [
      (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (1, 9), (2, 2), (2, 3), (2, 4), (3, 2), (3, 3),
      (4, 1), (4, 2), (5, 1), (6, 1), (7, 1), (8, 1), (9, 1)]
  assert anyres.candidates(1, 1) == [(1, 1)]
  assert anyres.candidates(6, 6) == [(1, 6), (2, 3), (3, 2), (6, 1)]


@pytest.mark.parametrize("kwargs", [dict(n_min=0, n_max=4), dict(n_min=5, n_max=4)])
def test_bad_range_raises(kwargs):
  with pytest.raises(ValueError, match="n_min"):
    anyres.choose_grid(10, 10, tile=10, **kwargs)


def test_bad_size_raises():
  with pytest.raises(ValueError, match=">= 1"):
    anyres.plan(0, 10, tile=10, n_min=1, n_max=4, split=True)


# (h, w, tile, n_min, n_max, split, grid, resized_hw, canvas_hw, num_tiles)
LAYOUT_CASES = [
    (1000, 1500, 672, 4, 9, True, (2, 3), (1344, 2016), (1344, 2016), 7),  # s = 1.344 on both axes
    (4000, 1000, 672, 4, 9, True, (4, 1), (2688, 672), (2688, 672), 5),  # s = 0.672 on both axes
    (1344, 4032, 672, 4, 9, True, (2, 4), (896, 2688), (1344, 2688), 9),  # width-limited, s = 2/3
    (2016, 2016, 672, 4, 9, True, (3, 3), (2016, 2016), (2016, 2016), 10),  # the most: 9 + overview
    (1000, 1000, 672, 4, 9, False, (0, 0), (672, 672), (672, 672), 1),  # not split: one tile
    (10, 25, 10, 1, 4, True, (1, 3), (10, 25), (10, 30), 4),  # full resolution, padded right
    (10, 10, 10, 1, 4, True, (0, 0), (10, 10), (10, 10), 1),  # 1x1 would repeat the overview
    (60, 16, 10, 1, 4, True, (4, 1), (38, 10), (40, 10), 5),  # 60 * 0.625 = 37.5 -> 38 (half up)
    (16, 60, 10, 1, 4, True, (1, 4), (10, 38), (10, 40), 5),  # the same, transposed
    (2, 8, 10, 1, 1, True, (0, 0), (3, 10), (10, 10), 1),  # 2 * 1.25 = 2.5 -> 3 (half up)
    (3, 7, 10, 1, 1, False, (0, 0), (4, 10), (10, 10), 1),  # 3 * 10/7 = 4.29 -> 4
    (1, 5000, 10, 1, 1, False, (0, 0), (1, 10), (10, 10), 1),  # 0.002 -> at least 1 pixel
]


@pytest.mark.parametrize("h, w, tile, n_min, n_max, split, grid, resized, canvas, num_tiles", LAYOUT_CASES)
def test_plan(h, w, tile, n_min, n_max, split, grid, resized, canvas, num_tiles):
  layout = anyres.plan(h, w, tile=tile, n_min=n_min, n_max=n_max, split=split)
  assert (layout.image_hw, layout.tile, layout.grid) == ((h, w), tile, grid)
  assert layout.resized_hw == resized
  assert layout.canvas_hw == canvas
  assert layout.num_tiles == num_tiles


def test_plan_images_multi_image_rule():
  anyres_cfg = ml_collections.ConfigDict(dict(enabled=True, n_min=4, n_max=9, split_max_images=2))
  one = anyres.plan_images([(1000, 1500)], tile=672, anyres=anyres_cfg)
  assert [l.grid for l in one] == [(2, 3)]
  two = anyres.plan_images([(1000, 1500), (100, 100)], tile=672, anyres=anyres_cfg)
  assert [l.grid for l in two] == [(2, 3), (2, 2)]
  assert [l.num_tiles for l in two] == [7, 5]
  # 3 images: each one tile (the spec: split only with fewer than 3).
  three = anyres.plan_images([(1000, 1500), (100, 100), (50, 60)], tile=672, anyres=anyres_cfg)
  assert [(l.grid, l.num_tiles) for l in three] == [((0, 0), 1)] * 3
  # split_max_images defaults to 2; a plain dict works too.
  default = anyres.plan_images([(10, 25)] * 2, tile=10, anyres=dict(enabled=True, n_min=1, n_max=4))
  assert [l.grid for l in default] == [(1, 3), (1, 3)]
  # Disabled: one tile each.
  off = anyres.plan_images([(1000, 1500)], tile=672, anyres=dict(enabled=False, n_min=4, n_max=9))
  assert [(l.grid, l.num_tiles, l.resized_hw) for l in off] == [((0, 0), 1, (448, 672))]


BG = (200, 200, 200)
RED = (255, 0, 0)
PAD = anyres.PAD_COLOR


def _image(h, w, rect=None, color=RED, bg=BG):
  image = np.empty((h, w, 3), np.uint8)
  image[:] = bg
  if rect is not None:
    r0, r1, c0, c1 = rect  # inclusive rows r0..r1, cols c0..c1
    image[r0:r1 + 1, c0:c1 + 1] = color
  return image


def test_render_tiles_full_resolution_exact():
  # 10x25 in 1x3 of tile 10 at scale 1: canvas cols 0-9 tile 0, 10-19 tile 1, 20-24 + pad tile 2.
  image = _image(10, 25, rect=(2, 5, 12, 17))
  layout = anyres.plan(10, 25, tile=10, n_min=1, n_max=4, split=True)
  tiles = anyres.render_tiles(image, layout)
  assert tiles.shape == (4, 10, 10, 3) and tiles.dtype == np.uint8
  assert (tiles[0] == BG).all()
  expected1 = _image(10, 10, rect=(2, 5, 2, 7))  # cols 12..17 -> 2..7 of tile 1
  np.testing.assert_array_equal(tiles[1], expected1)
  assert (tiles[2][:, :5] == BG).all() and (tiles[2][:, 5:] == PAD).all()
  # The overview is last: 25 wide -> 10, height 10 * 0.4 = 4 rows, the rest padding.
  overview = tiles[3]
  assert (overview[4:] == PAD).all()
  assert not (overview[:4] == PAD).all(axis=-1).any()
  # Rect centre (3.5, 14.5) * 0.4 = (1.4, 5.8): red-dominant there, grey at the far left.
  r, g, _ = overview[1, 5].astype(int)
  assert r - g > 60, overview[1, 5]
  assert (np.abs(overview[:4, 0].astype(int) - BG) <= 2).all()


def test_render_tiles_upscaled_lands_in_tile():
  # 10x10 forced into 2x2 of tile 10: scale 2. Rows 1..4, cols 6..8 -> canvas rows [2, 10),
  # cols [12, 18): tile 1 (row 0, col 1), local rows [2, 10), cols [2, 8).
  image = _image(10, 10, rect=(1, 4, 6, 8))
  layout = anyres.plan(10, 10, tile=10, n_min=4, n_max=4, split=True)
  assert layout.grid == (2, 2) and layout.resized_hw == (20, 20)
  tiles = anyres.render_tiles(image, layout)
  assert tiles.shape == (5, 10, 10, 3)
  red = (tiles[..., 0].astype(int) - tiles[..., 1]) > 100
  assert red[1].any() and not red[[0, 2, 3]].any()
  rows, cols = np.nonzero(red[1])
  assert abs(rows.min() - 2) <= 1 and abs(rows.max() + 1 - 10) <= 1
  assert abs(cols.min() - 2) <= 1 and abs(cols.max() + 1 - 8) <= 1
  assert (np.abs(tiles[1][4:8, 4:6].astype(int) - RED) <= 3).all()  # the middle is the colour
  assert (np.abs(tiles[2].astype(int) - BG) <= 3).all()  # tile (1, 0): far from the rect
  # Overview: 10x10 -> 10x10 at scale 1, exact and unpadded.
  np.testing.assert_array_equal(tiles[4], image)


def test_render_tiles_downscaled_padding():
  # 60x16 -> 4x1 at s = 0.625: resized 38x10 in a 40x10 canvas; tile 3 rows 8, 9 are padding.
  layout = anyres.plan(60, 16, tile=10, n_min=1, n_max=4, split=True)
  tiles = anyres.render_tiles(_image(60, 16, bg=(0, 0, 0)), layout)
  assert tiles.shape == (5, 10, 10, 3)
  assert (tiles[:3] == 0).all() and (tiles[3][:8] == 0).all() and (tiles[3][8:] == PAD).all()
  # Overview: 60x16 -> 10 rows, 16 * 10/60 = 2.67 -> 3 cols, the rest padding.
  assert (tiles[4][:, :3] == 0).all() and (tiles[4][:, 3:] == PAD).all()


def test_render_tiles_rejects_wrong_image():
  layout = anyres.plan(10, 25, tile=10, n_min=1, n_max=4, split=True)
  with pytest.raises(ValueError, match="planned for"):
    anyres.render_tiles(_image(10, 24), layout)
  with pytest.raises(ValueError, match="uint8"):
    anyres.render_tiles(np.zeros((10, 25, 3), np.float32), layout)


# Coordinates -----------------------------------------------------------------------------


def test_image_to_canvas_hand_cases():
  wide = anyres.plan(10, 25, tile=10, n_min=1, n_max=4, split=True)  # x * 25/30, y * 1
  assert coordinates.image_to_canvas((100, 200, 1000, 1000), wide) == (83, 200, 833, 1000)  # 83.3, 833.3
  assert coordinates.image_to_canvas((3, 7, 9, 7), wide) == (3, 7, 8, 7)  # 2.5 -> 3, 7.5 -> 8: half up
  assert coordinates.image_to_canvas((500, 500), wide) == (417, 500)  # 416.7
  assert coordinates.canvas_to_image((833, 200), wide) == (1000, 200)  # 999.6
  assert coordinates.canvas_to_image((417, 0), wide) == (500, 0)  # 500.4
  assert coordinates.canvas_to_image((950, 1000), wide) == (1000, 1000)  # in the padding: clamped
  tall = anyres.plan(60, 16, tile=10, n_min=1, n_max=4, split=True)  # x * 1, y * 38/40
  assert coordinates.image_to_canvas((500, 500), tall) == (500, 475)
  assert coordinates.image_to_canvas((0, 10, 1000, 1000), tall) == (0, 10, 1000, 950)  # 9.5 -> 10
  single = anyres.plan(3, 7, tile=10, n_min=1, n_max=1, split=False)  # y * 4/10
  assert coordinates.image_to_canvas((250, 250, 750, 750), single) == (250, 100, 750, 300)


def test_remap_text():
  wide = anyres.plan(10, 25, tile=10, n_min=1, n_max=4, split=True)
  text = "The cat [100, 200, 1000, 1000] is left of [500,500]; list [1, 2, 3] and [2024, 5] stay."
  assert coordinates.remap_text(text, wide) == (
      "The cat [83, 200, 833, 1000] is left of [417, 500]; list [1, 2, 3] and [2024, 5] stay.")
  assert coordinates.remap_text("no coordinates", wide) == "no coordinates"
  # The existing helpers are unchanged.
  assert coordinates.format_box((0, 5, 10, 10), 10, 10) == "[0, 500, 1000, 1000]"
  assert coordinates.parse(coordinates.remap_text("[0, 0, 600, 600]", wide)) == [(0, 0, 500, 600)]


def _layouts(rng, count):
  """Varied layouts: split or not, wide/tall/square, up- and downscaled."""
  ranges = [(1, 4), (4, 9), (2, 6), (1, 1), (4, 4)]
  out = []
  for _ in range(count):
    tile = int(rng.choice([16, 24, 32]))
    h, w = (int(v) for v in np.exp(rng.uniform(np.log(6), np.log(160), size=2)))
    n_min, n_max = ranges[rng.integers(len(ranges))]
    out.append(anyres.plan(h, w, tile=tile, n_min=n_min, n_max=n_max, split=bool(rng.integers(4))))
  return out


def test_round_trips():
  rng = np.random.default_rng(0)
  for layout in _layouts(rng, 200):
    (rh, rw), (ch, cw) = layout.resized_hw, layout.canvas_hw
    # image -> canvas -> image: one canvas unit is cw/rw image units, so the error is at most
    # 0.5 * cw/rw + 0.5, i.e. 1 unit where the axis is at most ~3x padded, 0 when unpadded.
    bound = np.array([int(0.5 * cw / rw + 0.5), int(0.5 * ch / rh + 0.5)] * 2)
    for _ in range(20):
      box = np.sort(rng.integers(0, 1001, size=(2, 2)), axis=0).T.reshape(-1)  # x1, x2, y1, y2
      box = tuple(int(v) for v in box[[0, 2, 1, 3]])
      back = coordinates.canvas_to_image(coordinates.image_to_canvas(box, layout), layout)
      err = np.abs(np.array(back) - box)
      assert (err <= bound).all(), (layout, box, back)
      if rw == cw and rh == ch:
        assert back == box, (layout, box, back)
      # canvas -> image -> canvas within 1 unit, for canvas places on the image (not the padding).
      lim = (rw * 1000 // cw, rh * 1000 // ch)
      place = (int(rng.integers(0, lim[0] + 1)), int(rng.integers(0, lim[1] + 1)))
      again = coordinates.image_to_canvas(coordinates.canvas_to_image(place, layout), layout)
      assert max(abs(a - p) for a, p in zip(again, place)) <= 1, (layout, place, again)


def _assemble(tiles, layout):
  """The canvas from its sub-image tiles, by explicit loops (the single tile when unsplit)."""
  if layout.grid == (0, 0):
    return tiles[0]
  rows, cols = layout.grid
  t = layout.tile
  canvas = np.zeros((rows * t, cols * t, 3), np.uint8)
  for i in range(rows):
    for j in range(cols):
      canvas[i * t:(i + 1) * t, j * t:(j + 1) * t] = tiles[i * cols + j]
  return canvas


def test_box_covers_the_same_pixels_on_the_canvas():
  # A red rectangle drawn in the image, written as a Ferret box of the image, remapped to the
  # canvas and drawn there in pixels, covers where the red pixels ended up, within 1 px.
  rng = np.random.default_rng(1)
  checked = 0
  for layout in _layouts(rng, 150):
    (h, w), (rh, rw), (ch, cw) = layout.image_hw, layout.resized_hw, layout.canvas_hw
    min_h, min_w = int(np.ceil(4 * h / rh)), int(np.ceil(4 * w / rw))  # >= 4 px after the resize
    if min_h > h or min_w > w:
      continue
    bh, bw = int(rng.integers(min_h, h + 1)), int(rng.integers(min_w, w + 1))
    y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    image = _image(h, w, rect=(y0, y0 + bh - 1, x0, x0 + bw - 1), bg=(20, 20, 200))
    text = coordinates.remap_text(coordinates.format_box((x0, y0, x0 + bw, y0 + bh), w, h), layout)
    (x1, y1, x2, y2), = coordinates.parse(text)
    expected = np.array([x1 * cw, y1 * ch, x2 * cw, y2 * ch]) / 1000  # canvas pixel edges
    canvas = _assemble(anyres.render_tiles(image, layout), layout)
    assert canvas.shape == (ch, cw, 3)
    red = (canvas[..., 0] > 135) & (canvas[..., 2] < 110)
    rows, cols = np.nonzero(red)
    found = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    assert (np.abs(found - expected) <= 1).all(), (layout, (x0, y0, bw, bh), found, expected)
    checked += 1
  assert checked > 100
