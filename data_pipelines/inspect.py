"""See what the model sees: N examples of a config's mixture as PNGs plus a JSON summary.

  python -m data_pipelines.inspect --config=experiments/tiny.py --num=8 --out=/tmp/inspect
  python -m data_pipelines.inspect --config=experiments/mm15_3b.py:sft --num=4 --out=DIR --split=eval \
      --config.data.sources.text_rich.paths=...

Each example goes through the trainer's own stages (mixture.mixed_records, records.decode_or_skip,
sequence.ExampleBuilder), unpacked. `DIR/example_{i:04d}.png` shows each image as the model gets
it, one image per row of panels:

  [ canvas: the sub-image tiles re-assembled, AnyRes grid drawn ] [gap] [ overview tile ]

(an unsplit image is one tile: its panel is that tile alone). The canvas of image k starts at
x = 0, y = sum of the earlier rows' heights + GAP each; every pixel is repeated `zoom` times.
Boxes `[x1, y1, x2, y2]` and points `[x, y]` in the text are parsed AFTER the canvas remap the
builder does (coordinates.remap_text with the image's layout), so they are drawn where the
model is taught they are, labelled by their order in the text (#1, #2, ...; colour
BOX_COLORS[n % len]); on the overview tile too, mapped back through the image.

`DIR/examples.json` is a list with, per example: index, kind, category, num_tokens,
num_image_tokens (len(image_slots)), num_loss_tokens, text (decoded tokens, each run of
<image> ids written `<image>*K`), png, zoom, and per image: size [h, w], grid [rows, cols]
([0, 0]: not split, one tile), num_tiles, canvas_hw, canvas_xy (top-left in the PNG, zoomed
pixels), in_example (false when data.overlong="truncate" cut it). A record that failed to
decode or is malformed has `skipped` (the reason) instead; an overlong one dropped by the
builder has `dropped`.
"""

import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines import anyres as anyres_lib
from data_pipelines import coordinates, mixture, records
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.sequence import ExampleBuilder

GAP = 8  # pixels between panels and between image rows
BACKGROUND = (255, 255, 255)
GRID_COLOR = (0, 160, 255)
# Not shape or background colours of the built-in data, so the marks stand out.
BOX_COLORS = ((255, 0, 255), (255, 140, 0), (0, 255, 0), (0, 255, 255), (255, 90, 140))
BOX_WIDTH = 2
POINT_RADIUS = 4
TARGET_TILE_PX = 256  # auto zoom: tiles drawn at least about this large


def auto_zoom(tile: int) -> int:
  return max(1, TARGET_TILE_PX // tile)


def marks(record: dict, layouts) -> list[tuple[int, ...]]:
  """Ferret boxes/points of the text on 0..1000 of the canvas, in text order (sequence.py
  remaps only records with coords == "image" and one image; others have none to draw)."""
  if record.get("coords") != "image" or len(layouts) != 1:
    return []
  out = []
  for m in record["messages"]:
    for v in coordinates.parse(coordinates.remap_text(m["content"], layouts[0])):
      if len(v) in (2, 4) and max(v) <= coordinates.CANVAS:
        out.append(v)
  return out


def to_pixels(values, width: int, height: int) -> tuple[int, ...]:
  """Canvas units (0..1000) -> pixel indices of a width x height picture. A box's pixel
  edges [X1, X2) cover columns floor(X1)..ceil(X2)-1; a point is the pixel it falls in."""
  def px(v, size, last_edge=False):
    x = v * size / coordinates.CANVAS
    x = math.ceil(x) - 1 if last_edge else math.floor(x)
    return min(max(x, 0), size - 1)
  if len(values) == 2:
    return px(values[0], width), px(values[1], height)
  x1, y1, x2, y2 = values
  return px(x1, width), px(y1, height), px(x2, width, True), px(y2, height, True)


def _draw_marks(draw: ImageDraw.ImageDraw, values_list, xy, wh, font, labels: bool = True) -> None:
  """Labels first, outlines last, so an outline's pixels are exactly its colour."""
  (ox, oy), (w, h) = xy, wh
  shapes = []
  for n, values in enumerate(values_list):
    color = BOX_COLORS[n % len(BOX_COLORS)]
    p = to_pixels(values, w, h)
    shapes.append((p, color))
    if labels:
      text = f"#{n + 1}"
      tx, ty = ox + p[0] + 2, oy + max(p[1] - 12, 0)
      box = draw.textbbox((tx, ty), text, font=font)
      draw.rectangle(box, fill=(0, 0, 0))
      draw.text((tx, ty), text, fill=color, font=font)
  for p, color in shapes:
    if len(p) == 4:
      draw.rectangle((ox + p[0], oy + p[1], ox + p[2], oy + p[3]), outline=color, width=BOX_WIDTH)
    else:
      x, y, r = ox + p[0], oy + p[1], POINT_RADIUS
      draw.line((x - r, y, x + r, y), fill=color, width=BOX_WIDTH)
      draw.line((x, y - r, x, y + r), fill=color, width=BOX_WIDTH)


def _zoomed(tile_or_canvas: np.ndarray, zoom: int) -> Image.Image:
  image = Image.fromarray(tile_or_canvas)
  return image if zoom == 1 else image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)


def panel_sizes(layout: anyres_lib.Layout, zoom: int) -> tuple[int, int]:
  """(h, w) in the PNG of one image's row of panels."""
  ch, cw = layout.canvas_hw
  t = layout.tile
  if layout.split and layout.overview:
    return max(ch, t) * zoom, cw * zoom + GAP + t * zoom
  return ch * zoom, cw * zoom


def render(tiles: np.ndarray, layouts, mark_values, zoom: int) -> tuple[Image.Image, list[tuple[int, int]]]:
  """The example's picture and each image's canvas top-left (x, y). tiles: the Example's
  tiles of these layouts, in order."""
  sizes = [panel_sizes(layout, zoom) for layout in layouts]
  height = sum(h for h, _ in sizes) + GAP * (len(sizes) - 1)
  width = max(w for _, w in sizes)
  picture = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(picture)
  font = ImageFont.load_default()
  origins, y, start = [], 0, 0
  for k, layout in enumerate(layouts):
    own = tiles[start:start + layout.num_tiles]
    start += layout.num_tiles
    canvas = anyres_lib.assemble_canvas(own, layout)
    picture.paste(_zoomed(canvas, zoom), (0, y))
    ch, cw = canvas.shape[0] * zoom, canvas.shape[1] * zoom
    if layout.split:
      rows, cols = layout.grid
      step = layout.tile * zoom
      for c in range(cols + 1):
        x = min(c * step, cw - 1)
        draw.line((x, y, x, y + ch - 1), fill=GRID_COLOR)
      for r in range(rows + 1):
        yy = y + min(r * step, ch - 1)
        draw.line((0, yy, cw - 1, yy), fill=GRID_COLOR)
    here = mark_values if k == 0 else []
    _draw_marks(draw, here, (0, y), (cw, ch), font)
    if layout.split and layout.overview:
      ox, t = cw + GAP, layout.tile * zoom
      picture.paste(_zoomed(own[-1], zoom), (ox, y))
      # The overview holds the whole image at overview_hw: canvas -> image -> overview pixels.
      oh, ow = layout.overview_hw
      on_image = [coordinates.canvas_to_image(v, layout) for v in here]
      _draw_marks(draw, on_image, (ox, y), (ow * zoom, oh * zoom), font, labels=False)
      draw.rectangle((ox, y, ox + t - 1, y + t - 1), outline=GRID_COLOR)
    origins.append((0, y))
    y += sizes[k][0] + GAP
  return picture, origins


def image_text(tokenizer, tokens) -> str:
  """Decoded tokens with each run of <image> ids written `<image>*K`."""
  out, i, tokens = [], 0, [int(t) for t in tokens]
  while i < len(tokens):
    j = i
    if tokens[i] == tokenizer.image_id:
      while j < len(tokens) and tokens[j] == tokenizer.image_id:
        j += 1
      out.append(f"{tokenizer_lib.IMAGE_TOKEN}*{j - i}")
    else:
      while j < len(tokens) and tokens[j] != tokenizer.image_id:
        j += 1
      out.append(tokenizer.decode(tokens[i:j]))
    i = j
  return " ".join(s for s in out if s)


def _malformed_reason(record) -> str:
  try:
    records.validate({k: v for k, v in record.items() if k in ("kind", "messages", "images", "category", "coords")})
  except records.MalformedRecord as e:
    return f"MalformedRecord: {e}"
  return "MalformedRecord: rejected by the sequence builder (markers/roles)"


def inspect(config, num: int, out_dir: str, split: str = "train", *, tokenizer=None,
            zoom: int | None = None) -> list[dict]:
  """Writes the PNGs and examples.json (module docstring) for the first `num` items of the
  config's mixture; returns the list written to examples.json."""
  if num < 1:
    raise ValueError(f"--num={num}: inspect at least one example")
  if split not in ("train", "eval"):
    raise ValueError(f"--split={split!r}: expected 'train' or 'eval'")
  tokenizer = tokenizer or tokenizer_lib.tokenizer_for_config(config)
  builder = ExampleBuilder.from_config(config, tokenizer)
  tile = config.model.vit.image_size
  zoom = zoom or auto_zoom(tile)
  ds = mixture.mixed_records(config, split)
  os.makedirs(out_dir, exist_ok=True)
  entries = []
  for i in range(num):
    item = ds[i]
    if isinstance(item, (bytes, bytearray)):
      record, reason = records.decode_or_skip(bytes(item))
      if record is None:
        entries.append(dict(index=i, skipped=reason))
        continue
    else:
      record = item
    entry = dict(index=i, kind=record.get("kind"), category=record.get("category", ""))
    example = builder(record)
    if example is not None and int(example["skipped"]):
      entries.append(dict(entry, skipped=_malformed_reason(record)))
      continue
    images = record.get("images", [])
    layouts = anyres_lib.plan_images([im.shape[:2] for im in images], tile=tile, anyres=builder.anyres)
    if example is None:
      need = sum(layout.num_tiles for layout in layouts)
      entries.append(dict(entry, dropped=f"overlong: more than data.seq_len={builder.seq_len} tokens or "
                                         f"data.max_tiles={builder.max_tiles} tiles (needs {need} tiles)"))
      continue
    # Truncation keeps a prefix of the images (with all their tiles).
    kept, count = 0, 0
    while kept < len(layouts) and count + layouts[kept].num_tiles <= len(example["tiles"]):
      count += layouts[kept].num_tiles
      kept += 1
    entry.update(num_tokens=int(len(example["tokens"])), num_image_tokens=int(len(example["image_slots"])),
                 num_loss_tokens=int(example["loss_on"].sum()), text=image_text(tokenizer, example["tokens"]),
                 zoom=zoom, images=[])
    origins = []
    if kept:
      picture, origins = render(example["tiles"], layouts[:kept], marks(record, layouts[:kept]), zoom)
      entry["png"] = f"example_{i:04d}.png"
      picture.save(os.path.join(out_dir, entry["png"]))
    for k, layout in enumerate(layouts):
      entry["images"].append(dict(size=[int(s) for s in layout.image_hw], grid=list(layout.grid),
                                  num_tiles=layout.num_tiles, canvas_hw=list(layout.canvas_hw),
                                  canvas_xy=list(origins[k]) if k < kept else None, in_example=k < kept))
    entries.append(entry)
  path = os.path.join(out_dir, "examples.json")
  with open(path + ".tmp", "w") as f:
    json.dump(entries, f, indent=1)
  os.replace(path + ".tmp", path)
  return entries


def main(argv):
  from absl import flags

  del argv
  f = flags.FLAGS
  entries = inspect(f.config, f.num, f.out, f.split, zoom=f.zoom or None)
  for e in entries:
    if "skipped" in e or "dropped" in e:
      print(f"{e['index']:4d} {e.get('kind', '?'):12s} {'skipped' if 'skipped' in e else 'dropped'}: "
            f"{e.get('skipped') or e.get('dropped')}")
    else:
      grids = " ".join(f"{im['size'][0]}x{im['size'][1]}->{im['grid'][0]}x{im['grid'][1]}" for im in e["images"])
      print(f"{e['index']:4d} {e['kind']:12s} {e['num_tokens']:5d} tokens {e['num_image_tokens']:5d} image  {grids}")
  print(f"wrote {len(entries)} examples to {os.path.join(f.out, 'examples.json')}")


def define_flags():
  """Defined on demand, not at import: tests and the trainer import this module too."""
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Experiment file, FILE or FILE:arg (see experiments/); override "
                                  "fields with --config.FIELD=VALUE.", lock_config=True)
  flags.DEFINE_integer("num", 8, "Examples to write.")
  flags.DEFINE_string("out", None, "Output directory (PNGs and examples.json).")
  flags.DEFINE_enum("split", "train", ["train", "eval"], "Which split of the mixture.")
  flags.DEFINE_integer("zoom", 0, "Pixel repeat factor; 0: tiles drawn about 256 px.")


def run():  # `mm15-inspect` goes through mm15_jax.cli instead, for its --help
  from absl import app, flags

  define_flags()
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)


if __name__ == "__main__":
  run()
