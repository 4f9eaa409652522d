"""Boxes and points in a generated answer -> pixels of the original image.

The model writes Ferret coordinates on the 0..1000 scale of the AnyRes canvas it saw
(data_pipelines/coordinates.py); `coordinates.canvas_to_image` takes them to the image's
0..1000 scale, and the image's size to pixels (x by width, y by height).
"""

import re

from data_pipelines import coordinates

_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_CLAUSE = re.compile(r"[,;:\n]")


def to_pixels(values, layout) -> tuple[float, ...]:
  """(x, y, ...) on the canvas 0..1000 -> pixels of the image `layout` was planned for."""
  h, w = layout.image_hw
  image = coordinates.canvas_to_image(values, layout)
  return tuple(v * (w if i % 2 == 0 else h) / coordinates.CANVAS for i, v in enumerate(image))


def _label(span: str) -> str:
  """The phrase a box is attached to: the last clause of the text before it."""
  return _CLAUSE.split(span)[-1].strip(" .")[-40:]


def parse_answer(text: str, layout=None) -> tuple[list, list, list]:
  """(raw_coords, boxes, labels): every box `[x1, y1, x2, y2]` / point `[x, y]` with values in
  0..1000 as written, mapped to pixels when `layout` (the first image's) is given (else no
  boxes), and the phrase before each one."""
  raw, labels, end = [], [], 0
  for match in _BRACKETS.finditer(text):
    found = coordinates.parse(match.group(0))
    if len(found) != 1 or len(found[0]) not in (2, 4) or max(found[0]) > coordinates.CANVAS:
      continue
    raw.append(found[0])
    labels.append(_label(text[end:match.start()]))
    end = match.end()
  boxes = [to_pixels(c, layout) for c in raw] if layout is not None else []
  return raw, boxes, labels
