"""Evaluation on the built-in held-out split: accuracy per task, and a grounding picture.

The questions are the first turn of the "eval" split records of data_pipelines.builtin
(never seen in training: the splits draw from different random streams), generated with
the config's seed and image scale, as the trainer's eval split. A question is asked with
exactly the record's user text (image markers and coordinates on the image's 0..1000 scale
included; the model remaps them to the AnyRes canvas as in training). Scoring:
  - an answer with Ferret boxes (ground, and ui grounding): grounding accuracy, each
    reference box against the answer's box at the same position, IoU >= 0.5 in pixels;
  - every other answer: exact match of the whole answer after VQA normalisation.
`baseline_accuracy` is what knowing no image scores: per question text, the most common
train-split answer (the median train box for grounding), so "above chance" has a number.
The report also asks the same model every question with its images blanked (flat, the
padding colour): a model that reads its images scores lower there than with them. A question
whose prompt (image tokens included) is longer than the model's trained length is not asked:
the report counts it per task (`too_long`), as training drops such records.
"""

import collections
import json

import numpy as np
from absl import logging

from data_pipelines import anyres, builtin, coordinates, storage
from data_pipelines.progress import Progress
from mm15_jax import distributed
from mm15_jax.evaluation import metrics as metrics_lib
from mm15_jax.evaluation import runner

# Built-in tasks that ask questions (the others are captions and documents).
QUESTION_TASKS = ("qa", "text_rich", "counting", "refer", "ground", "multi_image", "text_chat", "ui", "video")
# Variants' tasks (experiments/mm15_ui.py, mm15_video.py): asked only when data.sources has them.
VARIANT_TASKS = ("ui", "video")


def config_tasks(config) -> list[str]:
  """The question tasks among config.data.sources' built-in sources, in QUESTION_TASKS order
  (all but VARIANT_TASKS if there are none)."""
  tasks = []
  for name, spec in config.data.sources.items():
    task = spec.get("task", None) or name
    if spec.get("kind", "builtin") == "builtin" and task in QUESTION_TASKS and task not in tasks:
      tasks.append(task)
  return sorted(tasks, key=QUESTION_TASKS.index) or [t for t in QUESTION_TASKS if t not in VARIANT_TASKS]


def pixel_boxes(text: str, image: np.ndarray) -> list[tuple[float, ...]]:
  """Ferret boxes of text (0..1000 of the image) -> pixel edges of that image."""
  h, w = image.shape[:2]
  return [(coordinates.from_canvas(x1, w), coordinates.from_canvas(y1, h), coordinates.from_canvas(x2, w),
           coordinates.from_canvas(y2, h)) for x1, y1, x2, y2 in (v for v in coordinates.parse(text) if len(v) == 4)]


def questions(task: str, num: int, *, split: str = "eval", seed: int = 0, image_scale: float = 1.0) -> list[dict]:
  """[{"prompt", "images", "answer", "boxes"}]: the first turn of the split's records;
  boxes are the reference boxes in pixels when the answer grounds (else [])."""
  if task not in builtin.SOURCES:
    raise ValueError(f"task={task!r}: built-in tasks are {sorted(builtin.SOURCES)}")
  source = builtin.SOURCES[task](split, num, seed=seed, image_scale=image_scale)
  out = []
  for i in range(len(source)):
    record = source[i]
    messages = record["messages"]
    if messages[0]["role"] != "user":
      raise ValueError(f"task={task!r} is not a question task (records are {record['kind']} documents)")
    answer = messages[1]["content"]
    boxes = pixel_boxes(answer, record["images"][0]) if record["coords"] == "image" else []
    out.append(dict(prompt=messages[0]["content"], images=record["images"], answer=answer, boxes=boxes))
  return out


def score(question: dict, text: str, boxes) -> float:
  """One answer's score: grounding accuracy when the reference has boxes, else exact match."""
  if question["boxes"]:
    return metrics_lib.grounding_accuracy([b for b in boxes if len(b) == 4], question["boxes"])
  return metrics_lib.exact_match(text, [question["answer"]])


def blanked(question: dict) -> dict:
  """The question with each image replaced by a flat one of the same size (the AnyRes padding
  colour, which normalises to about 0): the same tiles and tokens, no pixel information."""
  flat = lambda im: np.broadcast_to(np.asarray(anyres.PAD_COLOR, np.uint8), im.shape).copy()
  return dict(question, images=[flat(im) for im in question["images"]])


def fits(model, question: dict) -> bool:
  """Whether the question's prompt, its image tokens included, is within the length the model
  was trained at (a stand-in model without a tokenizer takes every question)."""
  build = getattr(model, "prompt", None)
  if build is None:
    return True
  return len(build(question["prompt"], question["images"])["tokens"]) <= model.config.data.seq_len


def _generate(model, qs, batch_size, max_new_tokens, bar=None):
  answers = []
  for start in range(0, len(qs), batch_size):
    batch = qs[start:start + batch_size]
    answers += model.generate_batch([q["prompt"] for q in batch], [q["images"] for q in batch],
                                    max_new_tokens=max_new_tokens)
    if bar is not None:
      bar.update(len(batch))
  return answers


def render_grounding(question: dict, answer, path: str) -> str:
  """The image with the model's boxes ("model") and the reference boxes ("truth")."""
  from mm15_jax.inference import render  # the inference package draws boxes with labels

  predicted = [tuple(b) for b in answer.boxes if len(b) == 4]
  render(question["images"][0], predicted + list(question["boxes"]),
         ["model"] * len(predicted) + ["truth"] * len(question["boxes"]), path)
  return path


def evaluate_builtin(model, config=None, *, tasks=None, num_per_task: int | None = None, batch_size: int = 8,
                     max_new_tokens: int = 80, out_dir: str | None = None, baseline: bool = True,
                     blank: bool = True, progress: bool = False) -> dict:
  """Accuracy per task (dict task -> accuracy in [0, 1]) of the model on held-out questions.

  config: the model's (default model.config): seed, data.image_scale, data.eval_examples
  (the default num_per_task) and the built-in tasks of data.sources (the default tasks).
  With out_dir: REPORT.json (accuracy, baseline, num, a few examples per task; with `blank`
  also "blanked": the accuracy with every image blanked), REPORT.md and grounding.png (the
  first grounding question, model and true boxes). `progress`: questions answered and the ETA
  on process 0 (data_pipelines/progress.py).
  """
  config = config if config is not None else model.config
  tasks = list(tasks) if tasks else config_tasks(config)
  num = int(num_per_task or config.data.eval_examples)
  seed, scale = int(config.seed), float(config.data.image_scale)
  accuracy, blind, examples, grounding_example = {}, {}, {}, None
  per_task, too_long = {}, {}
  for task in tasks:
    qs = questions(task, num, seed=seed, image_scale=scale)
    per_task[task] = [q for q in qs if fits(model, q)]
    if len(per_task[task]) < len(qs):
      too_long[task] = len(qs) - len(per_task[task])
      logging.warning("evaluation: %d of %d %s questions are longer than the model's data.seq_len=%d and are "
                      "not asked", too_long[task], len(qs), task, model.config.data.seq_len)
    if not per_task[task]:
      del per_task[task]
  tasks = list(per_task)
  total = sum(len(qs) * (2 if out_dir and blank and any(q["images"] for q in qs) else 1) for qs in per_task.values())
  bar = Progress(total, "evaluate", "questions", enabled=progress and distributed.is_main())
  for task, qs in per_task.items():
    answers = _generate(model, qs, batch_size, max_new_tokens, bar)
    scores = [score(q, a.text, a.boxes) for q, a in zip(qs, answers)]
    accuracy[task] = float(np.mean(scores))
    if out_dir and blank and any(q["images"] for q in qs):
      blank_answers = _generate(model, [blanked(q) for q in qs], batch_size, max_new_tokens, bar)
      blind[task] = float(np.mean([score(q, a.text, a.boxes) for q, a in zip(qs, blank_answers)]))
    elif out_dir and blank:  # a text-only task: nothing to blank
      blind[task] = accuracy[task]
    examples[task] = [dict(prompt=q["prompt"], answer=q["answer"], prediction=a.text, score=s)
                      for q, a, s in list(zip(qs, answers, scores))[:3]]
    if grounding_example is None:
      grounding_example = next(((q, a) for q, a in zip(qs, answers) if q["boxes"]), None)
  bar.close()
  if out_dir and distributed.is_main():  # every process generated the same answers; one writes
    storage.makedirs(out_dir)
    chance = baseline_accuracy(tasks, num, seed=seed, image_scale=scale, asked=per_task) if baseline else {}
    report = dict(accuracy=accuracy, baseline=chance, num_per_task=num, examples=examples)
    if too_long:
      report["too_long"] = too_long
    if blind:
      report["blanked"] = blind
    if grounding_example:
      report["grounding_png"] = render_grounding(*grounding_example, storage.join(out_dir, "grounding.png"))
    storage.write_text_atomic(storage.join(out_dir, "REPORT.json"), json.dumps(report, indent=1))
    table = [[t, len(per_task[t]), 100 * accuracy[t]] + ([100 * chance[t]] if chance else [])
             + ([100 * blind[t]] if blind else []) for t in tasks]
    header = (["task", "num", "accuracy (%)"] + (["baseline (%)"] if chance else [])
              + (["images blanked (%)"] if blind else []))
    markdown = "# Built-in held-out evaluation\n\n" + runner.markdown_table(header, table)
    if grounding_example:
      markdown += "\n![grounding example](grounding.png)\n"
    storage.write_text_atomic(storage.join(out_dir, "REPORT.md"), markdown)
  return accuracy


def baseline_accuracy(tasks, num_per_task: int, *, seed: int = 0, image_scale: float = 1.0,
                      train_examples: int = 1000, asked: dict | None = None) -> dict:
  """Accuracy without looking at the image: the most common train answer to the same
  question text (else to any question of the task); for grounding, the median train box
  (0..1000 of the image, per coordinate) for every reference box. Scored on `asked[task]`
  (the questions put to the model) where given, else the task's first num_per_task."""
  out = {}
  for task in tasks:
    train = questions(task, train_examples, split="train", seed=seed, image_scale=image_scale)
    by_question = collections.defaultdict(collections.Counter)
    for q in train:
      by_question[q["prompt"]][q["answer"]] += 1
    overall = sum(by_question.values(), collections.Counter())
    canvas_boxes = [v for q in train for v in coordinates.parse(q["answer"]) if len(v) == 4 and q["boxes"]]
    median = tuple(np.median(canvas_boxes, axis=0)) if canvas_boxes else (0, 0, 1000, 1000)
    scores = []
    asked_here = (asked or {}).get(task) or questions(task, num_per_task, seed=seed, image_scale=image_scale)
    for q in asked_here:
      if q["boxes"]:
        h, w = q["images"][0].shape[:2]
        guess = (median[0] * w / 1000, median[1] * h / 1000, median[2] * w / 1000, median[3] * h / 1000)
        scores.append(score(q, "", [guess] * len(q["boxes"])))
      else:
        counts = by_question.get(q["prompt"]) or overall
        scores.append(score(q, counts.most_common(1)[0][0], []))
    out[task] = float(np.mean(scores))
  return out
