"""Short clips of moving, appearing and flashing shapes, with questions only several frames answer.

A clip is MIN_FRAMES..MAX_FRAMES frames of one size (landscape 1:1, 4:3 or 16:9, 32..64 px
high times image_scale) on one background, with a target shape and sometimes a distractor
of another colour and another shape, so "the red circle" names one object. Records are
kind multi_image, one marker per frame, laid out by video_frames.video_prompt exactly as
MM1.5-Video inference lays out a real clip (frames "Image 1:" .. "Image N:" in time order).

  motion  "Which way does the red circle move?" -> left | right | up | down. The target moves
          in a straight line, at least one pixel per frame, across at least half of the room
          it has; any single frame shows only a position, and the reversed clip has the
          opposite answer.
  appear  "In which frame does the blue square appear?" -> "frame k", k >= 2: absent before
          frame k, still from frame k to the last. The first frame never shows it and the
          last always does, whatever k.
  count   "How many times does the green triangle appear?" -> "2": the number of runs of
          consecutive frames it is visible in (1 .. ceil(N / 2)), at one place.
Sometimes a follow-up: "How many frames are there?".
"""

import itertools

import numpy as np

from data_pipelines import video_frames
from data_pipelines.builtin import scenes, source

MIN_FRAMES, MAX_FRAMES = 4, 8
MIN_HEIGHT, MAX_HEIGHT = 32, 64
ASPECTS = (1.0, 4 / 3, 16 / 9)
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}  # (axis: 0 x / 1 y, sign)
KINDS = ("motion", "appear", "count")


def runs(visible) -> int:
  """Runs of consecutive True."""
  return sum(1 for v, prev in zip(visible, (False, *visible[:-1])) if v and not prev)


# Every visibility pattern of n frames by its number of runs, for drawing counts uniformly.
_PATTERNS = {n: {} for n in range(MIN_FRAMES, MAX_FRAMES + 1)}
for _n in _PATTERNS:
  for _p in itertools.product((False, True), repeat=_n):
    if any(_p):
      _PATTERNS[_n].setdefault(runs(_p), []).append(_p)


class _Track:
  """One shape through the clip: its top-left (x, y) per frame, None where it is hidden."""

  def __init__(self, shape, color, size, positions):
    self.shape, self.color, self.size, self.positions = shape, color, size, positions

  @property
  def name(self) -> str:
    return f"{self.color} {self.shape}"


def _frame_hw(rng, scale):
  h = int(rng.integers(round(MIN_HEIGHT * scale), round(MAX_HEIGHT * scale) + 1))
  return h, int(round(h * ASPECTS[rng.integers(len(ASPECTS))]))


def _still(rng, h, w, s, visible):
  x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
  return [(x, y) if v else None for v in visible]


def _moving(rng, h, w, s, n, direction):
  """A straight track along the direction's axis, one step of >= 1 px per frame."""
  axis, sign = DIRECTIONS[direction]
  room = (w, h)[axis] - s
  travel = int(rng.integers(max(n - 1, -(-room // 2)), room + 1))
  start = int(rng.integers(0, room - travel + 1))
  if sign < 0:
    start += travel
  along = [round(start + sign * travel * t / (n - 1)) for t in range(n)]
  across = int(rng.integers(0, (h, w)[axis] - s + 1))
  return [(a, across) if axis == 0 else (across, a) for a in along]


def _apart(a: _Track, b: _Track) -> bool:
  """At least one pixel between the two in every frame both show (as scenes._place)."""
  for pa, pb in zip(a.positions, b.positions):
    if pa is not None and pb is not None:
      (x, y), s, (bx, by), bs = pa, a.size, pb, b.size
      if not (x + s < bx or bx + bs < x or y + s < by or by + bs < y):
        return False
  return True


def _draw(h, w, background, tracks, n):
  frames = []
  for t in range(n):
    image = np.empty((h, w, 3), np.uint8)
    image[:] = scenes.BACKGROUNDS[background]
    for track in tracks:
      if track.positions[t] is not None:
        x, y = track.positions[t]
        image[y:y + track.size, x:x + track.size][scenes.shape_mask(track.shape, track.size)] = \
            scenes.COLORS[track.color]
    frames.append(image)
  return frames


class Video(source.Source):
  """multi_image, general: a clip of N frames (one tile each) and a question about time."""
  stream = 12

  def generate(self, rng):
    n = int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1))
    h, w = _frame_hw(rng, self.image_scale)
    background = list(scenes.BACKGROUNDS)[rng.integers(len(scenes.BACKGROUNDS))]
    shapes = [scenes.SHAPES[i] for i in rng.permutation(len(scenes.SHAPES))[:2]]
    colors = [list(scenes.COLORS)[i] for i in rng.permutation(len(scenes.COLORS))[:2]]
    side = min(h, w)
    sizes = [int(rng.integers(max(scenes.MIN_OBJECT, side // 4), max(scenes.MIN_OBJECT, side // 3) + 1))
             for _ in range(2)]
    kind = KINDS[rng.integers(len(KINDS))]
    if kind == "motion":
      direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
      target = _Track(shapes[0], colors[0], sizes[0], _moving(rng, h, w, sizes[0], n, direction))
      question = ("Which way does the {} move?", "In which direction does the {} move?")[rng.integers(2)]
      question, answer = question.format(target.name), direction
    elif kind == "appear":
      k = int(rng.integers(2, n + 1))  # from 1
      target = _Track(shapes[0], colors[0], sizes[0], _still(rng, h, w, sizes[0], [t >= k - 1 for t in range(n)]))
      question, answer = f"In which frame does the {target.name} appear?", f"frame {k}"
    else:
      by_runs = _PATTERNS[n]
      count = list(by_runs)[rng.integers(len(by_runs))]
      pattern = by_runs[count][rng.integers(len(by_runs[count]))]
      target = _Track(shapes[0], colors[0], sizes[0], _still(rng, h, w, sizes[0], pattern))
      question, answer = f"How many times does the {target.name} appear?", str(count)
    tracks = [target]
    if rng.random() < 0.6:  # a distractor the question does not ask about
      for _ in range(20):  # rejection sampling, bounded; none if it never fits
        if kind == "motion" and rng.random() < 0.5:
          other = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
          positions = _moving(rng, h, w, sizes[1], n, other)
        else:
          positions = _still(rng, h, w, sizes[1], [True] * n)
        distractor = _Track(shapes[1], colors[1], sizes[1], positions)
        if _apart(target, distractor):
          tracks.append(distractor)
          break
    turns = [(question, answer)]
    if rng.random() < 0.3:
      turns.append(("How many frames are there?", str(n)))
    messages = source.chat(turns, prefix="")
    messages[0] = ("user", video_frames.video_prompt(messages[0][1], n))
    return source.record("multi_image", messages, _draw(h, w, background, tracks, n), category="general")
