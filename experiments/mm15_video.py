"""MM1.5-Video: an SFT model answers about N uniformly sampled frames, one 144-token tile each,
fed as a multi-image input (docs/recipe.md, "Video"); training-free, or fine-tuned on clips.

Training-free (the image SFT model as it is):

  python -m mm15_jax.tools.video --config=experiments/mm15_video.py:3b --checkpoint=SFT_WORKDIR \
      --video=frames_dir_or.gif --prompt="What happens in the video?"

Video SFT (frames as images, one tile each, never split), starting from the image SFT model;
clips are JSONL lines {"video": "clips/0001/" or "clips/0001.gif", "question", "answer"}
(or "messages"; data_pipelines/sources/jsonl.py), converted with the same frame sampling:

  python -m data_pipelines.convert --jsonl=clips.jsonl --frames=24 --out=data/mm15/video/video --shards=64
  python -m mm15_jax.train --config=experiments/mm15_video.py:3b,sft --workdir=DIR \
      --config.init.from_checkpoint=SFT_WORKDIR
  python -m mm15_jax.train --config=experiments/mm15_video.py:tiny,sft --workdir=DIR   # CPU, built-in clips

arg: a comma list of a size (1b, 3b, 7b, 30b, or tiny for CPU; default 3b) and a stage. Without
"sft" the config is the training-free MM1.5-Video on the model of that stage (default the SFT
model); with "sft" it is also the video SFT run (data, steps, init), whose checkpoint the
same config answers with. Every form keeps the tile budget: data.max_tiles holds every frame
and data.seq_len frames x (tokens_per_tile + "Image k:") plus the text
(mm15_jax/train/config_checks.py video_errors).
"""

import os

from mm15_jax import configs

FRAMES = 24  # MM1.5-Video samples 24 frames
TINY_FRAMES = 8  # 8 x (4 image tokens + "Image k:") fit the tiny model's 256 tokens; the built-in clips have <= 8
ROOT = "data/mm15"


def get_config(arg="3b"):
  size, stage = configs.size_and_stage(arg)
  sft = "sft" in (arg or "").split(",")  # asked for explicitly: the video SFT run
  if size == "tiny":
    c = configs.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    c.stage = stage
    frames = TINY_FRAMES
  else:
    c = configs.mm15(size, stage)
    frames = FRAMES
  c.video = dict(frames=frames)
  # The reduced per-frame tile budget: one tile per frame, never split (whatever the number
  # of frames; the multi-image rule alone already keeps 3 or more frames unsplit).
  c.data.anyres.split_max_images = 0
  c.data.max_tiles = max(c.data.max_tiles, frames)
  if sft:
    video_sft(c, size)
  return c


def video_sft(c, size: str) -> None:
  """Clips, with some multi-image and text SFT data against forgetting (frames and images alike
  unsplit). Weights and steps are our choice (unpublished)."""
  if size == "tiny":
    # The built-in clips (data_pipelines/builtin/video.py) beside built-in multi-image and text
    # chat; from scratch unless --config.init.from_checkpoint names a tiny SFT run.
    c.data.sources = {"video": dict(kind="builtin", weight=0.8), "multi_image": dict(kind="builtin", weight=0.1),
                      "text_chat": dict(kind="builtin", weight=0.1)}
    return
  # ArrayRecord clips from `data_pipelines.convert --jsonl=... --frames=24` (frames stored as
  # images); a JSONL source works too: dict(kind="jsonl", paths=..., eval_paths=..., image_root=...),
  # sampled to config.video.frames as it is read.
  paper = configs.paper_sources("sft", ROOT)
  c.data.sources = {
      "video": dict(kind="array_record", weight=0.8, paths=f"{ROOT}/video/video-*.array_record",
                    eval_paths=f"{ROOT}/video/video_eval-*.array_record"),
      "multi_image": dict(paper["multi_image"], weight=0.1),
      "text": dict(paper["text"], weight=0.1),
  }
  c.init.from_checkpoint = f"checkpoints/mm15_{size}_sft"  # the image SFT model
  c.train.steps = 4000
  c.train.warmup_steps = 200
