"""One-image tasks on shape scenes: captions, QA, counting, referring and grounding.

Every answer is read off the drawn scene; coordinates are Ferret text normalised to the
image (coordinates.py), so those records carry coords="image".
"""

from data_pipelines import coordinates
from data_pipelines.builtin import scenes, source
from data_pipelines.builtin.source import IMAGE_MARKER

PREFIX = IMAGE_MARKER + "\n"


def _scene(rng, scale, lo=1, hi=3, **kwargs):
  """-> (image, background, objects) with lo..hi objects (fewer if they do not fit)."""
  h, w = scenes.image_hw(rng, scale)
  return scenes.draw_scene(rng, h, w, int(rng.integers(lo, hi + 1)), **kwargs)


def _point(obj, image) -> str:
  x, y = obj.center
  return coordinates.format_point((x + 0.5, y + 0.5), image.shape[1], image.shape[0])


def _box(obj, image) -> str:
  return coordinates.format_box(obj.box, image.shape[1], image.shape[0])


def _pick(rng, items):
  return items[rng.integers(len(items))]


class Caption(source.Source):
  """kind caption: "<image>\\nA red circle and a blue square on a white background."."""
  stream = 1

  def generate(self, rng):
    image, background, objects = _scene(rng, self.image_scale)
    text = PREFIX + scenes.caption(background, objects)
    return source.record("caption", [("text", text)], [image], category="caption")


def _qa_turn(rng, kind, background, objects):
  """One (question, answer) of a QA kind, or None when the scene cannot ask it."""
  obj = _pick(rng, objects)
  if kind == "color":
    return _pick(rng, ("What color is the {}?", "Which color does the {} have?")).format(obj.shape), obj.color
  if kind == "shape":
    return _pick(rng, ("Which shape is {}?", "What is the shape of the {} object?")).format(obj.color), obj.shape
  if kind == "exists":
    color, shape = _pick(rng, list(scenes.COLORS)), _pick(rng, scenes.SHAPES)
    present = any(o.color == color and o.shape == shape for o in objects)
    if rng.random() < 0.5:  # half the time ask about an object that is there
      color, shape, present = obj.color, obj.shape, True
    return f"Is there a {color} {shape}?", "yes" if present else "no"
  if kind == "background":
    return "What color is the background?", background
  if kind == "left":
    if len(objects) < 2:
      return None
    first, second = scenes.left_to_right(objects)[:2]
    if first.box[0] == second.box[0]:
      return None
    return "Which shape is furthest to the left?", first.shape
  raise ValueError(kind)


QA_KINDS = ("color", "shape", "exists", "background", "left")


class QA(source.Source):
  """conversation, general: colours, shapes, presence, background, position; multi-turn."""
  stream = 2

  def generate(self, rng):
    image, background, objects = _scene(rng, self.image_scale)
    want, turns = source.num_turns(rng), []
    for _ in range(20):  # bounded: some kinds do not fit some scenes
      turn = _qa_turn(rng, _pick(rng, QA_KINDS), background, objects)
      if turn and turn[0] not in [q for q, _ in turns]:
        turns.append(turn)
      if len(turns) == want:
        break
    turns = turns or [("What color is the background?", background)]
    return source.record("conversation", source.chat(turns, PREFIX), [image], category="general")


class Counting(source.Source):
  """conversation, general (how many ...) or math (sums of counts); shapes repeat."""
  stream = 3

  def generate(self, rng):
    image, _, objects = _scene(rng, self.image_scale, 1, 6, unique=False, max_frac=0.3)
    n = len(objects)
    count = lambda **kw: sum(all(getattr(o, k) == v for k, v in kw.items()) for o in objects)
    shape, other = (scenes.SHAPES[i] for i in rng.permutation(len(scenes.SHAPES))[:2])
    color = _pick(rng, objects).color if rng.random() < 0.7 else _pick(rng, list(scenes.COLORS))
    k = int(rng.integers(1, 5))
    questions = {
        "general": [("How many shapes are there?", n),
                    (f"How many {scenes.PLURALS[shape]} are there?", count(shape=shape)),
                    (f"How many {color} shapes are there?", count(color=color))],
        "math": [(f"How many {scenes.PLURALS[shape]} and {scenes.PLURALS[other]} are there together?",
                  count(shape=shape) + count(shape=other)),
                 (f"If {k} more shapes were added, how many shapes would there be?", n + k)],
    }
    category = "math" if rng.random() < 0.3 else "general"
    question, answer = _pick(rng, questions[category])
    return source.record("conversation", source.chat([(question, str(answer))], PREFIX), [image],
                         category=category)


class Refer(source.Source):
  """conversation, refer_ground, coords image: what is at this point / in this box."""
  stream = 4

  def generate(self, rng):
    image, _, objects = _scene(rng, self.image_scale)
    turns = []
    for obj in rng.permutation(len(objects))[:source.num_turns(rng)]:
      obj = objects[obj]
      kind = rng.integers(3)
      if kind == 0:
        turns.append((f"What is at {_point(obj, image)}?", obj.name))
      elif kind == 1:
        turns.append((f"What is in {_box(obj, image)}?", obj.name))
      else:
        turns.append((f"What color is the object at {_point(obj, image)}?", obj.color))
    return source.record("conversation", source.chat(turns, PREFIX), [image], category="refer_ground",
                         coords="image")


class Ground(source.Source):
  """conversation, refer_ground, coords image: the box of a named object (or of all)."""
  stream = 5

  def generate(self, rng):
    image, _, objects = _scene(rng, self.image_scale)
    if rng.random() < 0.2:  # every object, each box attached to its phrase, left to right
      answer = ", ".join(f"{o.name} {_box(o, image)}" for o in scenes.left_to_right(objects))
      turns = [("Find all shapes.", answer)]
    else:
      turns = []
      for obj in rng.permutation(len(objects))[:source.num_turns(rng)]:
        obj = objects[obj]
        template = _pick(rng, ("Where is the {}?", "Give the box of the {}."))
        phrase = _pick(rng, (obj.name, obj.shape, f"{obj.color} object"))
        turns.append((template.format(phrase), _box(obj, image)))
    return source.record("conversation", source.chat(turns, PREFIX), [image], category="refer_ground",
                         coords="image")
