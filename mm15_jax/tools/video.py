"""Ask a model about a video: N uniformly sampled frames, one tile each (MM1.5-Video).

  python -m mm15_jax.tools.video --config=experiments/mm15_video.py:3b --checkpoint=SFT_WORKDIR \
      --video=frames_dir_or.gif --prompt="What happens in the video?" [--frames=24]

Prints the answer. The sampling rule: data_pipelines/video_frames.py. Several processes
(launch/local.sh with MM15_MODULE=mm15_jax.tools.video, or MM15_DISTRIBUTED=1): process 0 prints.
"""

from absl import flags, logging
from ml_collections import config_flags

from mm15_jax import cli, distributed

distributed.define_flags()

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. experiments/mm15_video.py:3b.",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A run's workdir, its checkpoints/ dir or one step dir.")
_VIDEO = flags.DEFINE_string("video", None, "A folder of frame images or an animated GIF.")
_PROMPT = flags.DEFINE_string("prompt", None, "The question about the video.")
_FRAMES = flags.DEFINE_integer("frames", None, "Frames to sample (default config.video.frames).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Answer length limit in tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  distributed.initialize()
  from mm15_jax.inference import load_model, video

  model = load_model(_CONFIG.value, _CHECKPOINT.value)
  answer = video.answer_video(model, _VIDEO.value, _PROMPT.value, num_frames=_FRAMES.value,
                              max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                              top_p=_TOP_P.value, seed=_SEED.value)
  if distributed.is_main():  # every process has the same answer
    print(answer.text)


def run():
  cli.run(main, __doc__, required=["config", "checkpoint", "video", "prompt"])


if __name__ == "__main__":
  run()
