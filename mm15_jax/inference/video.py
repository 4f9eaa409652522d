"""MM1.5-Video, training-free (docs/recipe.md, "Video"): a video is N uniformly sampled
frames fed as a multi-image input, one tile per frame (no splitting, no temporal module).

Frame sampling, loading and the prompt layout live in data_pipelines/video_frames.py, so
video SFT (experiments/mm15_video.py:sft) trains on exactly what this asks with.
"""

from data_pipelines.video_frames import (  # noqa: F401  (re-exported: video.load_frames, ...)
  DEFAULT_FRAMES,
  FRAME_EXTENSIONS,
  IMAGE_MARKER,
  frame_files,
  load_frames,
  sample_indices,
  video_prompt,
)


def check_no_splitting(config, num_frames: int) -> None:
  """Frames are one tile each: the multi-image rule must not split them, and the tile
  budget must hold all of them."""
  anyres = config.data.anyres
  if anyres.enabled and num_frames <= anyres.split_max_images:
    raise ValueError(f"{num_frames} frames <= data.anyres.split_max_images={anyres.split_max_images}: the frames "
                     "would be split into sub-images; set --config.data.anyres.split_max_images=0 "
                     "(experiments/mm15_video.py does)")
  if num_frames > config.data.max_tiles:
    raise ValueError(f"{num_frames} frames need {num_frames} tiles but data.max_tiles={config.data.max_tiles}; "
                     f"set --config.data.max_tiles={num_frames} or sample fewer frames")


def answer_video(model, video: str, prompt: str, *, num_frames: int | None = None, **generate_kwargs):
  """The model's Answer to a question about a video (a folder of frames or a GIF).

  num_frames: default config.video.frames of the model's config, else 24 (MM1.5-Video).
  """
  config = model.config
  n = num_frames or getattr(getattr(config, "video", None), "frames", None) or DEFAULT_FRAMES
  frames = load_frames(video, n)
  check_no_splitting(config, len(frames))
  return model.generate(video_prompt(prompt, len(frames)), frames, **generate_kwargs)
