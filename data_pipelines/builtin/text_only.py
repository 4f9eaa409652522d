"""Text-only records: documents of simple facts (kind text, "text" messages) and
user/assistant conversations asking them (kind text, category math or general).

The fact space is small, so held-out examples would repeat training ones by chance:
instead every fact belongs to exactly one split (by a CRC of its sentence, the same on
every machine), and a record uses only its split's facts.
"""

import dataclasses
import zlib

from data_pipelines.builtin import source

EVAL_EVERY = 5  # one fact in EVAL_EVERY (by CRC) is held out


@dataclasses.dataclass(frozen=True)
class Fact:
  question: str
  answer: str
  sentence: str
  category: str  # "math" or "general"


def _article(noun: str) -> str:
  return ("an " if noun[0] in "aeiou" else "a ") + noun


OPPOSITES = (("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
             ("old", "new"), ("open", "closed"), ("left", "right"), ("top", "bottom"), ("light", "dark"),
             ("happy", "sad"), ("full", "empty"), ("wet", "dry"), ("early", "late"), ("high", "low"),
             ("hard", "soft"), ("long", "short"), ("in", "out"), ("first", "last"), ("near", "far"))
KINDS_OF = {"animal": ("cat", "dog", "bird", "fish", "horse", "cow"),
            "fruit": ("apple", "pear", "banana", "grape", "orange", "lemon"),
            "color": ("red", "blue", "green", "yellow", "purple"),
            "shape": ("circle", "square", "triangle"),
            "vehicle": ("car", "train", "ship", "bus", "plane")}
COLORS_OF = (("sky", "blue"), ("grass", "green"), ("snow", "white"), ("sun", "yellow"), ("night", "black"),
             ("milk", "white"), ("coal", "black"), ("lemon", "yellow"), ("leaf", "green"), ("sea", "blue"))
WORDS = {"+": "plus", "-": "minus", "*": "times"}


def _all_facts() -> list[Fact]:
  facts = []
  for a in range(21):
    for b in range(21):
      facts.append(Fact(f"What is {a} + {b}?", str(a + b), f"{a} + {b} = {a + b}.", "math"))
      if b <= a:
        facts.append(Fact(f"What is {a} - {b}?", str(a - b), f"{a} - {b} = {a - b}.", "math"))
      if a <= 10 and b <= 10:
        facts.append(Fact(f"What is {a} * {b}?", str(a * b), f"{a} * {b} = {a * b}.", "math"))
  for x, y in OPPOSITES + tuple((y, x) for x, y in OPPOSITES):
    facts.append(Fact(f"What is the opposite of {x}?", y, f"The opposite of {x} is {y}.", "general"))
  for kind, members in KINDS_OF.items():
    for m in members:
      facts.append(Fact(f"What is {_article(m)}?", _article(kind), f"{_article(m).capitalize()} is {_article(kind)}.",
                        "general"))
  for thing, color in COLORS_OF:
    facts.append(Fact(f"What color is the {thing}?", color, f"The {thing} is {color}.", "general"))
  return facts


def split_of(fact: Fact) -> str:
  return "eval" if zlib.crc32(fact.sentence.encode()) % EVAL_EVERY == 0 else "train"


FACTS = {split: {c: [f for f in _all_facts() if split_of(f) == split and f.category == c]
                 for c in ("math", "general")}
         for split in source.SPLITS}


class TextDoc(source.Source):
  """text: a short document of 2-5 facts of the split, math and general mixed."""
  stream = 9

  def generate(self, rng):
    facts = FACTS[self.split]
    sentences = []
    for _ in range(int(rng.integers(2, 6))):
      pool = facts["math" if rng.random() < 0.5 else "general"]
      sentences.append(pool[rng.integers(len(pool))].sentence)
    return source.record("text", [("text", " ".join(sentences))])


class TextChat(source.Source):
  """text, math or general: a user/assistant conversation of 1-3 questions of one category."""
  stream = 10

  def generate(self, rng):
    category = "math" if rng.random() < 0.5 else "general"
    pool = FACTS[self.split][category]
    chosen = rng.choice(len(pool), size=source.num_turns(rng), replace=False)
    turns = [(pool[i].question, pool[i].answer) for i in chosen]
    return source.record("text", source.chat(turns, ""), category=category)
