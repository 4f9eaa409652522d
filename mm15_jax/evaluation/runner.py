"""Evaluate a model on a JSONL benchmark; write REPORT.json and REPORT.md.

One row per line (the common format of converted VQA / DocVQA / RefCOCO files):
  {"id": "q1", "image": "img/1.png" | "images": ["a.png", "b.png"], "question": "...",
   "answers": ["...", ...] | "answer": "...",        # text tasks
   "box": [x1, y1, x2, y2],                           # grounding: pixel edges of the first image
   "metric": "vqa" | "anls" | "exact_match" | "grounding",   # optional, per row
   "task": "textvqa"}                                 # optional: a row of the report table
Image paths are relative to image_root (default: the JSONL's folder). A question without
`<image>` markers gets one per image in front ("<image>\\n" each), as the training records.
The metric of a row: its "metric", else the `metric` argument, else "grounding" for a row
with a "box" and "vqa" otherwise. Grounding scores the first box of the answer (pixels of
the first image, as Model.generate returns it) at IoU >= 0.5.
"""

import collections
import json

import numpy as np
from PIL import Image

from data_pipelines import records, storage
from data_pipelines.progress import Progress
from mm15_jax import distributed
from mm15_jax.evaluation import metrics as metrics_lib

METRIC_NAMES = (*metrics_lib.METRICS, "grounding")


def load_image(path: str) -> np.ndarray:
  with storage.open_file(path) as f, Image.open(f) as image:
    return np.asarray(image.convert("RGB"))


def with_markers(question: str, num_images: int) -> str:
  """The question as the user turn: image markers first unless it places them itself."""
  if records.IMAGE_MARKER in question or not num_images:
    return question
  return (records.IMAGE_MARKER + "\n") * num_images + question


def read_rows(path: str, limit: int | None = None) -> list[dict]:
  rows = []
  with storage.open_file(path, "r") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e})") from e
      if "question" not in row:
        raise ValueError(f"{path}:{n}: a benchmark row needs 'question'")
      if not any(k in row for k in ("answers", "answer", "box")):
        raise ValueError(f"{path}:{n}: a benchmark row needs 'answers', 'answer' or 'box'")
      row.setdefault("id", str(n))
      rows.append(row)
      if limit and len(rows) == limit:
        break
  return rows


def row_metric(row: dict, default: str | None) -> str:
  name = row.get("metric") or default or ("grounding" if "box" in row else "vqa")
  if name not in METRIC_NAMES:
    raise ValueError(f"row {row.get('id')}: metric={name!r}; choose one of {METRIC_NAMES}")
  if name == "grounding" and "box" not in row:
    raise ValueError(f"row {row.get('id')}: metric 'grounding' needs a 'box' [x1, y1, x2, y2] in pixels")
  return name


def score(name: str, row: dict, answer) -> float:
  """One row's score for the model's Answer (.text, .boxes)."""
  if name == "grounding":
    boxes = [b for b in answer.boxes if len(b) == 4]
    return metrics_lib.grounding_hit(boxes[0] if boxes else None, row["box"])
  references = row["answers"] if "answers" in row else [row["answer"]]
  return metrics_lib.METRICS[name](answer.text, references)


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str, title: str) -> None:
  storage.makedirs(out_dir)
  storage.write_text_atomic(storage.join(out_dir, "REPORT.json"), json.dumps(report, indent=1))
  table = [[task, name, v["num"], 100 * v["score"]] for task, by_metric in report["tasks"].items()
           for name, v in by_metric.items()]
  storage.write_text_atomic(storage.join(out_dir, "REPORT.md"),
                            f"# {title}\n\n" + markdown_table(["task", "metric", "num", "score (%)"], table))


def evaluate(model, benchmark_jsonl: str, *, metric: str | None = None, image_root: str | None = None,
             limit: int | None = None, batch_size: int = 8, out_dir: str | None = None,
             max_new_tokens: int = 64, progress: bool = False, **generate_kwargs) -> dict:
  """Generate an answer per row (greedy unless generate_kwargs say otherwise) and score it;
  `progress`: questions answered and the ETA on process 0 (data_pipelines/progress.py).

  Returns {"benchmark", "num", "metrics": {metric: mean score}, "tasks": {task: {metric:
  {"score", "num"}}}, "predictions": [{"id", "task", "metric", "prediction", "boxes",
  "score"}]}; with out_dir, also REPORT.json and REPORT.md there.
  """
  rows = read_rows(benchmark_jsonl, limit)
  image_root = image_root if image_root is not None else storage.dirname(benchmark_jsonl)
  default_task = storage.basename(benchmark_jsonl).rsplit(".", 1)[0]
  predictions = []
  bar = Progress(len(rows), "evaluate", "questions", enabled=progress and distributed.is_main())
  for start in range(0, len(rows), batch_size):
    batch = rows[start:start + batch_size]
    images = [[load_image(storage.under(image_root, p)) for p in (r["images"] if "images" in r else [r["image"]])]
              if ("images" in r or "image" in r) else [] for r in batch]
    prompts = [with_markers(r["question"], len(ims)) for r, ims in zip(batch, images)]
    answers = model.generate_batch(prompts, images, max_new_tokens=max_new_tokens, **generate_kwargs)
    for row, answer in zip(batch, answers):
      name = row_metric(row, metric)
      predictions.append(dict(id=row["id"], task=row.get("task", default_task), metric=name, prediction=answer.text,
                              boxes=[list(map(float, b)) for b in answer.boxes], score=score(name, row, answer)))
    bar.update(len(batch))
  bar.close()
  by_metric, by_task = collections.defaultdict(list), collections.defaultdict(lambda: collections.defaultdict(list))
  for p in predictions:
    by_metric[p["metric"]].append(p["score"])
    by_task[p["task"]][p["metric"]].append(p["score"])
  report = dict(
      benchmark=benchmark_jsonl, num=len(predictions),
      metrics={name: float(np.mean(s)) for name, s in by_metric.items()},
      tasks={task: {name: dict(score=float(np.mean(s)), num=len(s)) for name, s in d.items()}
             for task, d in by_task.items()},
      predictions=predictions)
  if out_dir and distributed.is_main():  # every process generated the same answers; one writes
    write_report(report, out_dir, f"Evaluation: {storage.basename(benchmark_jsonl)}")
  return report
