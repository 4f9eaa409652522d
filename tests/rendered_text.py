"""The reference ink of words drawn the way the built-in data draws them, for pixel checks."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def glyphs(word):
  """The word's ink with PIL's default font at size 10, no antialiasing, cropped to the ink."""
  fnt = ImageFont.load_default(size=10)
  canvas = Image.new("L", (12 * len(word) + 20, 30), 0)
  draw = ImageDraw.Draw(canvas)
  draw.fontmode = "1"
  draw.text((10, 5), word, font=fnt, fill=255)
  ink = np.array(canvas) > 0
  rows, cols = np.nonzero(ink)
  return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
