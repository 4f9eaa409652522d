"""Text-rich images: 1-3 short words, one per line, rendered with PIL's default font; the
questions ask to read them (all, first, last, in a box), count them or name their ink.
"""

from data_pipelines import coordinates
from data_pipelines.builtin import scenes, source
from data_pipelines.builtin.source import IMAGE_MARKER


def _turn(rng, kind, image, words):
  word = words[rng.integers(len(words))]
  if kind == "read":
    return "What is written in the image?", " ".join(w.text for w in words)
  if kind == "first":
    return "What is the first word?", words[0].text
  if kind == "last":
    return "What is the last word?", words[-1].text
  if kind == "box":
    box = coordinates.format_box(word.box, image.shape[1], image.shape[0])
    return f"What word is in {box}?", word.text
  if kind == "count":
    return "How many words are there?", str(len(words))
  if kind == "ink":
    return f"What color is the word {word.text}?", word.ink
  raise ValueError(kind)


KINDS = ("read", "first", "last", "box", "count", "ink")


class TextRich(source.Source):
  """conversation, text_rich; coords image (the "in a box" question points into the image)."""
  stream = 6

  def generate(self, rng):
    chosen = rng.choice(len(scenes.WORDS), size=int(rng.integers(1, 4)), replace=False)
    image, _, words = scenes.draw_words(rng, [scenes.WORDS[i] for i in chosen], self.image_scale)
    kinds = rng.permutation(len(KINDS))[:source.num_turns(rng)]
    turns = [_turn(rng, KINDS[k], image, words) for k in kinds]
    return source.record("conversation", source.chat(turns, IMAGE_MARKER + "\n"), [image], category="text_rich",
                         coords="image")
