"""Task metrics: VQA accuracy, ANLS, exact match, IoU and grounding accuracy.

Each scores ONE prediction against its reference(s) and returns a float in [0, 1]; the
runner averages them. References for the formulas:
  VQA accuracy: the official VQA evaluation script (vqaEval.py), answer normalisation and
    the average of min(#matches / 3, 1) over the 10 leave-one-out subsets of the 10 human
    answers. Unlike the script, predictions and references are ALWAYS normalised (the
    script skips it when all 10 references agree), as lmms-eval and LLaVA do.
  ANLS: DocVQA's average normalised Levenshtein similarity (Biten et al. 2019), tau = 0.5.
"""

import re

# The official script's tables.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the script's pattern; keeps "2.5"
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official number of human answers per question; fewer references score as exact match.
VQA_ANSWERS = 10


def _punctuation(text: str) -> str:
  out = text
  for p in PUNCTUATION:
    # A mark next to a space, or any text with a digit-comma-digit ("1,000"), loses it;
    # otherwise it becomes a space ("yes/no" -> "yes no").
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
  """VQA normalisation: whitespace, punctuation, lowercase, number words -> digits,
  articles dropped, contractions restored ("Two dogs." -> "2 dogs", "dont" -> "don't")."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _digits_articles(_punctuation(text))


def _as_list(answers) -> list[str]:
  return [answers] if isinstance(answers, str) else list(answers)


def vqa_accuracy(prediction: str, answers) -> float:
  """The VQA score of one prediction. With the standard 10 answers: the mean over the 10
  leave-one-out subsets of min(#subset answers equal to the prediction / 3, 1), so 1, 2, 3,
  4 matches score 0.3, 0.6, 0.9, 1.0. With fewer references (a benchmark with one answer),
  1.0 if the prediction equals any of them, else 0.0."""
  answers = [normalize_answer(a) for a in _as_list(answers)]
  if not answers:
    raise ValueError("vqa_accuracy: no reference answers")
  pred = normalize_answer(prediction)
  matches = sum(a == pred for a in answers)
  if len(answers) < VQA_ANSWERS:
    return float(matches > 0)
  # Leaving out a matching answer leaves matches - 1, leaving out another leaves matches.
  n = len(answers)
  return (matches * min((matches - 1) / 3, 1) + (n - matches) * min(matches / 3, 1)) / n


def exact_match(prediction: str, answers) -> float:
  """1.0 if the normalised prediction equals a normalised reference, else 0.0."""
  pred = normalize_answer(prediction)
  return float(any(normalize_answer(a) == pred for a in _as_list(answers)))


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions cost 1)."""
  if len(a) < len(b):
    a, b = b, a
  row = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    prev, row[0] = row[0], i
    for j, cb in enumerate(b, 1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
  return row[-1]


def anls(prediction: str, answers, threshold: float = 0.5) -> float:
  """Normalised Levenshtein similarity to the closest reference: 1 - d / max(len) when
  d / max(len) < threshold, else 0 (lowercased, whitespace collapsed)."""
  def norm(s):
    return " ".join(s.lower().split())

  pred, best = norm(prediction), 0.0
  for answer in _as_list(answers):
    answer = norm(answer)
    length = max(len(pred), len(answer))
    distance = levenshtein(pred, answer) / length if length else 0.0
    best = max(best, 1.0 - distance if distance < threshold else 0.0)
  return best


def iou(box_a, box_b) -> float:
  """Intersection over union of two boxes (x1, y1, x2, y2) given by their edges (pixels or
  any common unit); an empty or inverted box has area 0."""
  ax1, ay1, ax2, ay2 = (float(v) for v in box_a)
  bx1, by1, bx2, by2 = (float(v) for v in box_b)
  inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
  union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
  return inter / union if union > 0 else 0.0


def grounding_hit(pred_box, gt_box, threshold: float = 0.5) -> float:
  """1.0 when the predicted box overlaps the reference with IoU >= threshold; a missing
  prediction (None, or not a 4-tuple) is a miss."""
  if pred_box is None or len(pred_box) != 4:
    return 0.0
  return float(iou(pred_box, gt_box) >= threshold)


def grounding_accuracy(pred_boxes, gt_boxes, threshold: float = 0.5) -> float:
  """Fraction of reference boxes whose prediction (same position in pred_boxes; missing
  ones are misses) has IoU >= threshold (Ferret/RefCOCO's Acc@0.5)."""
  gt_boxes = list(gt_boxes)
  if not gt_boxes:
    raise ValueError("grounding_accuracy: no reference boxes")
  pred_boxes = list(pred_boxes)
  hits = [grounding_hit(pred_boxes[i] if i < len(pred_boxes) else None, gt, threshold)
          for i, gt in enumerate(gt_boxes)]
  return sum(hits) / len(hits)


METRICS = {"vqa": vqa_accuracy, "anls": anls, "exact_match": exact_match}
