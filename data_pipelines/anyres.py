"""AnyRes dynamic image splitting (docs/recipe.md, "AnyRes: dynamic image splitting").

An image is resized (aspect preserved) to fit a canvas of rows x cols tiles, padded
right/bottom, cut into rows*cols sub-images (row-major), and followed by an overview:
the whole image resized to fit one tile. Pad, never stretch.

The grid rule (`choose_grid`), LLaVA-NeXT's select_best_resolution in exact arithmetic.
For a candidate grid (rows, cols), n_min <= rows*cols <= n_max, with canvas
(H, W) = (rows*tile, cols*tile), the fit scale is s = min(H/h, W/w) (the image is scaled
by s, up or down, until one side meets the canvas). The image's resolution after fit,
capped at the original (upscaling adds no information), is min(s, 1)^2 * h*w. Choose, in
order of priority:
  1. the largest effective scale min(s, 1): a grid that holds the image at full resolution
     (s >= 1) if there is one, else the one that loses the least resolution by downscaling;
  2. the fewest tiles: the spec's "least padding", rows*cols*tile^2 - h*w with h*w the
     resolution after fit (capped as above), so for full-resolution grids the padding
     counts the original pixels and a grid that only upscales more is never preferred;
  3. the largest s: among grids with equally many tiles, the one the fitted image fills
     best (least padding of the actually resized image);
  4. the first in (rows, cols) order: fewer rows, i.e. the wider grid, wins a full tie.
The scale is continuous (fractions, no rounding), so the choice never depends on how
the resized size rounds.

Resized size: the constrained side equals the canvas side exactly; the other side is
its original length times s rounded half up, clamped to [1, canvas side].

A 1x1 grid would repeat the overview, so `plan` then returns the unsplit layout: one tile.
"""

import dataclasses
import fractions

import numpy as np
from PIL import Image

# CLIP's mean colour: padding normalises to about 0 (what the encoder saw in training).
PAD_COLOR = (124, 116, 104)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where an image's pixels go.

  image_hw: (h, w) of the original image. tile: tile side in pixels.
  grid: (rows, cols) of sub-images; (0, 0) when not split.
  resized_hw: (h, w) of the resized image inside the canvas, top-left, padded right/bottom.
  overview: whether an overview tile follows the sub-images (when not split, the single
    tile is the overview: overview=True and num_tiles=1).
  """
  image_hw: tuple[int, int]
  tile: int
  grid: tuple[int, int]
  resized_hw: tuple[int, int]
  overview: bool = True

  @property
  def split(self) -> bool:
    return self.grid != (0, 0)

  @property
  def num_tiles(self) -> int:
    return self.grid[0] * self.grid[1] + int(self.overview) if self.split else 1

  @property
  def canvas_hw(self) -> tuple[int, int]:
    """The padded canvas that coordinates refer to: the sub-image grid, or the one tile."""
    if self.split:
      return (self.grid[0] * self.tile, self.grid[1] * self.tile)
    return (self.tile, self.tile)

  @property
  def overview_hw(self) -> tuple[int, int]:
    """(h, w) of the image inside the overview tile (== resized_hw when not split)."""
    return fit_hw(*self.image_hw, self.tile, self.tile)


def _check_size(h: int, w: int, tile: int) -> None:
  if h < 1 or w < 1:
    raise ValueError(f"image size (h, w) = ({h}, {w}): both sides must be >= 1 pixel")
  if tile < 1:
    raise ValueError(f"tile = {tile}: must be >= 1 pixel (config.model.vit.image_size)")


def fit_hw(h: int, w: int, canvas_h: int, canvas_w: int) -> tuple[int, int]:
  """(h, w) scaled by min(canvas_h/h, canvas_w/w): one side meets the canvas exactly,
  the other is rounded half up and kept in [1, canvas side]."""
  if canvas_h * w <= canvas_w * h:  # height-limited: canvas_h/h <= canvas_w/w
    return canvas_h, min(canvas_w, max(1, (2 * w * canvas_h + h) // (2 * h)))
  return min(canvas_h, max(1, (2 * h * canvas_w + w) // (2 * w))), canvas_w


def candidates(n_min: int, n_max: int) -> list[tuple[int, int]]:
  """All (rows, cols) with n_min <= rows*cols <= n_max, in (rows, cols) order."""
  if not 1 <= n_min <= n_max:
    raise ValueError(f"AnyRes (n_min, n_max) = ({n_min}, {n_max}): need 1 <= n_min <= n_max "
                     "(config.data.anyres.n_min / n_max)")
  return [(r, c) for r in range(1, n_max + 1) for c in range(1, n_max // r + 1) if r * c >= n_min]


def choose_grid(h: int, w: int, *, tile: int, n_min: int, n_max: int) -> tuple[int, int]:
  """The (rows, cols) grid for an h x w image; the rule is in the module docstring."""
  _check_size(h, w, tile)

  def key(grid):
    rows, cols = grid
    s = min(fractions.Fraction(rows * tile, h), fractions.Fraction(cols * tile, w))
    return (-min(s, 1), rows * cols, -s)  # min() keeps the first in (rows, cols) order on ties

  return min(candidates(n_min, n_max), key=key)


def plan(h: int, w: int, *, tile: int, n_min: int, n_max: int, split: bool) -> Layout:
  """The layout of one image: split into the chosen grid + overview, or one tile."""
  _check_size(h, w, tile)
  if split:
    rows, cols = choose_grid(h, w, tile=tile, n_min=n_min, n_max=n_max)
    if (rows, cols) != (1, 1):
      return Layout((h, w), tile, (rows, cols), fit_hw(h, w, rows * tile, cols * tile), overview=True)
  return Layout((h, w), tile, (0, 0), fit_hw(h, w, tile, tile), overview=True)


def _get(anyres, key, default):
  return anyres.get(key, default) if hasattr(anyres, "get") else getattr(anyres, key, default)


def plan_images(sizes, *, tile: int, anyres) -> list[Layout]:
  """Layouts of a sample's images. anyres = config.data.anyres (enabled, n_min, n_max,
  split_max_images=2): images are split only when AnyRes is enabled and the sample has at
  most split_max_images images (the spec: fewer than 3); otherwise each is one tile."""
  split = bool(_get(anyres, "enabled", False)) and len(sizes) <= _get(anyres, "split_max_images", 2)
  n_min, n_max = _get(anyres, "n_min", 1), _get(anyres, "n_max", 1)
  return [plan(int(h), int(w), tile=tile, n_min=n_min, n_max=n_max, split=split) for h, w in sizes]


def _resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  if tuple(image.shape[:2]) == tuple(hw):
    return image
  # Bicubic, as CLIP's preprocessing; PIL antialiases when downscaling.
  return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BICUBIC))


def _pad(image: np.ndarray, canvas_hw: tuple[int, int]) -> np.ndarray:
  canvas = np.empty((*canvas_hw, 3), np.uint8)
  canvas[:] = PAD_COLOR
  canvas[:image.shape[0], :image.shape[1]] = image
  return canvas


def render_canvas(image: np.ndarray, layout: Layout) -> np.ndarray:
  """uint8 [canvas_h, canvas_w, 3]: the resized image top-left, padding right/bottom."""
  return _pad(_resize(image, layout.resized_hw), layout.canvas_hw)


def render_tiles(image: np.ndarray, layout: Layout) -> np.ndarray:
  """uint8 [num_tiles, tile, tile, 3]: sub-images row-major, then the overview."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
  if tuple(image.shape[:2]) != tuple(layout.image_hw):
    raise ValueError(f"image is {image.shape[:2]} but the layout was planned for {layout.image_hw}")
  t = layout.tile
  overview = _pad(_resize(image, layout.overview_hw), (t, t))[None]
  if not layout.split:
    return overview
  rows, cols = layout.grid
  canvas = render_canvas(image, layout)
  tiles = canvas.reshape(rows, t, cols, t, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, t, t, 3)
  return np.concatenate([tiles, overview]) if layout.overview else tiles


def assemble_canvas(tiles: np.ndarray, layout: Layout) -> np.ndarray:
  """Inverse of the cut: the sub-image tiles back into the canvas (for inspection)."""
  if not layout.split:
    return tiles[0]
  rows, cols = layout.grid
  t = layout.tile
  return tiles[:rows * cols].reshape(rows, cols, t, t, 3).transpose(0, 2, 1, 3, 4).reshape(rows * t, cols * t, 3)
