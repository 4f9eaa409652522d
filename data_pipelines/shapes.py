"""The built-in dataset: generated images of coloured shapes with questions about them.

Each example is a pure function of (seed, split, index): no files, no download, the
same bytes on every machine. An image has 1-3 shapes (circle, square, triangle), each
a different shape and a different colour, that do not touch, on a plain background
whose colour is never a shape colour. So "the circle", "the red shape" and "the red
circle" each name exactly one object, and a colour's pixels are exactly that object.

Question kinds (answers read off the image):
  color   "What color is the circle?"          -> "red"
  shape   "Which shape is red?"                -> "circle"
  count   "How many shapes are there?"         -> "2"
  ground  "Where is the red circle?"           -> "[x1, y1, x2, y2]"  (coordinates.py)
  refer   "What shape is at [x, y]?"           -> "circle"
"""

import itertools

import numpy as np

from data_pipelines import coordinates

# Pure RGB values, no antialiasing: a shape's pixels equal its colour exactly.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 35),
    "purple": (140, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((255, 255, 255), (20, 20, 20), (128, 128, 128), (235, 225, 200), (70, 90, 110))

KINDS = ("color", "shape", "count", "ground", "refer")
# kind -> phrasings; the answer of a kind is always the same short form.
QUESTIONS = {
    "color": ("What color is the {shape}?", "Which color does the {shape} have?"),
    "shape": ("Which shape is {color}?", "What is the shape of the {color} object?"),
    "count": ("How many shapes are there?", "How many objects are in the image?"),
    "ground": ("Where is the {color} {shape}?", "Give the box of the {color} {shape}."),
    "refer": ("What shape is at {point}?", "Which object is at {point}?"),
}

# Different streams, so the splits never share an example.
SPLITS = {"train": 0, "eval": 1}
MAX_SHAPES = 3
MIN_IMAGE_SIZE = 16


def _mask(shape: str, size: int) -> np.ndarray:
  """[size, size] bool; every shape touches all four sides of its box."""
  rows, cols = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
  if shape == "square":
    return np.ones((size, size), bool)
  if shape == "circle":
    c = size / 2
    return (rows - c) ** 2 + (cols - c) ** 2 <= c * c + 0.5  # +0.5: keep the edge pixels at the 4 sides
  if shape == "triangle":  # apex up: row r spans half-width (r + 1) / 2 around the centre
    return np.abs(cols - size / 2) <= (np.floor(rows) + 1) / 2
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _inner_pixel(mask: np.ndarray) -> tuple[int, int]:
  """(row, col) of the mask pixel nearest the mask's centroid: always inside the shape."""
  rows, cols = np.nonzero(mask)
  i = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
  return int(rows[i]), int(cols[i])


def _place(rng: np.random.Generator, image_size: int, count: int) -> list[tuple[int, int, int]]:
  """(x, y, size) of up to `count` boxes at least one pixel apart."""
  lo, hi = max(4, image_size // 5), max(4, image_size * 2 // 5)
  boxes = []
  for _ in range(50 * count):  # rejection sampling, bounded: fewer shapes if crowded
    if len(boxes) == count:
      break
    s = int(rng.integers(lo, hi + 1))
    x, y = (int(v) for v in rng.integers(0, image_size - s + 1, size=2))
    if all(x + s < bx or bx + bs < x or y + s < by or by + bs < y for bx, by, bs in boxes):
      boxes.append((x, y, s))
  return boxes


def generate(seed: int, split: str, index: int, image_size: int) -> dict:
  """One example: image uint8 [S, S, 3], question, answer, kind, objects (ground truth)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {sorted(SPLITS)}")
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size={image_size} is too small for the shapes dataset; use >= {MIN_IMAGE_SIZE}")
  rng = np.random.default_rng((seed, SPLITS[split], index))
  background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
  image = np.empty((image_size, image_size, 3), np.uint8)
  image[:] = background
  boxes = _place(rng, image_size, int(rng.integers(1, MAX_SHAPES + 1)))
  shapes = rng.permutation(len(SHAPES))[:len(boxes)]
  colors = rng.permutation(len(COLORS))[:len(boxes)]
  objects = []
  for (x, y, s), shape_i, color_i in zip(boxes, shapes, colors):
    shape, color = SHAPES[shape_i], list(COLORS)[color_i]
    mask = _mask(shape, s)
    image[y:y + s, x:x + s][mask] = COLORS[color]
    row, col = _inner_pixel(mask)
    objects.append(dict(shape=shape, color=color, box=(x, y, x + s, y + s), center=(x + col, y + row)))

  kind = KINDS[rng.integers(len(KINDS))]
  template = QUESTIONS[kind][rng.integers(len(QUESTIONS[kind]))]
  obj = objects[rng.integers(len(objects))]
  cx, cy = obj["center"]
  question = template.format(
      shape=obj["shape"], color=obj["color"],
      point=coordinates.format_point((cx + 0.5, cy + 0.5), image_size, image_size))
  answer = {
      "color": obj["color"],
      "shape": obj["shape"],
      "count": str(len(objects)),
      "ground": coordinates.format_box(obj["box"], image_size, image_size),
      "refer": obj["shape"],
  }[kind]
  return dict(image=image, question=question, answer=answer, kind=kind, objects=objects)


class ShapesSource:
  """Grain random-access source: `len` and `[index]` -> `generate(...)` dict."""

  def __init__(self, split: str, num_examples: int, image_size: int, seed: int = 0):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}: expected one of {sorted(SPLITS)}")
    self.split, self.num_examples, self.image_size, self.seed = split, num_examples, image_size, seed

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self}")
    return generate(self.seed, self.split, int(index), self.image_size)

  def __repr__(self) -> str:
    return (f"ShapesSource(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed})")


def corpus() -> list[str]:
  """Every question phrasing with every filler, and every answer form: the tokenizer's text."""
  lines = []
  fillers = dict(point=coordinates.POINT_FORMAT.format(0, 1))
  for template in itertools.chain(*QUESTIONS.values()):
    for shape, color in itertools.product(SHAPES, COLORS):
      lines.append(template.format(shape=shape, color=color, **fillers))
  lines += list(SHAPES) + list(COLORS)
  lines.append(coordinates.BOX_FORMAT.format(1, 2, 3, 4))
  return list(dict.fromkeys(lines))  # unique, order kept
