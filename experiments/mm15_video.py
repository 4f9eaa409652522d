"""MM1.5-Video, training-free: an SFT model answers about N uniformly sampled frames, one
144-token tile each, fed as a multi-image input (MM15_SPEC.md, "Variants").

  python -m mm15_jax.video --config=experiments/mm15_video.py:3b --checkpoint=SFT_WORKDIR \
      --video=frames_dir_or.gif --prompt="What happens in the video?"

arg: a comma list of a size (1b, 3b, 7b, 30b, or tiny for CPU; default 3b) and a stage
(default sft: the model the frames are fed to), e.g. "7b" or "tiny".
"""

import os

from mm15_jax import configs

FRAMES = 24  # MM1.5-Video samples 24 frames


def get_config(arg="3b"):
  size, stage = configs.size_and_stage(arg)
  if size == "tiny":
    c = configs.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    c.stage = stage
    frames = 8  # 8 x (4 image tokens + "Image k:") fits the tiny model's 256 tokens
  else:
    c = configs.mm15(size, stage)
    frames = FRAMES
  c.video = dict(frames=frames)
  # The reduced per-frame tile budget: one tile per frame, never split (whatever the number
  # of frames; the multi-image rule alone already keeps 3 or more frames unsplit).
  c.data.anyres.split_max_images = 0
  c.data.max_tiles = max(c.data.max_tiles, frames)
  return c
