"""Drawing for the built-in data: coloured shapes and rendered words on images of any size.

Pure RGB, no antialiasing, objects at least one pixel apart, a background colour that is
never a shape colour. So an object's pixels are exactly one connected region of its
colour, and its box (pixel edges) is that region's bounding box.
"""

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Pure RGB values, no antialiasing: a shape's pixels equal its colour exactly.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 35),
    "purple": (140, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "black": (20, 20, 20), "gray": (128, 128, 128),
               "beige": (235, 225, 200), "slate": (70, 90, 110)}
PLURALS = {shape: shape + "s" for shape in SHAPES}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Image sides are drawn from [MIN_SIDE, MAX_SIDE] * image_scale, independently, so aspect
# ratios run from 1:4 to 4:1 and AnyRes picks many different grids.
MIN_SIDE, MAX_SIDE = 24, 96
# Below 6 px a circle is indistinguishable from a square.
MIN_OBJECT = 6


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  box: tuple[int, int, int, int]  # pixel edges (x1, y1, x2, y2): columns x1..x2-1, rows y1..y2-1
  center: tuple[int, int]  # (x, y) of a pixel inside the shape, near its centroid

  @property
  def name(self) -> str:
    return f"{self.color} {self.shape}"



def shape_mask(shape: str, size: int) -> np.ndarray:
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


def inner_pixel(mask: np.ndarray) -> tuple[int, int]:
  """(row, col) of the mask pixel nearest the mask's centroid: always inside the shape."""
  rows, cols = np.nonzero(mask)
  i = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
  return int(rows[i]), int(cols[i])

def image_hw(rng: np.random.Generator, scale: float, min_hw=(0, 0)) -> tuple[int, int]:
  """(h, w), each uniform on [MIN_SIDE, MAX_SIDE] * scale and at least min_hw."""
  lo, hi = round(MIN_SIDE * scale), round(MAX_SIDE * scale)
  return tuple(int(rng.integers(max(lo, m), max(hi, m) + 1)) for m in min_hw)


def _place(rng, h: int, w: int, count: int, max_frac: float) -> list[tuple[int, int, int]]:
  """(x, y, size) of up to `count` squares at least one pixel apart (fewer if crowded)."""
  side = min(h, w)
  lo = max(MIN_OBJECT, side // 6)
  hi = max(lo, int(side * max_frac))
  boxes = []
  for _ in range(50 * count):  # rejection sampling, bounded
    if len(boxes) == count:
      break
    s = int(rng.integers(lo, hi + 1))
    x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    if all(x + s < bx or bx + bs < x or y + s < by or by + bs < y for bx, by, bs in boxes):
      boxes.append((x, y, s))
  return boxes


def draw_scene(rng, h: int, w: int, count: int, *, unique: bool = True, max_frac: float = 0.4):
  """-> (image uint8 [h, w, 3], background name, [Obj]).

  unique=True: every object a different shape and a different colour (at most 3), so
  "the circle", "the red shape" and "the red circle" each name exactly one object.
  unique=False: shapes and colours repeat (for counting).
  """
  background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
  image = np.empty((h, w, 3), np.uint8)
  image[:] = BACKGROUNDS[background]
  if unique:
    count = min(count, len(SHAPES))
  boxes = _place(rng, h, w, count, max_frac)
  if unique:
    shape_ids = rng.permutation(len(SHAPES))[:len(boxes)]
    color_ids = rng.permutation(len(COLORS))[:len(boxes)]
  else:
    shape_ids = rng.integers(len(SHAPES), size=len(boxes))
    color_ids = rng.integers(len(COLORS), size=len(boxes))
  objects = []
  for (x, y, s), shape_i, color_i in zip(boxes, shape_ids, color_ids):
    shape, color = SHAPES[shape_i], list(COLORS)[color_i]
    mask = shape_mask(shape, s)
    image[y:y + s, x:x + s][mask] = COLORS[color]
    row, col = inner_pixel(mask)
    objects.append(Obj(shape, color, (x, y, x + s, y + s), (x + col, y + row)))
  return image, background, objects


def left_to_right(objects: list[Obj]) -> list[Obj]:
  return sorted(objects, key=lambda o: (o.box[0], o.box[1]))


def with_article(phrase: str) -> str:
  return f"a {phrase}"


def join_list(items: list[str]) -> str:
  """["a", "b", "c"] -> "a, b and c"."""
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(background: str, objects: list[Obj]) -> str:
  """The scene's one deterministic caption: objects left to right, then the background."""
  if not objects:
    return f"An empty {background} background."
  text = join_list([with_article(o.name) for o in left_to_right(objects)])
  return f"{text[0].upper()}{text[1:]} on a {background} background."


def count_phrase(n: int, noun: str = "shape") -> str:
  return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# ----------------------------------------------------------------------------- words

# Light papers with dark inks and dark papers with light inks: always readable.
PAPERS = {"white": (255, 255, 255), "beige": (235, 225, 200), "black": (20, 20, 20), "slate": (70, 90, 110)}
INKS = {"black": (0, 0, 0), "red": (200, 20, 20), "blue": (30, 60, 200), "white": (250, 250, 250),
        "yellow": (245, 215, 35)}
INKS_ON = {"white": ("black", "red", "blue"), "beige": ("black", "red", "blue"),
           "black": ("white", "yellow"), "slate": ("white", "yellow")}
WORDS = ("cat", "dog", "sun", "sky", "red", "map", "car", "box", "tree", "bird", "fish", "book", "star",
         "moon", "road", "lamp", "door", "cake", "milk", "ship", "apple", "house", "water", "green", "stone",
         "chair", "plant", "bread", "clock", "train")


def font(scale: float):
  """PIL's embedded default font (no file, no download), sized with the images."""
  try:
    return ImageFont.load_default(size=max(8, round(10 * scale)))
  except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def word_mask(word: str, fnt) -> np.ndarray:
  """bool [h, w]: the word's ink, cropped to its pixels, rendered without antialiasing."""
  # getbbox is not the ink ("s" reaches x=-1; unantialiased "r" ends past `right`), so draw
  # on a canvas with room on every side and crop to the ink.
  size = getattr(fnt, "size", 11)
  canvas = Image.new("1", (2 * size * (len(word) + 1), 3 * size), 0)
  draw = ImageDraw.Draw(canvas)
  draw.fontmode = "1"
  draw.text((size, size // 2), word, font=fnt, fill=1)
  ink = np.array(canvas, bool)
  rows, cols = np.nonzero(ink)
  return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


@dataclasses.dataclass(frozen=True)
class Word:
  text: str
  ink: str
  box: tuple[int, int, int, int]  # pixel edges of its ink


def draw_words(rng, words: list[str], scale: float):
  """Each word on its own line, top to bottom (reading order), random indent and gaps.

  -> (image uint8 [h, w, 3], paper name, [Word]); the image is sized to fit the words.
  """
  fnt = font(scale)
  masks = [word_mask(w, fnt) for w in words]
  gap = max(2, round(2 * scale))
  need_h = sum(m.shape[0] for m in masks) + gap * (len(masks) + 1)
  need_w = max(m.shape[1] for m in masks) + 2 * gap
  h, w = image_hw(rng, scale, (need_h, need_w))
  paper = list(PAPERS)[rng.integers(len(PAPERS))]
  image = np.empty((h, w, 3), np.uint8)
  image[:] = PAPERS[paper]
  # Split the spare height randomly between the gaps above, between and below the lines.
  spare = h - need_h
  extra = np.diff(np.sort(rng.integers(0, spare + 1, size=len(masks))), prepend=0)
  y, placed = gap, []
  for word, mask, dy in zip(words, masks, extra):
    y += int(dy)
    mh, mw = mask.shape
    x = int(rng.integers(gap, w - mw - gap + 1))
    ink = INKS_ON[paper][rng.integers(len(INKS_ON[paper]))]
    image[y:y + mh, x:x + mw][mask] = INKS[ink]
    placed.append(Word(word, ink, (x, y, x + mw, y + mh)))
    y += mh + gap
  return image, paper, placed
