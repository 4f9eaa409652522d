"""Several images per record: comparison conversations (kind multi_image) and interleaved
documents (kind interleaved: paragraphs describing each picture between the pictures).
"""

import collections

from data_pipelines.builtin import scenes, source
from data_pipelines.builtin.source import IMAGE_MARKER


def _scenes(rng, scale, n):
  out = []
  for _ in range(n):
    h, w = scenes.image_hw(rng, scale)
    out.append(scenes.draw_scene(rng, h, w, int(rng.integers(1, 4))))
  return out  # [(image, background, objects)]


def _compare(rng, kind, drawn):
  """One (question, answer, category) comparing the images, or None if the images do not
  give a unique answer."""
  objects = [objs for _, _, objs in drawn]
  if kind == "most":
    counts = [len(o) for o in objects]
    if counts.count(max(counts)) > 1:
      return None
    return "Which image has the most shapes?", f"Image {counts.index(max(counts)) + 1}", "general"
  if kind == "find":  # an object whose colour and shape no other image has
    names = [{o.name for o in objs} for objs in objects]
    seen = collections.Counter(n for ns in names for n in ns)
    unique = [(k, n) for k, ns in enumerate(names) for n in sorted(ns) if seen[n] == 1]
    if not unique:
      return None
    k, name = unique[rng.integers(len(unique))]
    return f"Which image has a {name}?", f"Image {k + 1}", "general"
  if kind == "same_color":
    i, j = sorted(int(v) for v in rng.choice(len(objects), size=2, replace=False))
    same = bool({o.color for o in objects[i]} & {o.color for o in objects[j]})
    return (f"Do image {i + 1} and image {j + 1} have a shape of the same color?", "yes" if same else "no",
            "general")
  if kind == "total":
    return "How many shapes are there in all the images?", str(sum(len(o) for o in objects)), "math"
  raise ValueError(kind)


KINDS = ("most", "find", "same_color", "total")


class MultiImage(source.Source):
  """multi_image, general or math: 2-4 images, "Image k: <image>" each, then questions."""
  stream = 7

  def generate(self, rng):
    drawn = _scenes(rng, self.image_scale, int(rng.integers(2, 5)))
    turn = None
    while turn is None:  # "same_color" and "total" always fit, so this ends
      turn = _compare(rng, KINDS[rng.integers(len(KINDS))], drawn)
    question, answer, category = turn
    turns = [(question, answer)]
    if rng.random() < 0.3:  # a follow-up about one image
      k = int(rng.integers(len(drawn)))
      obj = drawn[k][2][rng.integers(len(drawn[k][2]))]
      turns.append((f"What color is the {obj.shape} in image {k + 1}?", obj.color))
    # The images are named "Image k" by the tile indicators the sequence builder adds
    # (data.anyres.indicators="index", the default), so the text carries only the markers.
    prefix = "".join(f"{IMAGE_MARKER}\n" for _ in drawn)
    return source.record("multi_image", source.chat(turns, prefix), [image for image, _, _ in drawn],
                         category=category)


class Interleaved(source.Source):
  """interleaved: an intro, then per picture a paragraph with the picture and its caption,
  then a closing sentence with the total; loss on all the text."""
  stream = 8

  def generate(self, rng):
    drawn = _scenes(rng, self.image_scale, int(rng.integers(1, 4)))
    n = len(drawn)
    paragraphs = [f"Here {'is' if n == 1 else 'are'} {scenes.NUMBER_WORDS[n]} "
                  f"{'picture' if n == 1 else 'pictures'} of shapes."]
    for k, (_, background, objects) in enumerate(drawn):
      counted = f"It has {scenes.count_phrase(len(objects))}."
      if rng.random() < 0.5:  # describe before or after the picture
        paragraphs.append(f"Picture {k + 1}: {IMAGE_MARKER}\n{scenes.caption(background, objects)} {counted}")
      else:
        paragraphs.append(f"Picture {k + 1} shows {scenes.count_phrase(len(objects))}. {IMAGE_MARKER}\n"
                          f"{scenes.caption(background, objects)}")
    total = sum(len(objects) for _, _, objects in drawn)
    paragraphs.append(f"In total there {'is' if total == 1 else 'are'} {scenes.count_phrase(total)}.")
    return source.record("interleaved", [("text", p) for p in paragraphs], [image for image, _, _ in drawn])
