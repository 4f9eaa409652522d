"""mm15_jax.evaluation: metrics against hand-computed cases, the JSONL runner and the
built-in held-out evaluation with stand-in models whose answers are known."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import configs, run_record
from mm15_jax.evaluation import builtin_eval, metrics, runner
from mm15_jax.inference import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- VQA accuracy ------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("Two", "2"), ("a dog", "dog"), ("The Dog.", "dog"), ("an apple", "apple"), ("  yes\n", "yes"),
    ("dont", "don't"), ("yes/no", "yes no"), ("1,000", "1000"), ("2.5", "2.5"), ("What?!", "what"),
    ("ten cats", "10 cats"), ("none", "0"), ("red-ish", "red ish"), ("hi - there", "hi there"),
])
def test_vqa_normalisation(text, want):
  assert metrics.normalize_answer(text) == want


def official_loop(pred, answers):
  """The official script's loop, written out: for each answer, the others that equal the
  prediction, min(count / 3, 1); averaged (answers and prediction already normalised)."""
  accs = []
  for i in range(len(answers)):
    others = answers[:i] + answers[i + 1:]
    accs.append(min(1.0, sum(o == pred for o in others) / 3))
  return sum(accs) / len(accs)


@pytest.mark.parametrize("matches, want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches, want):
  # Hand: 2 matches -> 2 subsets keep 1 (1/3), 8 keep 2 (2/3): (2/3 + 16/3) / 10 = 0.6;
  # 3 matches -> 3 subsets keep 2 (2/3), 7 keep 3 (1): (2 + 7) / 10 = 0.9.
  answers = ["2"] * matches + ["two dogs", "3", "many"] * 4
  answers = answers[:10]
  assert metrics.vqa_accuracy("Two", answers) == pytest.approx(want)
  assert official_loop("2", [metrics.normalize_answer(a) for a in answers]) == pytest.approx(want)


def test_vqa_accuracy_normalises_both_sides_and_few_references():
  answers = ["A dog.", "dog", "the dog"] + ["cat"] * 7
  assert metrics.vqa_accuracy("dog", answers) == pytest.approx(0.9)
  assert metrics.vqa_accuracy("Dog!", "a dog") == 1.0  # one reference: exact match after normalising
  assert metrics.vqa_accuracy("cat", ["dog", "a dog"]) == 0.0
  with pytest.raises(ValueError, match="no reference"):
    metrics.vqa_accuracy("x", [])


def test_exact_match():
  assert metrics.exact_match("Image 2", ["image 2"]) == 1.0
  assert metrics.exact_match("red circle", "a red circle.") == 1.0
  assert metrics.exact_match("red", ["red circle"]) == 0.0


# --- ANLS --------------------------------------------------------------------------------

def test_levenshtein_hand_cases():
  assert metrics.levenshtein("kitten", "sitting") == 3
  assert metrics.levenshtein("", "abc") == 3 and metrics.levenshtein("abc", "abc") == 0
  assert metrics.levenshtein("flaw", "lawn") == 2


def test_anls_hand_cases():
  assert metrics.anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)  # NL 0.43 < 0.5
  assert metrics.anls("abcd", ["abef"]) == 0.0  # NL = 0.5 is not < 0.5
  assert metrics.anls("abcd", ["abcf"]) == pytest.approx(0.75)
  assert metrics.anls("  Hello   World ", ["hello world"]) == 1.0
  assert metrics.anls("sitting", ["xyz", "kitten", "sitting!"]) == pytest.approx(1 - 1 / 8)  # the best one
  assert metrics.anls("abc", ["abcd"], threshold=0.2) == 0.0  # NL 0.25 >= 0.2
  assert metrics.anls("", [""]) == 1.0


# --- IoU and grounding -------------------------------------------------------------------

def test_iou_hand_cases():
  assert metrics.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0  # disjoint
  assert metrics.iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # sharing an edge only
  assert metrics.iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)  # contained
  assert metrics.iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)  # partial
  assert metrics.iou((0, 0, 10, 10), (0, 0, 10, 5)) == pytest.approx(0.5)
  assert metrics.iou((1.5, 2, 3.5, 4), (1.5, 2, 3.5, 4)) == 1.0
  assert metrics.iou((5, 5, 5, 9), (5, 5, 5, 9)) == 0.0  # empty boxes


def test_grounding_accuracy_hand_cases():
  gt = [(0, 0, 10, 8), (5, 5, 9, 9), (0, 0, 10, 10)]
  pred = [(0, 0, 10, 10), (0, 0, 1, 1), (0, 0, 10, 5)]  # IoU 0.8 hit, 0 miss, 0.5 hit (>=)
  assert metrics.grounding_accuracy(pred, gt) == pytest.approx(2 / 3)
  assert metrics.grounding_accuracy(pred[:1], gt) == pytest.approx(1 / 3)  # missing ones are misses
  assert metrics.grounding_accuracy([None, (5, 5, 9, 9)], gt[:2]) == 0.5
  assert metrics.grounding_accuracy(pred, gt, threshold=0.9) == 0.0
  assert metrics.grounding_hit((3, 4), (3, 4, 5, 6)) == 0.0  # a point is not a box


# --- stand-in models ---------------------------------------------------------------------

@dataclasses.dataclass
class Answer:
  text: str
  boxes: list = dataclasses.field(default_factory=list)


def key(prompt, images):
  h = hashlib.sha256(prompt.encode())
  for image in images:
    h.update(np.ascontiguousarray(image).tobytes())
  return h.hexdigest()


class TableModel:
  """Answers from a table {key(prompt, images): Answer}; records every call."""

  def __init__(self, table=None, default=None, config=None):
    self.table, self.config, self.calls = table or {}, config, []
    self.default = default or Answer("zzz")

  def generate_batch(self, prompts, images, **kwargs):
    images = images or [[] for _ in prompts]
    self.calls.append((list(prompts), [list(ims) for ims in images], kwargs))
    return [self.table.get(key(p, ims), self.default) for p, ims in zip(prompts, images)]

  def generate(self, prompt, images=None, **kwargs):
    return self.generate_batch([prompt], [images or []], **kwargs)[0]


# --- the JSONL runner --------------------------------------------------------------------

def write_benchmark(tmp_path):
  rng = np.random.default_rng(0)
  images = {}
  for name, hw in (("a.png", (20, 30)), ("b.png", (16, 16)), ("c.png", (40, 50))):
    images[name] = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "img", exist_ok=True)
    Image.fromarray(images[name]).save(tmp_path / "img" / name)
  rows = [
      dict(id="v1", image="img/a.png", question="How many dogs?", answers=["2"] * 2 + ["3"] * 8, task="vqa"),
      dict(id="v2", image="img/b.png", question="What color?", answers=["red"] * 10, task="vqa"),
      dict(id="d1", images=["img/a.png", "img/b.png"], question="<image> and <image>: what is written?",
           answer="kitten", metric="anls", task="doc"),
      dict(id="g1", image="img/c.png", question="Where is the cat?", box=[10, 10, 30, 30], task="ref"),
      dict(id="g2", image="img/c.png", question="Where is the dog?", box=[0, 0, 10, 10], task="ref"),
  ]
  path = tmp_path / "bench.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return path, images


def test_runner_scores_and_reports(tmp_path):
  path, images = write_benchmark(tmp_path)
  a, b, c = images["a.png"], images["b.png"], images["c.png"]
  table = {
      key("<image>\nHow many dogs?", [a]): Answer("two"),  # 2 of 10 -> 0.6
      key("<image>\nWhat color?", [b]): Answer("Red."),  # 1.0
      key("<image> and <image>: what is written?", [a, b]): Answer("sitting"),  # 1 - 3/7
      key("<image>\nWhere is the cat?", [c]): Answer("[200, 250, 600, 750]", [(10, 10, 30, 25)]),  # IoU 0.75
      key("<image>\nWhere is the dog?", [c]): Answer("[0, 0, 1000, 1000]", [(0, 0, 50, 40)]),  # IoU 0.05
  }
  model = TableModel(table)
  report = runner.evaluate(model, str(path), batch_size=2, out_dir=str(tmp_path / "out"), max_new_tokens=7)
  assert [len(p) for p, _, _ in model.calls] == [2, 2, 1]
  assert all(kw == {"max_new_tokens": 7} for _, _, kw in model.calls)
  assert report["num"] == 5
  assert report["metrics"] == pytest.approx({"vqa": 0.8, "anls": 1 - 3 / 7, "grounding": 0.5})
  assert report["tasks"]["vqa"]["vqa"] == pytest.approx({"score": 0.8, "num": 2})
  assert report["tasks"]["ref"]["grounding"] == {"score": 0.5, "num": 2}
  assert [p["score"] for p in report["predictions"]] == pytest.approx([0.6, 1.0, 1 - 3 / 7, 1.0, 0.0])
  assert json.loads((tmp_path / "out" / "REPORT.json").read_text())["metrics"] == report["metrics"]
  md = (tmp_path / "out" / "REPORT.md").read_text()
  assert "| ref | grounding | 2 | 50.0 |" in md and "| vqa | vqa | 2 | 80.0 |" in md

  limited = runner.evaluate(TableModel(table), str(path), metric="exact_match", limit=2)
  # Exact match: "two" equals one of the references ("2"), "Red." equals "red".
  assert limited["num"] == 2 and limited["metrics"] == {"exact_match": 1.0}


def test_runner_rejects_bad_rows(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"question": "q?"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1.*answers"):
    runner.evaluate(TableModel(), str(path))
  path.write_text('{"question": "q?", "answer": "a", "metric": "bleu"}\n')
  with pytest.raises(ValueError, match="metric='bleu'"):
    runner.evaluate(TableModel(), str(path))
  path.write_text('{"question": "q?", "answer": "a", "metric": "grounding"}\n')
  with pytest.raises(ValueError, match="needs a 'box'"):
    runner.evaluate(TableModel(), str(path))


# --- the built-in held-out evaluation ----------------------------------------------------

def tiny_config():
  c = configs.load_experiment(os.path.join(ROOT, "experiments", "tiny.py"))
  c.data.eval_examples = 12
  return c


def test_pixel_boxes_hand_case():
  image = np.zeros((50, 80, 3), np.uint8)  # h 50, w 80
  assert builtin_eval.pixel_boxes("a [100, 200, 500, 1000] b [1, 2]", image) == [(8.0, 10.0, 40.0, 50.0)]


def test_builtin_eval_oracle_and_wrong_models(tmp_path):
  config = tiny_config()
  tasks = builtin_eval.config_tasks(config)
  assert tasks == ["qa", "text_rich", "counting", "refer", "ground", "multi_image", "text_chat"]
  table, grounding = {}, 0
  for task in tasks:
    for q in builtin_eval.questions(task, 12, seed=config.seed, image_scale=config.data.image_scale):
      table[key(q["prompt"], q["images"])] = Answer(q["answer"], list(q["boxes"]))
      grounding += bool(q["boxes"])
      assert q["prompt"].count("<image>") == len(q["images"])
  assert grounding >= 6
  oracle = TableModel(table, config=config)
  assert builtin_eval.evaluate_builtin(oracle, out_dir=str(tmp_path)) == {t: 1.0 for t in tasks}
  report = json.loads((tmp_path / "REPORT.json").read_text())
  assert report["num_per_task"] == 12 and set(report["baseline"]) == set(tasks)
  assert all(0 <= v < 1 for v in report["baseline"].values())
  assert report["baseline"]["ground"] < 0.5
  picture = Image.open(tmp_path / "grounding.png")
  assert picture.size[0] >= 64 and np.asarray(picture).std() > 0
  assert "| ground | 12 | 100.0 |" in (tmp_path / "REPORT.md").read_text()

  wrong = builtin_eval.evaluate_builtin(TableModel(config=config), tasks=["qa", "ground"], num_per_task=5)
  assert wrong == {"qa": 0.0, "ground": 0.0}
  # A box off by a quarter of its size still counts (IoU >= 0.5), a far one does not.
  shifted = {}
  for q in builtin_eval.questions("ground", 12):
    boxes = [(x1 + (x2 - x1) / 8, y1, x2 + (x2 - x1) / 8, y2) for x1, y1, x2, y2 in q["boxes"]]
    shifted[key(q["prompt"], q["images"])] = Answer("", boxes)
  assert builtin_eval.evaluate_builtin(TableModel(shifted, config=config), tasks=["ground"]) == {"ground": 1.0}


class ShortModel(TableModel):
  """A stand-in trained at a short length: each image takes 100 prompt tokens."""

  def prompt(self, prompt, images=None):
    return dict(tokens=np.zeros(10 + 100 * len(images or ()), np.int32))


def test_builtin_eval_skips_and_counts_questions_longer_than_the_model(tmp_path):
  """A question the model cannot take (longer than data.seq_len, image tokens included) is not
  asked, as training drops such records: counted per task, the rest scored (the baseline too)."""
  config = tiny_config()
  config.data.seq_len = 250  # two images fit, three do not
  qs = builtin_eval.questions("multi_image", 12, seed=config.seed)
  short = [q for q in qs if len(q["images"]) <= 2]
  assert 0 < len(short) < len(qs)
  table = {key(q["prompt"], q["images"]): Answer(q["answer"]) for q in short}
  model = ShortModel(table, config=config)
  acc = builtin_eval.evaluate_builtin(model, tasks=["multi_image", "qa"], out_dir=str(tmp_path))
  assert acc["multi_image"] == 1.0 and acc["qa"] == 0.0
  assert all(len(ims) <= 2 for _, images, _ in model.calls for ims in images)
  report = json.loads((tmp_path / "REPORT.json").read_text())
  assert report["too_long"] == {"multi_image": len(qs) - len(short)}
  assert f"| multi_image | {len(short)} | 100.0 |" in (tmp_path / "REPORT.md").read_text()
  expected = builtin_eval.baseline_accuracy(["multi_image"], 12, seed=config.seed, asked={"multi_image": short})
  assert report["baseline"]["multi_image"] == expected["multi_image"]


def test_builtin_eval_rejects_document_tasks():
  with pytest.raises(ValueError, match="not a question task"):
    builtin_eval.questions("caption", 2)
  with pytest.raises(ValueError, match="built-in tasks"):
    builtin_eval.questions("nope", 2)


# --- with the real inference model (random weights: structure, not accuracy) ------------

@pytest.fixture(scope="module")
def tiny_model():
  return load_model(tiny_config(), None, devices=jax.devices()[:1])


def test_real_model_runner_and_builtin_eval(tiny_model, tmp_path):
  path, _ = write_benchmark(tmp_path)
  report = runner.evaluate(tiny_model, str(path), batch_size=4, max_new_tokens=6, out_dir=str(tmp_path / "bench"))
  assert report["num"] == 5 and set(report["metrics"]) == {"vqa", "anls", "grounding"}
  assert all(0 <= v <= 1 for v in report["metrics"].values())
  assert all(isinstance(p["prediction"], str) for p in report["predictions"])
  acc = builtin_eval.evaluate_builtin(tiny_model, tasks=["ground", "multi_image", "text_chat"], num_per_task=3,
                                      batch_size=3, max_new_tokens=6, out_dir=str(tmp_path / "builtin"))
  assert set(acc) == {"ground", "multi_image", "text_chat"} and all(0 <= v <= 1 for v in acc.values())
  written = json.loads((tmp_path / "builtin" / "REPORT.json").read_text())
  assert written["accuracy"] == acc and (tmp_path / "builtin" / "grounding.png").exists()


def save_params(model, directory):
  """A checkpoint holding the model's params (what load_model reads from a run)."""
  checkpointer = ckpt_lib.Checkpointer(str(directory), async_save=False)
  checkpointer.save(dict(step=np.int32(1), params=jax.device_get(model.params), opt_state=dict(count=np.zeros(1)),
                         rng=np.zeros(2, np.uint32)), force=True)
  checkpointer.close()


def test_cli_builtin_and_benchmark(tiny_model, tmp_path):
  save_params(tiny_model, tmp_path / "run" / "checkpoints")
  # The run's own config, as training writes it: without --config the evaluation reads it, so its
  # 2 held-out questions a task (experiments/tiny.py asks 512) are what gets asked.
  run_config = tiny_config()
  run_config.data.eval_examples = 2
  run_record.write_config(run_config, str(tmp_path / "run"))
  path, _ = write_benchmark(tmp_path)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  base = [sys.executable, "-m", "mm15_jax.evaluation", f"--checkpoint={tmp_path / 'run'}", "--max_new_tokens=4"]
  out = subprocess.run(base + ["--builtin", "--tasks=qa,ground", f"--out={tmp_path / 'b'}"],
                       cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=300)
  assert "| qa | 2 |" in out.stdout and "| ground | 2 |" in out.stdout
  assert "evaluate: 8/8 questions (100%)" in out.stderr  # 2 tasks x 2 questions, with and without images
  assert set(json.loads((tmp_path / "b" / "REPORT.json").read_text())["accuracy"]) == {"qa", "ground"}
  out = subprocess.run(base + ["--config=experiments/tiny.py", f"--benchmark={path}", f"--out={tmp_path / 'j'}",
                               "--limit=2"], cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=300)
  assert "| vqa | vqa | 2 |" in out.stdout and "evaluate: 2/2 questions (100%)" in out.stderr
  # No --config and no run config to fall back on: said before anything loads.
  out = subprocess.run([sys.executable, "-m", "mm15_jax.evaluation", f"--checkpoint={tmp_path / 'nowhere'}",
                        "--builtin", f"--out={tmp_path / 'n'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0 and "has no config.json of a run" in out.stderr and "--config=" in out.stderr
