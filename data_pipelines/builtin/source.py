"""The random-access source every built-in task shares: record i is a pure function of
(seed, split, i, task), so any machine, worker or resumed run regenerates the same bytes.

Records follow data_pipelines/records.py: kind, messages, images (uint8 [H, W, 3]),
category, coords.
"""

import numpy as np

from data_pipelines import records

IMAGE_MARKER = records.IMAGE_MARKER
# Different random streams, so the splits never share an example.
SPLITS = {"train": 0, "eval": 1}
MIN_SCALE = 0.75  # sides >= 18 px: room for shapes of >= 6 px and the 8 px font


def record(kind: str, messages: list[tuple[str, str]], images=(), category: str = "",
           coords: str = "none") -> dict:
  return dict(kind=kind, messages=[dict(role=r, content=c) for r, c in messages], images=list(images),
              category=category, coords=coords)


def chat(turns: list[tuple[str, str]], prefix: str) -> list[tuple[str, str]]:
  """(question, answer) turns -> alternating user/assistant messages; prefix (the image
  markers) opens the first question."""
  messages = []
  for i, (question, answer) in enumerate(turns):
    messages += [("user", prefix + question if i == 0 else question), ("assistant", answer)]
  return messages


def num_turns(rng) -> int:
  """Mostly one turn, sometimes two or three."""
  return int(rng.choice((1, 1, 1, 2, 2, 3)))


class Source:
  """grain random-access source: `len(source)` and `source[i]` -> record.

  Subclasses set `stream` (a fixed int, unique per task, so tasks with the same seed and
  index do not draw the same scene) and implement `generate(rng) -> record`.
  """
  stream: int = -1

  def __init__(self, split: str, num_examples: int, seed: int = 0, image_scale: float = 1.0):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}: expected one of {sorted(SPLITS)}")
    if num_examples < 0:
      raise ValueError(f"num_examples={num_examples} must be >= 0")
    if image_scale < MIN_SCALE:
      raise ValueError(f"image_scale={image_scale} is too small: shapes and words need >= {MIN_SCALE} "
                       "(1.0 gives sides of 24..96 px)")
    self.split, self.num_examples, self.seed, self.image_scale = split, int(num_examples), int(seed), image_scale

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self}")
    rng = np.random.default_rng((self.seed, SPLITS[self.split], index, self.stream))
    return self.generate(rng)

  def generate(self, rng: np.random.Generator) -> dict:
    raise NotImplementedError

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(split={self.split!r}, num_examples={self.num_examples}, "
            f"seed={self.seed}, image_scale={self.image_scale})")
