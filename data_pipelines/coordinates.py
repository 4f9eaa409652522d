"""Coordinates as plain text, Ferret's format: `[x1, y1, x2, y2]` boxes, `[x, y]` points.

Integers on a virtual CANVAS x CANVAS canvas, [0, 0] top-left, so the same text means the
same place whatever the image resolution (docs/recipe.md, "Coordinates").
A pixel box is given by its edges: column x covers [x, x + 1), so a box of pixels
x_min..x_max maps to [x_min, x_max + 1).
"""

import re

CANVAS = 1000
BOX_FORMAT = "[{}, {}, {}, {}]"
POINT_FORMAT = "[{}, {}]"

_NUMBER_LIST = re.compile(r"\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]")


def to_canvas(value: float, size: int) -> int:
  """A pixel coordinate in [0, size] to the canvas, rounded half up."""
  return int(value * CANVAS / size + 0.5)


def from_canvas(value: int, size: int) -> float:
  return value * size / CANVAS


def format_box(box, width: int, height: int) -> str:
  """box: pixel edges (x1, y1, x2, y2) of an image of width x height."""
  x1, y1, x2, y2 = box
  return BOX_FORMAT.format(to_canvas(x1, width), to_canvas(y1, height), to_canvas(x2, width), to_canvas(y2, height))


def format_point(point, width: int, height: int) -> str:
  """point: (x, y) in pixels; a pixel's centre is (col + 0.5, row + 0.5)."""
  x, y = point
  return POINT_FORMAT.format(to_canvas(x, width), to_canvas(y, height))


def parse(text: str) -> list[tuple[int, ...]]:
  """Every bracketed integer list in text, in order: boxes give 4-tuples, points 2-tuples."""
  return [tuple(int(v) for v in m.group(1).split(",")) for m in _NUMBER_LIST.finditer(text)]


# Under AnyRes the model sees a padded canvas (the sub-image grid, or the single tile), so
# coordinates in the text are relative to that canvas (docs/recipe.md: n_min = 1 at inference
# breaks refer & ground). The resize maps the image's extent [0, w] onto [0, resized_w] of
# the canvas (PIL's convention), so on the 0..CANVAS scale an x value v of the image is
# v * resized_w / canvas_w of the canvas; y likewise. Results are rounded half up, as
# to_canvas. Round-trip error, in units: image -> canvas -> image <= 0.5 * canvas_w /
# resized_w + 0.5 (a padded axis compresses the image); canvas -> image -> canvas <= 1.
# `layout` is an anyres.Layout (only resized_hw and canvas_hw are read).


def _scales(layout) -> tuple[tuple[int, int], tuple[int, int]]:
  """((numerator, denominator) for x, for y): image value * num / den = canvas value."""
  (rh, rw), (ch, cw) = layout.resized_hw, layout.canvas_hw
  return (rw, cw), (rh, ch)


def _round_ratio(value: int, num: int, den: int) -> int:
  return (2 * value * num + den) // (2 * den)  # value * num / den rounded half up, exact


def image_to_canvas(values, layout) -> tuple[int, ...]:
  """(x, y, ...) on 0..CANVAS of the image -> the same place on 0..CANVAS of the padded canvas."""
  scales = _scales(layout)
  return tuple(_round_ratio(int(v), *scales[i % 2]) for i, v in enumerate(values))


def canvas_to_image(values, layout) -> tuple[int, ...]:
  """(x, y, ...) on 0..CANVAS of the padded canvas -> 0..CANVAS of the image (what a model's
  answer goes through). A place in the padding is clamped to the image's edge."""
  scales = _scales(layout)
  return tuple(min(CANVAS, _round_ratio(int(v), scales[i % 2][1], scales[i % 2][0])) for i, v in enumerate(values))


def remap_text(text: str, layout) -> str:
  """Every Ferret box `[x1, y1, x2, y2]` / point `[x, y]` in text rewritten image -> canvas.

  Bracketed lists of other lengths, or with a value above CANVAS, are not coordinates and
  are left as they are.
  """
  def rewrite(match):
    values = tuple(int(v) for v in match.group(1).split(","))
    if len(values) not in (2, 4) or max(values) > CANVAS:
      return match.group(0)
    mapped = image_to_canvas(values, layout)
    return (BOX_FORMAT if len(values) == 4 else POINT_FORMAT).format(*mapped)

  return _NUMBER_LIST.sub(rewrite, text)
