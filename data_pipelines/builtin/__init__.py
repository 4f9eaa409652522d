"""The built-in data: a small generated MM1.5-like mixture a CPU model learns in minutes.

`SOURCES[name](split, num_examples, seed=0, image_scale=1.0)` is a grain random-access
source of records (data_pipelines/records.py schema); record i is a pure function of
(seed, split, i, task), and "train" and "eval" never share an example. Image sides are
24..96 px times image_scale, aspect ratios 1:4..4:1 (ui: tall screens, 72..108 px wide, 1.8 to
3 times as tall).

  name         kind          category                   what
  caption      caption       caption                    "A red circle and a blue square on a white background."
  interleaved  interleaved   ""                         1-3 pictures, each with a paragraph describing it
  qa           conversation  general                    colour / shape / presence / background / leftmost
  text_rich    conversation  text_rich (coords image)   read rendered words: all, first, last, in a box, ...
  counting     conversation  general | math             how many (colour/shape) shapes; sums of counts
  refer        conversation  refer_ground (image)       what is at [x, y] / in [x1, y1, x2, y2]
  ground       conversation  refer_ground (image)       where is the red square -> [x1, y1, x2, y2]
  multi_image  multi_image   general | math             2-4 images: which has most / has a red circle / ...
  text_doc     text          ""                         documents of arithmetic and word facts
  text_chat    text          math | general             user/assistant questions about those facts
  ui           conversation  refer_ground (image)       phone screens: what is at [x, y], where is the
                                                        Save button, is the Wi-Fi toggle on (not in
                                                        MIXTURES: experiments/mm15_ui.py adds it)
  video        multi_image   general                    4-8 frame clips: which way does the red circle
                                                        move, in which frame does it appear, how many
                                                        times (not in MIXTURES: mm15_video.py:tiny,sft)
"""

from data_pipelines.builtin import multi_image, single_image, text_only, text_rich, ui, video
from data_pipelines.builtin.source import SPLITS, Source
from data_pipelines.records import IMAGE_MARKER

SOURCES = {
    "caption": single_image.Caption,
    "interleaved": multi_image.Interleaved,
    "qa": single_image.QA,
    "text_rich": text_rich.TextRich,
    "counting": single_image.Counting,
    "refer": single_image.Refer,
    "ground": single_image.Ground,
    "multi_image": multi_image.MultiImage,
    "text_doc": text_only.TextDoc,
    "text_chat": text_only.TextChat,
    "ui": ui.UI,
    "video": video.Video,
}
TEXT_ONLY = ("text_doc", "text_chat")  # the tasks whose records have no image

# SFT: single-image 0.8 (inside it roughly the spec's category mix: text-rich first, then
# refer & ground, general, math), multi-image 0.1, text 0.1 (docs/recipe.md).
# Pretraining: MM1.5's 50% captions : 10% interleaved : 40% text.
MIXTURES = {
    "sft": {"text_rich": 0.34, "refer": 0.12, "ground": 0.12, "qa": 0.12, "counting": 0.10,
            "multi_image": 0.10, "text_chat": 0.10},
    "pretrain": {"caption": 0.5, "interleaved": 0.1, "text_doc": 0.4},
}


def default_mixture(stage: str = "sft") -> dict[str, float]:
  """{source name: weight} of the built-in mixture for a stage ("sft" or "pretrain"); sums to 1."""
  if stage not in MIXTURES:
    raise ValueError(f"stage={stage!r}: the built-in mixtures are {sorted(MIXTURES)}")
  return dict(MIXTURES[stage])


def corpus(num_per_source: int = 100, seed: int = 0) -> list[str]:
  """Every message text of the first records of every source (train split), unique, in
  order: text a tokenizer can be trained on to cover the built-in vocabulary."""
  lines = []
  for cls in SOURCES.values():
    src = cls("train", num_per_source, seed)
    for i in range(len(src)):
      lines += [m["content"].replace(IMAGE_MARKER, " ") for m in src[i]["messages"]]
  return list(dict.fromkeys(lines))
