"""UI-like screenshots: tall phone screens with a title bar and a column of widgets
(buttons, text fields, toggles, checkboxes, each with a label), for referring and
grounding on widgets (MM1.5-UI, experiments/mm15_ui.py).

Screens are 72..108 px wide times image_scale and 1.8 to 3 times as tall (widened or
lengthened when the widgets need it). Widgets are stacked top to bottom, one per row,
with background rows between them, so each widget's box (pixel edges of everything drawn
for it, label included) is exactly one band of non-background rows; labels are unique on
a screen, so "the Save button" names one widget. Pure colours, no antialiasing.
"""

import numpy as np

from data_pipelines import coordinates
from data_pipelines.builtin import scenes, source
from data_pipelines.builtin.source import IMAGE_MARKER

TYPES = ("button", "text field", "toggle", "checkbox")
LABELS = {
    "button": ("Save", "Cancel", "Send", "Next", "Back", "Done", "Login", "Share", "Edit", "Delete"),
    "text field": ("Name", "Email", "Search", "Phone", "City", "Password"),
    "toggle": ("Wi-Fi", "Sound", "Alerts", "Sync", "GPS", "Bluetooth"),
    "checkbox": ("Agree", "Remember", "Subscribe", "Public", "Notify"),
}
TITLES = ("Settings", "Profile", "Account", "Inbox", "Home")
# Per theme: background, text, field outline and placeholder, toggle off, check/toggle knob.
THEMES = {
    "light": dict(background=(250, 250, 250), ink=(30, 30, 30), field=(150, 150, 150), off=(110, 110, 110)),
    "dark": dict(background=(25, 25, 30), ink=(235, 235, 235), field=(120, 120, 120), off=(90, 90, 90)),
}
ACCENTS = {"blue": (40, 100, 220), "green": (30, 150, 80), "red": (200, 50, 50)}
ON = (50, 180, 90)
KNOB = (255, 255, 255)
BUTTON_TEXT = (255, 255, 255)
MIN_W, MAX_W = 72, 108
MIN_RATIO, MAX_RATIO = 1.8, 3.0


class Widget:
  """kind, label, box (pixel edges), state ("on"/"off", "checked"/"unchecked", ""), point:
  (x, y) in pixels on the control itself (button, field, switch or check box)."""

  def __init__(self, kind, label, box, state="", point=None):
    self.kind, self.label, self.box, self.state = kind, label, tuple(int(v) for v in box), state
    self.point = point

  @property
  def name(self) -> str:
    return f"{self.label} {self.kind}"


def _paint(image, x, y, mask, color):
  image[y:y + mask.shape[0], x:x + mask.shape[1]][mask] = color


def _plan(rng, kind, label, fnt, unit):
  """(width, height, draw) of one widget, width its minimum; draw(image, x, y, theme, width)
  paints it and returns (state, (x, y) of a pixel-space point on the control)."""
  text = scenes.word_mask(label, fnt)
  th, tw = text.shape
  pad = max(2, round(3 * unit))
  if kind == "button":
    w, h = tw + 4 * pad, th + 2 * pad
    accent = ACCENTS[list(ACCENTS)[rng.integers(len(ACCENTS))]]

    def draw(image, x, y, theme, width):
      image[y:y + h, x:x + width] = accent
      _paint(image, x + (width - tw) // 2, y + pad, text, BUTTON_TEXT)
      return "", (x + width / 2, y + h / 2)
    return w, h, draw
  if kind == "text field":
    w, h = tw + 4 * pad, th + 2 * pad

    def draw(image, x, y, theme, width):
      image[y:y + h, x:x + width] = theme["field"]  # a 1 px outline around the field's inside
      image[y + 1:y + h - 1, x + 1:x + width - 1] = theme["background"]
      _paint(image, x + pad, y + pad, text, theme["field"])
      return "", (x + width / 2, y + h / 2)
    return w, h, draw
  side = th + 2  # switch height / checkbox side
  if kind == "toggle":
    on = bool(rng.random() < 0.5)
    w, h = tw + pad + 2 * side, side

    def draw(image, x, y, theme, width):
      _paint(image, x, y + (h - th) // 2, text, theme["ink"])
      sx = x + width - 2 * side  # the switch at the right end, its knob on the state's side
      image[y:y + side, sx:sx + 2 * side] = ON if on else theme["off"]
      kx = sx + (side if on else 0)
      image[y + 2:y + side - 2, kx + 2:kx + side - 2] = KNOB
      return "on" if on else "off", (sx + side, y + side / 2)  # the switch's middle
    return w, h, draw
  if kind == "checkbox":
    checked = bool(rng.random() < 0.5)
    w, h = side + pad + tw, side

    def draw(image, x, y, theme, width):
      image[y:y + side, x:x + side] = theme["ink"]
      image[y + 1:y + side - 1, x + 1:x + side - 1] = theme["background"]
      if checked:
        image[y + 3:y + side - 3, x + 3:x + side - 3] = ACCENTS["blue"]
      _paint(image, x + side + pad, y + (h - th) // 2, text, theme["ink"])
      return "checked" if checked else "unchecked", (x + side / 2, y + side / 2)  # the box's middle
    return w, h, draw
  raise ValueError(f"unknown widget kind {kind!r}; expected one of {TYPES}")


def draw_screen(rng, scale: float):
  """-> (image uint8 [h, w, 3], theme name, title, [Widget] top to bottom)."""
  fnt = scenes.font(scale)
  count = int(rng.integers(3, 7))
  kinds = [TYPES[i] for i in rng.integers(len(TYPES), size=count)]
  labels, plans = [], []
  for kind in kinds:
    options = [label for label in LABELS[kind] if label not in labels]
    labels.append(options[rng.integers(len(options))])
    plans.append(_plan(rng, kind, labels[-1], fnt, scale))
  title = TITLES[rng.integers(len(TITLES))]
  title_text = scenes.word_mask(title, fnt)
  margin, gap = max(2, round(4 * scale)), max(2, round(3 * scale))
  title_h = title_text.shape[0] + 2 * margin
  need_w = max([w for w, _, _ in plans] + [title_text.shape[1]]) + 2 * margin
  need_h = title_h + sum(h for _, h, _ in plans) + gap * (count + 1)
  width = max(need_w, int(rng.integers(round(MIN_W * scale), round(MAX_W * scale) + 1)))
  height = max(need_h, round(width * rng.uniform(MIN_RATIO, MAX_RATIO)))
  theme_name = list(THEMES)[rng.integers(len(THEMES))]
  theme = THEMES[theme_name]
  image = np.empty((height, width, 3), np.uint8)
  image[:] = theme["background"]
  image[:title_h] = ACCENTS["blue"]
  _paint(image, margin, margin, title_text, BUTTON_TEXT)
  # Spare height goes to random extra gaps above the widgets (what is left stays at the bottom).
  extra = np.diff(np.sort(rng.integers(0, height - need_h + 1, size=count)), prepend=0)
  y, widgets = title_h + gap, []
  for (kind, label), (w, h, draw), dy in zip(zip(kinds, labels), plans, extra):
    y += int(dy)
    wide = int(rng.integers(w, width - 2 * margin + 1)) if kind in ("text field", "toggle") else w
    x = int(rng.integers(margin, width - margin - wide + 1))
    state, point = draw(image, x, y, theme, wide)
    widgets.append(Widget(kind, label, (x, y, x + wide, y + h), state, point))
    y += h + gap
  return image, theme_name, title, widgets


def _point(widget, image):
  return coordinates.format_point(widget.point, image.shape[1], image.shape[0])


def _box(widget, image):
  return coordinates.format_box(widget.box, image.shape[1], image.shape[0])


def _turn(rng, kind, widget, widgets, image):
  """One (question, answer) about a widget, or None when it does not apply."""
  if kind == "what_point":
    return f"What is at {_point(widget, image)}?", widget.name
  if kind == "what_box":
    return f"What widget is in {_box(widget, image)}?", widget.name
  if kind == "read":
    if widget.kind != "button":
      return None
    return f"What does the button at {_point(widget, image)} say?", widget.label
  if kind == "state":
    if widget.kind == "toggle":
      return f"Is the {widget.label} toggle on or off?", widget.state
    if widget.kind == "checkbox":
      return f"Is the {widget.label} checkbox checked?", "yes" if widget.state == "checked" else "no"
    return None
  if kind == "ground":
    template = ("Where is the {}?", "Give the box of the {}.")[rng.integers(2)]
    same_kind = [w for w in widgets if w.kind == widget.kind]
    phrase = widget.kind if len(same_kind) == 1 and rng.random() < 0.3 else widget.name
    return template.format(phrase), _box(widget, image)
  raise ValueError(kind)


KINDS = ("what_point", "what_box", "read", "state", "ground", "ground")  # grounding twice as often


class UI(source.Source):
  """conversation, refer_ground, coords image: referring and grounding on screen widgets."""
  stream = 11

  def generate(self, rng):
    image, _, _, widgets = draw_screen(rng, self.image_scale)
    turns = []
    # A different widget per turn, so no turn gives away another's answer.
    for i in rng.permutation(len(widgets))[:source.num_turns(rng)]:
      turn = None
      while turn is None:  # "what_point", "what_box" and "ground" fit every widget
        turn = _turn(rng, KINDS[rng.integers(len(KINDS))], widgets[i], widgets, image)
      turns.append(turn)
    return source.record("conversation", source.chat(turns, IMAGE_MARKER + "\n"), [image], category="refer_ground",
                         coords="image")
