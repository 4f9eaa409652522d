"""Labelled tiles for pretraining the image encoder alone: which colours a tile shows, and where.

MM1.5 starts from an image encoder pretrained elsewhere (a CLIP ViT), whose patch tokens
already say what is where. The tiny experiments have no such encoder to import, so a first
stage can make one from the built-in scenes (`train.objective="object_boxes"`,
mm15_jax/train/encoder_stage.py, docs/recipe.md "A pretrained encoder for the tiny model").
The scenes are the grounding task's (1-3 shapes, each its own colour and shape, on images
of 24..96 px a side), each rendered as the model's single tile as AnyRes renders an image it
does not split (scaled to fit, padded); the labels are, per colour of scenes.COLORS, whether
an object of that colour is drawn and its box in tile units (0..1, x1, y1, x2, y2).
"""

import numpy as np

from data_pipelines import anyres
from data_pipelines.builtin import scenes

COLOR_NAMES = tuple(scenes.COLORS)


def labelled_tiles(rng: np.random.Generator, num: int, tile: int) -> dict:
  """{"tiles": uint8 [num, tile, tile, 3], "present": float32 [num, C], "boxes": float32
  [num, C, 4]} (C colours; a colour not drawn has present 0 and box 0)."""
  tiles = np.zeros((num, tile, tile, 3), np.uint8)
  present = np.zeros((num, len(COLOR_NAMES)), np.float32)
  boxes = np.zeros((num, len(COLOR_NAMES), 4), np.float32)
  for i in range(num):
    h, w = scenes.image_hw(rng, 1.0)
    image, _, objects = scenes.draw_scene(rng, h, w, int(rng.integers(1, 4)))
    layout = anyres.plan(h, w, tile=tile, n_min=1, n_max=1, split=False)
    tiles[i] = anyres.render_tiles(image, layout)[0]
    # The image is scaled to resized_hw at the canvas's top left: pixel edges scale with it.
    sy, sx = layout.resized_hw[0] / (h * tile), layout.resized_hw[1] / (w * tile)
    for obj in objects:
      c = COLOR_NAMES.index(obj.color)
      x1, y1, x2, y2 = obj.box
      present[i, c] = 1.0
      boxes[i, c] = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
  return dict(tiles=tiles, present=present, boxes=boxes)
