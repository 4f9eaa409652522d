"""Draw an answer's boxes and points, with their labels, on the original image (PIL)."""

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines import storage

COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def render(image, answer_or_boxes, labels=None, path=None, *, min_side: int = 256) -> Image.Image:
  """Boxes (x1, y1, x2, y2) and points (x, y) in pixels of `image` (uint8 [H, W, 3] or PIL),
  from an Answer (its boxes and labels) or a list; writes a PNG to `path` when given and
  returns the drawing. Small images are scaled up (nearest) so labels stay legible."""
  boxes = getattr(answer_or_boxes, "boxes", answer_or_boxes)
  if labels is None:
    labels = getattr(answer_or_boxes, "labels", None) or [str(i + 1) for i in range(len(boxes))]
  picture = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  scale = max(1, math.ceil(min_side / min(picture.size)))
  picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
  draw = ImageDraw.Draw(picture)
  font = ImageFont.load_default()
  for i, box in enumerate(boxes):
    color = COLORS[i % len(COLORS)]
    xy = [v * scale for v in box]
    if len(xy) == 4:
      draw.rectangle(xy, outline=color, width=2)
    else:
      r = 4
      draw.ellipse((xy[0] - r, xy[1] - r, xy[0] + r, xy[1] + r), outline=color, width=2)
    label = labels[i] if i < len(labels) and labels[i] else str(i + 1)
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    x, y = xy[0], max(0, xy[1] - (bottom - top) - 4)  # above the box, inside the picture
    draw.rectangle((x, y, x + right - left + 4, y + bottom - top + 4), fill=color)
    draw.text((x + 2 - left, y + 2 - top), label, fill=(255, 255, 255), font=font)
  if path is not None:
    with storage.open_file(path, "wb") as f:
      picture.save(f, format="PNG")
  return picture
