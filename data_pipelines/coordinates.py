"""Coordinates as plain text, Ferret's format: `[x1, y1, x2, y2]` boxes, `[x, y]` points.

Integers on a virtual CANVAS x CANVAS canvas, [0, 0] top-left, so the same text means the
same place whatever the image resolution (MM15_SPEC.md, "Referring and grounding").
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
