"""MM1.5-Video (frame sampling, loading, one tile per frame) and MM1.5-UI (tall grids, the
built-in phone screens checked against their pixels)."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from rendered_text import glyphs

from data_pipelines import anyres, records
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.builtin import ui
from data_pipelines.sequence import ExampleBuilder
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import configs
from mm15_jax.inference import load_model, video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(spec):
  return configs.load_experiment(os.path.join(ROOT, "experiments", spec))


# --- video -------------------------------------------------------------------------------

def test_sample_indices_hand_cases():
  # 100 frames -> 24: segment i covers [i * 100/24, (i + 1) * 100/24); its middle, floored.
  assert video.sample_indices(100, 24) == [2, 6, 10, 14, 18, 22, 27, 31, 35, 39, 43, 47, 52, 56, 60, 64, 68, 72,
                                           77, 81, 85, 89, 93, 97]
  assert video.sample_indices(5, 2) == [1, 3]  # middles 1.25 and 3.75
  assert video.sample_indices(10, 24) == list(range(10))  # short videos: every frame, none twice
  assert video.sample_indices(24, 24) == list(range(24))
  assert video.sample_indices(7, 1) == [3]
  with pytest.raises(ValueError, match="frames"):
    video.sample_indices(0, 4)


def gray(i):
  return np.full((12, 16, 3), 8 * i, np.uint8)


def test_folder_of_frames_in_natural_order(tmp_path):
  for i in range(30):  # frame_1.png .. frame_30.png: "frame_10" sorts after "frame_9"
    Image.fromarray(gray(i)).save(tmp_path / f"frame_{i + 1}.png")
  (tmp_path / "notes.txt").write_text("not a frame")
  frames = video.load_frames(str(tmp_path), 8)
  # (2i + 1) * 30 // 16 for i = 0..7
  assert [int(f[0, 0, 0]) // 8 for f in frames] == [1, 5, 9, 13, 16, 20, 24, 28]
  assert all(f.shape == (12, 16, 3) and f.dtype == np.uint8 for f in frames)


def test_animated_gif(tmp_path):
  path = str(tmp_path / "clip.gif")
  first, *rest = [Image.fromarray(gray(i)) for i in range(30)]
  first.save(path, save_all=True, append_images=rest, duration=40, loop=0)
  frames = video.load_frames(path, 8)
  assert [int(f[0, 0, 0]) // 8 for f in frames] == [1, 5, 9, 13, 16, 20, 24, 28]
  assert len(video.load_frames(path, 50)) == 30


def test_undecodable_video_is_a_clear_error(tmp_path):
  path = tmp_path / "clip.mp4"
  path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
  with pytest.raises(ValueError, match="ffmpeg"):
    video.load_frames(str(path), 8)
  with pytest.raises(FileNotFoundError):
    video.load_frames(str(tmp_path / "missing.gif"), 8)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no frame images"):
    video.load_frames(str(tmp_path / "empty"), 8)


@dataclasses.dataclass
class Answer:
  text: str
  boxes: list = dataclasses.field(default_factory=list)


class RecordingModel:
  def __init__(self, config):
    self.config, self.calls = config, []

  def generate(self, prompt, images=None, **kwargs):
    self.calls.append((prompt, images, kwargs))
    return Answer("a gray video")


def test_video_experiment_files():
  c = experiment("mm15_video.py:3b")
  assert c.video.frames == 24 and c.stage == "sft" and c.model.vit.image_size == 672
  assert c.data.anyres.split_max_images == 0 and c.data.max_tiles >= 24
  # 24 frames x (144 image tokens + "Image k:") fit the sequence.
  assert 24 * (c.model.connector.tokens_per_tile + 8) < c.data.seq_len
  assert experiment("mm15_video.py:1b,sft").model.llm.n_layers == configs.LLM_SIZES["1b"]["n_layers"]
  with pytest.raises(ValueError, match="'13b'"):
    experiment("mm15_video.py:13b")


def test_video_frames_are_one_tile_each(tmp_path):
  config = experiment("mm15_video.py:tiny")
  for i in range(40):
    Image.fromarray(np.full((40, 90, 3), 6 * i, np.uint8)).save(tmp_path / f"{i:03d}.png")  # wide: would split
  model = RecordingModel(config)
  assert video.answer_video(model, str(tmp_path), "What changes?", max_new_tokens=5).text == "a gray video"
  ((prompt, frames, kwargs),) = model.calls
  n = config.video.frames
  assert prompt == "<image>\n" * n + "What changes?" and len(frames) == n and kwargs == {"max_new_tokens": 5}
  # The training layout of that prompt: every frame one tile, named "Image k:" in time order.
  tok = tokenizer_lib.load_tokenizer(config.model.llm.vocab_size)
  builder = ExampleBuilder.from_config(config, tok)
  record = dict(kind="multi_image", messages=[dict(role="user", content=prompt), dict(role="assistant", content="x")],
                images=frames, category="", coords="none")
  example = builder(record)
  assert not example["skipped"] and example["tiles"].shape[0] == n
  text = tok.decode([t for t in example["tokens"] if t != tok.image_id])
  assert [int(k) for k in re.findall(r"Image (\d+):", text)] == list(range(1, n + 1))
  # Two frames would be split by a config that splits up to two images.
  model.config = experiment("tiny.py")
  with pytest.raises(ValueError, match="split_max_images"):
    video.answer_video(model, str(tmp_path), "q", num_frames=2)


# --- UI: tall grids ----------------------------------------------------------------------

def test_ui_experiment_grids():
  c = experiment("mm15_ui.py:3b")
  # Two split screens of 12 sub-images + overview each fit a row's tile budget.
  assert (c.data.anyres.n_min, c.data.anyres.n_max) == (4, 12) and c.data.max_tiles >= 2 * 13
  assert c.init.from_checkpoint == "checkpoints/mm15_3b_sft" and "ui" in c.data.sources
  assert abs(sum(s.weight for s in c.data.sources.values()) - 1) < 1e-9
  sft = configs.mm15("3b", "sft")
  t = 672
  # A 1:3 screen of 1344 x 4032 px: 6x2 tiles at full resolution with n_max 12; SFT's
  # n_max 9 has no full-resolution grid (needs >= 6 rows x 2 cols = 12 tiles).
  assert anyres.choose_grid(4032, 1344, tile=t, n_min=4, n_max=c.data.anyres.n_max) == (6, 2)
  # n_max 9: the scale min(rows * 672 / 4032, cols * 672 / 1344) is 2/3 at 4x2, 1/2 at 3x3 or
  # 9x1, 5/6 would need 5x2 = 10 tiles: 4x2 keeps the most, at 2/3 resolution.
  assert anyres.choose_grid(4032, 1344, tile=t, n_min=4, n_max=sft.data.anyres.n_max) == (4, 2)
  # A 1080 x 2340 phone screen fits 4x2 at full resolution either way.
  assert anyres.choose_grid(2340, 1080, tile=t, n_min=4, n_max=12) == (4, 2)
  tiny = experiment("mm15_ui.py:tiny")
  assert tiny.data.anyres.n_max == 6 and tiny.data.sources.ui.weight == 0.5
  # A 90 x 250 screen at 32 px tiles: 3x2 keeps 96/250 of it, the best with up to 6 tiles;
  # the default n_max 4 only gets 3x1 (32/90).
  assert anyres.choose_grid(250, 90, tile=32, n_min=1, n_max=6) == (3, 2)
  assert anyres.choose_grid(250, 90, tile=32, n_min=1, n_max=4) == (3, 1)


# --- UI: the built-in screens against their pixels ---------------------------------------

# Typed in from the generator's palette.
THEMES = {(250, 250, 250): dict(ink=(30, 30, 30), field=(150, 150, 150)),
          (25, 25, 30): dict(ink=(235, 235, 235), field=(120, 120, 120))}
ON, WHITE, CHECK = (50, 180, 90), (255, 255, 255), (40, 100, 220)
COORDS = re.compile(r"\[([\d, ]+)\]")


def crop(mask):
  rows, cols = np.nonzero(mask)
  return mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def is_color(pixels, rgb):
  return np.all(pixels == np.array(rgb, np.uint8), axis=-1)


def read_widgets(image):
  """[{kind, box, state, ink}] from the pixels: bands of non-background rows (the first is
  the title bar), each band's columns, the kind from the corner pixels."""
  bg = tuple(int(v) for v in image[-1, -1])
  theme = THEMES[bg]
  fg = ~is_color(image, bg)
  rows = fg.any(axis=1)
  starts = np.nonzero(rows & ~np.r_[False, rows[:-1]])[0]
  ends = np.nonzero(rows & ~np.r_[rows[1:], False])[0] + 1
  assert starts[0] == 0 and fg[:ends[0]].all()  # the title bar: full width, at the top
  widgets = []
  for y1, y2 in zip(starts[1:], ends[1:]):
    cols = np.nonzero(fg[y1:y2].any(axis=0))[0]
    x1, x2 = int(cols.min()), int(cols.max()) + 1
    part = image[y1:y2, x1:x2]
    tl, tr, br, inner = (tuple(int(v) for v in p) for p in (part[0, 0], part[0, -1], part[-1, -1], part[1, 1]))
    side = y2 - y1
    if tl == tr == br == inner:
      kind, state, ink = "button", "", is_color(part, WHITE)
    elif tl == tr == br == theme["field"] and inner == bg:
      kind, state, ink = "text field", "", is_color(part[1:-1, 1:-1], theme["field"])
    elif tl == bg and tr == br != bg:
      kind, state = "toggle", "on" if br == ON else "off"
      knob = np.nonzero(is_color(part, WHITE).any(axis=0))[0]  # the knob sits on the state's side
      assert (knob.min() >= part.shape[1] - side) == (state == "on")
      ink = is_color(part, theme["ink"])
    elif tl == theme["ink"] and inner == bg and tr == bg:
      kind = "checkbox"
      state = "checked" if is_color(part[side // 2, side // 2], CHECK) else "unchecked"
      ink = is_color(part[:, side:], theme["ink"])
    else:
      raise AssertionError(f"unrecognised widget at {(x1, y1, x2, y2)}: corners {tl} {tr} {br} {inner}")
    widgets.append(dict(kind=kind, box=(x1, int(y1), x2, int(y2)), state=state, ink=crop(ink)))
  return widgets


def named(widgets, name):
  """The widget whose kind and rendered label make `name` ("Save button", "Wi-Fi toggle")."""
  found = [w for w in widgets if name.endswith(" " + w["kind"]) and
           np.array_equal(w["ink"], glyphs(name[:-len(w["kind"]) - 1]))]
  assert len(found) == 1, (name, [w["kind"] for w in widgets])
  return found[0]


def test_ui_records_match_pixels():
  src = ui.UI("train", 80)
  kinds, ratios, themes = set(), [], set()
  for i in range(len(src)):
    rec = src[i]
    records.validate(rec)
    assert rec["kind"] == "conversation" and rec["category"] == "refer_ground" and rec["coords"] == "image"
    (image,) = rec["images"]
    h, w = image.shape[:2]
    ratios.append(h / w)
    themes.add(tuple(image[-1, -1]))
    widgets = read_widgets(image)
    assert 3 <= len(widgets) <= 6
    msgs = rec["messages"]
    assert msgs[0]["content"].startswith("<image>\n")
    for q, a in zip([m["content"].split("\n")[-1] for m in msgs[::2]], [m["content"] for m in msgs[1::2]]):
      values = [tuple(int(v) for v in m.split(",")) for m in COORDS.findall(q)]
      if values and len(values[0]) == 2:  # a point: the pixel it falls in belongs to one widget
        x, y = values[0][0] * w / 1000, values[0][1] * h / 1000
        (hit,) = [wd for wd in widgets if wd["box"][0] <= x < wd["box"][2] and wd["box"][1] <= y < wd["box"][3]]
        # On the control itself: a toggle's switch (its right 2 x height), a checkbox's box.
        side = hit["box"][3] - hit["box"][1]
        if hit["kind"] == "toggle":
          assert x >= hit["box"][2] - 2 * side
        if hit["kind"] == "checkbox":
          assert x < hit["box"][0] + side
        if q.startswith("What does the button"):
          assert hit["kind"] == "button" and np.array_equal(hit["ink"], glyphs(a))
          kinds.add("read")
        else:
          assert named(widgets, a) is hit
          kinds.add("what_point")
      elif values:  # a box: exactly one widget's box
        scale = np.array([w, h, w, h]) / 1000
        (hit,) = [wd for wd in widgets if np.allclose(values[0], np.array(wd["box"]) / scale, atol=0.5)]
        assert named(widgets, a) is hit
        kinds.add("what_box")
      elif m := re.fullmatch(r"Is the (.+) toggle on or off\?", q):
        assert named(widgets, f"{m[1]} toggle")["state"] == a
        kinds.add("toggle")
      elif m := re.fullmatch(r"Is the (.+) checkbox checked\?", q):
        assert named(widgets, f"{m[1]} checkbox")["state"] == ("checked" if a == "yes" else "unchecked")
        kinds.add("checkbox")
      elif m := re.fullmatch(r"(?:Where is the|Give the box of the) (.+?)[?.]", q):
        phrase = m[1]
        if phrase in ui.TYPES:  # the only widget of its kind
          (target,) = [wd for wd in widgets if wd["kind"] == phrase]
          kinds.add("ground_kind")
        else:
          target = named(widgets, phrase)
          kinds.add("ground")
        (box,) = [tuple(int(v) for v in s.split(",")) for s in COORDS.findall(a)]
        assert a == "[{}, {}, {}, {}]".format(*box)
        assert np.allclose(box, np.array(target["box"]) * 1000 / [w, h, w, h], atol=0.5 + 1e-9)
      else:
        raise AssertionError(q)
  assert kinds == {"read", "what_point", "what_box", "toggle", "checkbox", "ground", "ground_kind"}, kinds
  # Tall: 1.8 to 3 times as high as wide (rounded), both themes.
  assert 1.79 <= min(ratios) and max(ratios) <= 3.0 and np.median(ratios) > 2 and len(themes) == 2


def test_ui_through_the_tiny_ui_config():
  """A screen gets a tall grid, and its coordinates are remapped to the canvas."""
  config = experiment("mm15_ui.py:tiny")
  tok = tokenizer_lib.load_tokenizer(config.model.llm.vocab_size)
  builder = ExampleBuilder.from_config(config, tok)
  rec = ui.UI("eval", 4)[0]
  (layout,) = anyres.plan_images([rec["images"][0].shape[:2]], tile=config.model.vit.image_size,
                                 anyres=config.data.anyres)
  rows, cols = layout.grid
  assert rows > cols and rows * cols <= 6
  example = builder(rec)
  assert not example["skipped"] and example["tiles"].shape[0] == rows * cols + 1


def test_video_with_the_real_model_and_cli(tmp_path):
  """Random weights: the frames go through the real prompt layout and generation."""
  config = experiment("mm15_video.py:tiny")
  model = load_model(config, None, devices=jax.devices()[:1])
  first, *rest = [Image.fromarray(np.full((30, 40, 3), 8 * i, np.uint8)) for i in range(20)]
  first.save(tmp_path / "clip.gif", save_all=True, append_images=rest, duration=40)
  answer = video.answer_video(model, str(tmp_path / "clip.gif"), "What changes?", max_new_tokens=4)
  assert isinstance(answer.text, str) and len(answer.token_ids) <= 4
  layout = model.prompt(video.video_prompt("q", 8), video.load_frames(str(tmp_path / "clip.gif"), 8))
  assert len(layout["tiles"]) == 8  # one tile per frame

  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
  checkpointer.save(dict(step=np.int32(1), params=jax.device_get(model.params), opt_state=dict(count=np.zeros(1)),
                         rng=np.zeros(2, np.uint32)), force=True)
  checkpointer.close()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  out = subprocess.run(
      [sys.executable, "-m", "mm15_jax.tools.video", "--config=experiments/mm15_video.py:tiny",
       f"--checkpoint={tmp_path / 'run'}", f"--video={tmp_path / 'clip.gif'}", "--prompt=What changes?",
       "--max_new_tokens=4"], cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=300)
  assert out.stdout.strip() == answer.text  # greedy: the same answer from the same params
