"""Video clips as MM1.5-Video sees them: N uniformly sampled frames, one image each.

Shared by training (JSONL clips, data_pipelines/sources/jsonl.py; the built-in "video" clips) and
inference (mm15_jax/inference/video.py), so both sample the same frames and lay out the
same prompt.

A video is a folder of frames (image files, in natural order: frame_2 before frame_10) or
an animated GIF (Pillow decodes it; other containers need a decoder that is not a
dependency: extract frames first, e.g. `ffmpeg -i clip.mp4 frames/%05d.png`).
Sampling: the video's T frames are cut into N equal segments and the middle frame of each
is taken, frame floor((2i + 1) * T / (2N)) for i = 0..N-1 (exact integers); all T frames
when T <= N. Each frame is one image marker in the prompt, so the tile indicators name
them "Image 1:" .. "Image N:" (data.anyres.indicators="index") in time order.
"""

import io
import re

import numpy as np
from PIL import Image, ImageSequence

from data_pipelines import records, storage

IMAGE_MARKER = records.IMAGE_MARKER
DEFAULT_FRAMES = 24  # MM1.5-Video
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def sample_indices(num_frames: int, n: int) -> list[int]:
  """The frame of each of n equal segments' middle; every frame when num_frames <= n."""
  if num_frames < 1:
    raise ValueError(f"the video has {num_frames} frames")
  if n < 1:
    raise ValueError(f"frames to sample = {n}: must be >= 1 (config.video.frames)")
  if num_frames <= n:
    return list(range(num_frames))
  return [(2 * i + 1) * num_frames // (2 * n) for i in range(n)]


def _natural_key(name: str):
  return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: str) -> list[str]:
  """The image files of a folder in natural order."""
  names = [n for n in storage.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS) and not n.startswith(".")]
  if not names:
    raise ValueError(f"{folder}: no frame images ({', '.join(FRAME_EXTENSIONS)})")
  return [storage.join(folder, n) for n in sorted(names, key=_natural_key)]


def _rgb(image: Image.Image) -> np.ndarray:
  return np.asarray(image.convert("RGB"))


def _gif_frames(video: str, num_frames: int) -> list[np.ndarray]:
  if not storage.exists(video):
    raise FileNotFoundError(f"video {video!r} not found (a folder of frames or an animated GIF)")
  try:
    with storage.open_file(video) as f, Image.open(f) as image:
      total = getattr(image, "n_frames", 1)
      wanted = set(sample_indices(total, num_frames))
      # Sequential decoding: GIF frames are deltas of the ones before.
      return [_rgb(frame) for i, frame in enumerate(ImageSequence.Iterator(image)) if i in wanted]
  except Image.UnidentifiedImageError as e:
    raise ValueError(f"{video}: not a folder of frames or an image/GIF Pillow can decode; extract the frames "
                     f"first, e.g. `ffmpeg -i {video} frames/%05d.png`, and pass the folder") from e


def load_frames(video: str, num_frames: int) -> list[np.ndarray]:
  """num_frames uint8 [H, W, 3] frames sampled uniformly from a folder of frames or a GIF."""
  if storage.isdir(video):
    frames = []
    files = frame_files(video)
    for i in sample_indices(len(files), num_frames):
      with storage.open_file(files[i]) as f, Image.open(f) as image:
        frames.append(_rgb(image))
    return frames
  return _gif_frames(video, num_frames)


def load_frame_bytes(video: str, num_frames: int) -> list[bytes]:
  """The same frames as load_frames, encoded: a folder's files as they are (no decode, as
  JSONL images), a GIF's frames as PNG (a GIF frame is not a file of its own)."""
  if storage.isdir(video):
    files = frame_files(video)
    return [storage.read_bytes(files[i]) for i in sample_indices(len(files), num_frames)]
  encoded = []
  for frame in _gif_frames(video, num_frames):
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
    encoded.append(buffer.getvalue())
  return encoded


def video_prompt(prompt: str, num_frames: int) -> str:
  """One image marker per frame, in time order, then the question."""
  return (IMAGE_MARKER + "\n") * num_frames + prompt
