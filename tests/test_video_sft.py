"""MM1.5-Video SFT: the built-in clips checked against their pixels, JSONL clips (a folder of
frames, a GIF) through JSONL, ArrayRecord and the mixture, the tile budget check, and
experiments/mm15_video.py:tiny,sft trained end to end."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import builtin, convert, mixture, records, sources, video_frames
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.sequence import ExampleBuilder
from mm15_jax import configs
from mm15_jax.evaluation import builtin_eval
from mm15_jax.inference import video
from mm15_jax.train import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 90
# Typed in from the generator's palette (data_pipelines/builtin/scenes.py), not imported.
SHAPE_COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 80, 230), "yellow": (245, 215, 35),
                "purple": (140, 50, 190)}
QUESTIONS = {"motion": re.compile(r"(?:Which way|In which direction) does the (\w+) (\w+) move\?"),
             "appear": re.compile(r"In which frame does the (\w+) (\w+) appear\?"),
             "count": re.compile(r"How many times does the (\w+) (\w+) appear\?")}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def experiment(spec):
  return configs.load_experiment(os.path.join(ROOT, "experiments", spec))


def clips(n=N, split="train"):
  src = builtin.SOURCES["video"](split, n)
  return [src[i] for i in range(n)]


# --- references from pixels -------------------------------------------------------------

def target_masks(frames, color):
  """Per frame, the pixels of the named colour (one object per colour in a clip)."""
  return [np.all(f == np.array(SHAPE_COLORS[color], np.uint8), axis=-1) for f in frames]


def shape_of(mask):
  rows, cols = np.nonzero(mask)
  h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
  assert h == w >= 6, "shapes are drawn in square boxes of >= 6 px"
  fill = mask.sum() / (h * w)
  return "square" if fill == 1 else "circle" if fill > 0.72 else "triangle"


def direction(masks):
  """left/right/up/down from the centroids: straight, monotone, along one axis."""
  centroids = np.array([[np.nonzero(m)[1].mean(), np.nonzero(m)[0].mean()] for m in masks])  # (x, y)
  steps = np.diff(centroids, axis=0)
  axis = int(np.argmax(np.abs(centroids[-1] - centroids[0])))
  assert np.all(steps[:, 1 - axis] == 0), "moves along one axis"
  assert np.all(np.abs(steps[:, axis]) >= 1) and len(set(np.sign(steps[:, axis]))) == 1, "a step every frame"
  return (("left", "right"), ("up", "down"))[axis][int(steps[0, axis] > 0)]


def runs(visible):
  """Runs of consecutive visible frames: rising edges of the 0/1 sequence."""
  return int(np.sum(np.diff(np.r_[0, np.asarray(visible, int)]) == 1))


def reference(kind, frames, color):
  masks = target_masks(frames, color)
  visible = [bool(m.any()) for m in masks]
  if kind == "motion":
    assert all(visible)
    return direction(masks)
  if kind == "appear":
    k = visible.index(True)
    assert not any(visible[:k]) and all(visible[k:])
    return f"frame {k + 1}"
  return str(runs(visible))


def question_of(text):
  for kind, pattern in QUESTIONS.items():
    if m := pattern.fullmatch(text):
      return kind, m[1], m[2]
  raise AssertionError(text)


# --- the built-in clips -----------------------------------------------------------------

def test_builtin_clip_answers_match_pixels():
  kinds, answers = set(), set()
  for rec in clips():
    records.validate(rec)
    frames, msgs = rec["images"], rec["messages"]
    n = len(frames)
    assert rec["kind"] == "multi_image" and 4 <= n <= 8 and len({f.shape for f in frames}) == 1
    question = msgs[0]["content"][len("<image>\n") * n:]
    # The same layout inference gives a clip (one marker per frame, then the question).
    assert msgs[0]["content"] == video_frames.video_prompt(question, n) == "<image>\n" * n + question
    kind, color, shape = question_of(question)
    masks = target_masks(frames, color)
    assert {shape_of(m) for m in masks if m.any()} == {shape}
    assert len({int(m.sum()) for m in masks if m.any()}) == 1  # one shape of one size, never cut or covered
    assert msgs[1]["content"] == reference(kind, frames, color)
    for follow_up, answer in zip(msgs[2::2], msgs[3::2]):
      assert follow_up["content"] == "How many frames are there?" and answer["content"] == str(n)
    kinds.add(kind)
    answers.add(msgs[1]["content"])
  assert kinds == set(QUESTIONS)
  assert set(OPPOSITE) <= answers and {"frame 2", "frame 3", "1", "2", "3"} <= answers


def test_questions_need_several_frames():
  """Clips made of the same single frames get different answers: each answer is a function
  of the frames' order, which no single frame shows."""
  flipped = appear_answers = reordered = 0
  for rec in clips():
    frames = rec["images"]
    kind, color, _ = question_of(rec["messages"][0]["content"].split("\n")[-1])
    answer = rec["messages"][1]["content"]
    if kind == "motion":  # the same frames backwards: the opposite direction
      assert reference(kind, frames[::-1], color) == OPPOSITE[answer]
      flipped += 1
    elif kind == "appear":  # first frame always without the target, last always with it
      masks = target_masks(frames, color)
      assert not masks[0].any() and masks[-1].any()
      appear_answers += 1
    elif int(answer) > 1:  # the visible frames first: the same frames appear once
      visible = [bool(m.any()) for m in target_masks(frames, color)]
      order = np.argsort([not v for v in visible], kind="stable")
      assert reference(kind, [frames[i] for i in order], color) == "1"
      reordered += 1
  assert flipped >= 10 and appear_answers >= 10 and reordered >= 5
  # Without the frames the questions are near guesses: the most common train answer per question.
  blind = builtin_eval.baseline_accuracy(["video"], 60, train_examples=300)["video"]
  assert blind < 0.45, blind


def test_train_and_eval_clips_differ_and_regenerate():
  def digest(rec):
    return key(repr(rec["messages"]), rec["images"])
  train, evals = [digest(r) for r in clips(40)], [digest(r) for r in clips(40, "eval")]
  assert train == [digest(r) for r in clips(40)] and not set(train) & set(evals)


def test_builtin_clip_is_asked_as_inference_asks(tmp_path):
  """A clip saved as a folder of frames reaches the model as the training record's text and frames."""
  rec = clips(3, "eval")[0]
  for i, frame in enumerate(rec["images"]):
    Image.fromarray(frame).save(tmp_path / f"frame_{i + 1}.png")
  model = RecordingModel(experiment("mm15_video.py:tiny,sft"))
  question = rec["messages"][0]["content"].split("\n")[-1]
  video.answer_video(model, str(tmp_path), question)
  ((prompt, frames),) = model.calls
  assert prompt == rec["messages"][0]["content"]
  assert all(np.array_equal(a, b) for a, b in zip(frames, rec["images"])) and len(frames) == len(rec["images"])


@dataclasses.dataclass
class Answer:
  text: str
  boxes: list = dataclasses.field(default_factory=list)


class RecordingModel:
  def __init__(self, config, table=None):
    self.config, self.calls, self.table = config, [], table or {}

  def generate(self, prompt, images=None, **kwargs):
    self.calls.append((prompt, images))
    return Answer("")

  def generate_batch(self, prompts, images, **kwargs):
    return [Answer(self.table.get(key(p, ims), "")) for p, ims in zip(prompts, images)]


def key(prompt, images):
  return prompt, b"".join(im.tobytes() for im in images)


def test_builtin_eval_asks_video_questions():
  config = experiment("mm15_video.py:tiny,sft")
  assert "video" in builtin_eval.config_tasks(config)
  assert "video" not in builtin_eval.config_tasks(experiment("tiny.py"))
  qs = builtin_eval.questions("video", 12)
  oracle = RecordingModel(config, {key(q["prompt"], q["images"]): q["answer"] for q in qs})
  assert builtin_eval.evaluate_builtin(oracle, config, tasks=["video"], num_per_task=12) == {"video": 1.0}
  assert builtin_eval.evaluate_builtin(RecordingModel(config), config, tasks=["video"], num_per_task=12) == {
      "video": 0.0}


# --- JSONL / ArrayRecord clips ----------------------------------------------------------

def gray(i, hw=(12, 16)):
  return np.full((*hw, 3), 8 * i, np.uint8)


def levels(frames):
  return [int(f[0, 0, 0]) // 8 for f in frames]


def middles(total, n):
  """The middle frame of each of n equal segments (all frames when total <= n)."""
  if total <= n:
    return list(range(total))
  return [int(math.floor((i + 0.5) * total / n)) for i in range(n)]


@pytest.fixture
def clip_dir(tmp_path):
  folder = tmp_path / "clips" / "0001"
  folder.mkdir(parents=True)
  for i in range(30):  # frame_1 .. frame_30: natural order, "frame_10" after "frame_9"
    Image.fromarray(gray(i)).save(folder / f"frame_{i + 1}.png")
  short = tmp_path / "clips" / "short"
  short.mkdir()
  for i in range(3):
    Image.fromarray(gray(10 + i)).save(short / f"{i:02d}.png")
  first, *rest = [Image.fromarray(gray(i, (10, 14))) for i in range(20)]
  first.save(tmp_path / "clips" / "0002.gif", save_all=True, append_images=rest, duration=40, loop=0)
  lines = [
      {"video": "clips/0001/", "question": "What changes?", "answer": "it gets brighter", "category": "general"},
      {"video": "clips/0002.gif", "messages": [{"role": "user", "content": "<video>\nWhat changes?"},
                                                {"role": "assistant", "content": "brighter"},
                                                {"role": "user", "content": "And then?"},
                                                {"role": "assistant", "content": "nothing"}]},
      {"video": "clips/short", "question": "How long is it?", "answer": "three frames"},
      {"video": "clips/missing.gif", "question": "q", "answer": "a"},
      {"video": "clips/0001/", "images": ["clips/0001/frame_1.png"], "question": "q", "answer": "a"},
      {"video": "clips/0001/", "messages": [{"role": "user", "content": "<image>\nq"},
                                             {"role": "assistant", "content": "a"}]},
      {"video": "clips/0001/", "question": "no answer"},
  ]
  path = tmp_path / "clips.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  return path


def test_jsonl_clips_sample_frames_as_inference_does(clip_dir):
  root = str(clip_dir.parent)
  src = sources.JsonlSource(str(clip_dir), frames=8)
  folder, gif, short = (records.decode(src[i]) for i in range(3))
  assert levels(folder["images"]) == middles(30, 8) == levels(video.load_frames(f"{root}/clips/0001", 8))
  assert folder["kind"] == "multi_image" and folder["category"] == "general"
  assert [m["content"] for m in folder["messages"]] == ["<image>\n" * 8 + "What changes?", "it gets brighter"]
  assert levels(gif["images"]) == middles(20, 8) == levels(video.load_frames(f"{root}/clips/0002.gif", 8))
  assert gif["images"][0].shape == (10, 14, 3)
  assert [m["content"] for m in gif["messages"]] == ["<image>\n" * 8 + "What changes?", "brighter", "And then?",
                                                     "nothing"]
  assert levels(short["images"]) == [10, 11, 12]  # shorter than 8: every frame, in order
  assert short["messages"][0]["content"] == "<image>\n" * 3 + "How long is it?"
  # Bad lines are counted skips naming the field, never a crash.
  reasons = [records.decode_or_skip(src[i])[1] for i in range(3, len(src))]
  assert reasons[0].startswith("CorruptImage") and "video" in reasons[0] and "missing.gif" in reasons[0]
  assert "images: a video line's images are its frames" in reasons[1]
  assert "messages[0].content" in reasons[2] and "<image>" in reasons[2]
  assert "video: a video line needs `question` and `answer`, or `messages`" in reasons[3]


def test_clips_through_array_record_and_the_mixture(clip_dir, tmp_path):
  summary = convert.convert(str(clip_dir), str(tmp_path / "ar" / "video"), shards=2, frames=6)
  assert summary["records"] == 3 and summary["skipped"] == 4 and summary["kinds"] == {"multi_image": 3}
  stored = sources.ArrayRecordSource(str(tmp_path / "ar" / "video"))
  folder = records.decode(stored[0])
  assert levels(folder["images"]) == middles(30, 6)
  assert levels(records.decode(stored[1])["images"]) == middles(20, 6)
  # A JSONL source in a config samples config.video.frames (or the source's own `frames`).
  config = experiment("mm15_video.py:tiny,sft")
  config.data.sources = {"clips": dict(kind="jsonl", weight=1.0, path=str(clip_dir))}
  jsonl = mixture.make_source("clips", config.data.sources["clips"], config, "train")
  assert levels(records.decode(jsonl[0])["images"]) == middles(30, config.video.frames)
  jsonl = mixture.make_source("clips", dict(kind="jsonl", path=str(clip_dir), frames=5), config, "train")
  assert len(records.decode(jsonl[0])["images"]) == 5


# --- the experiment and its tile budget -------------------------------------------------

def test_experiment_forms():
  for spec in ("3b", "7b", "tiny", "1b,sft"):  # the training-free forms keep working
    c = experiment(f"mm15_video.py:{spec}")
    assert c.data.anyres.split_max_images == 0 and c.data.max_tiles >= c.video.frames
  for spec, size in (("sft", "3b"), ("3b,sft", "3b"), ("7b,sft", "7b")):
    c = experiment(f"mm15_video.py:{spec}")
    assert c.video.frames == 24 and c.init.from_checkpoint == f"checkpoints/mm15_{size}_sft"
    assert "video" in c.data.sources and abs(sum(s.weight for s in c.data.sources.values()) - 1) < 1e-9
    assert 24 * (c.model.connector.tokens_per_tile + 8) + 64 <= c.data.seq_len and c.data.max_tiles >= 24
    assert config_checks.video_errors(c) == []
  tiny = experiment("mm15_video.py:tiny,sft")
  assert tiny.data.sources.video.kind == "builtin" and "video" not in builtin.MIXTURES["sft"]


def test_tile_budget_is_checked_and_sufficient():
  config = experiment("mm15_video.py:tiny,sft")
  tok = tokenizer_lib.load_tokenizer(config.model.llm.vocab_size)
  config_checks.check_config(config, tokenizer=tok, paths=False)
  for field, value in (("max_tiles", 7), ("seq_len", 64)):
    bad = experiment("mm15_video.py:tiny,sft")
    bad.data[field] = value
    with pytest.raises(ValueError, match=rf"data\.{field}={value} cannot hold 8 frames"):
      config_checks.check_config(bad, tokenizer=tok, paths=False)
  bad = experiment("mm15_video.py:tiny,sft")
  bad.data.anyres.split_max_images = 2
  with pytest.raises(ValueError, match=r"data\.anyres\.split_max_images=2"):
    config_checks.check_config(bad, paths=False)
  bad = experiment("mm15_video.py:tiny,sft")
  bad.video.frames = 4  # the built-in clips still have up to 8
  bad.data.max_tiles = 4
  with pytest.raises(ValueError, match=r"data\.max_tiles=4 cannot hold 8 frames"):
    config_checks.check_config(bad, paths=False)
  # The shortest row the check accepts holds the longest built-in clips whole.
  ok = [L for L in range(64, 257) if not config_checks.video_errors(_with(config, seq_len=L), tok)][0]
  builder = ExampleBuilder.from_config(_with(config, seq_len=ok), tok)
  longest = sorted(clips(60), key=lambda r: (len(r["images"]), sum(len(m["content"]) for m in r["messages"])))
  for rec in longest[-5:]:
    example = builder(rec)
    assert example is not None and not example["skipped"] and len(example["tiles"]) == len(rec["images"])


def _with(config, **data):
  c = config.copy_and_resolve_references()
  c.data.update(data)
  return c


def test_tiny_video_sft_trains_end_to_end(tmp_path):
  # One device and two rows: the smallest compile, so a fresh machine stays well under a minute.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  overrides = {"train.steps": 3, "train.batch_size": 2, "log_every": 1, "checkpoint.every": 3, "eval.batches": 1,
               "eval.generate_per_task": 0, "data.num_examples": 64, "data.eval_examples": 8}
  subprocess.run([sys.executable, "-m", "mm15_jax.train", "--config=experiments/mm15_video.py:tiny,sft",
                  f"--workdir={tmp_path}", "--no_progress"] + [f"--config.{k}={v}" for k, v in overrides.items()],
                 cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=300)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if "kind" not in r]
  assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in train)
  assert all(r["overlong_records"] == 0 and r["skipped_records"] == 0 for r in train)
  (evaluation,) = [r for r in rows if r.get("kind") == "eval"]
  assert math.isfinite(evaluation["video/loss"]) and evaluation["video/examples"] > 0
  assert os.path.isdir(tmp_path / "checkpoints" / "3")
