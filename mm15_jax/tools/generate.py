"""Answer a prompt about images with a trained model; print the answer and its boxes.

  python -m mm15_jax.tools.generate --config=experiments/tiny.py --checkpoint=workdirs/tiny \\
      --image=a.png [--image=b.png] --prompt="Where is the red circle?" [--render=out.png]

Boxes are printed in pixels of the first image; `--render` draws them, labelled, on it.
Without --config, the config is the run's own (the config.json beside its checkpoints). Any
config field can be overridden as in training (`--config.mesh.data=1`). Several processes
(launch/local.sh with MM15_MODULE=mm15_jax.tools.generate, or MM15_DISTRIBUTED=1) generate
together; process 0 prints and renders.
"""


from absl import app, flags, logging
from ml_collections import config_flags

from mm15_jax import cli, distributed

distributed.define_flags()

_CONFIG = config_flags.DEFINE_config_file("config", None, cli.CONFIG_HELP, lock_config=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A run's workdir, its checkpoints/ or a step directory.")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image files, in the order the prompt names them.")
_PROMPT = flags.DEFINE_string("prompt", None, "The question; coordinates in it on the image's 0..1000 scale.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "Extra stop strings (besides <eos>).")
_RENDER = flags.DEFINE_string("render", None, "Write the first image with the answer's boxes to this PNG.")


def main(argv):
  del argv

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  cli.check_config_source(_CONFIG.value, _CHECKPOINT.value)
  distributed.initialize()
  cli.use_compilation_cache()

  from mm15_jax.inference import load_model, render
  from mm15_jax.inference.prompt import as_image

  if _RENDER.value and not _IMAGE.value:
    raise app.UsageError("--render draws on the first image: give --image")
  if not _CHECKPOINT.value and distributed.is_main():
    print("warning: no --checkpoint, using randomly initialised params")
  model = load_model(_CONFIG.value, _CHECKPOINT.value or None)
  images = [as_image(path) for path in _IMAGE.value]
  answer = model.generate(_PROMPT.value, images, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                          top_p=_TOP_P.value, seed=_SEED.value, stop=_STOP.value)
  if not distributed.is_main():  # every process has the same answer
    return
  print(answer.text)
  for label, box in zip(answer.labels, answer.boxes):
    print(f"  {label or 'box'}: [{', '.join(f'{v:.1f}' for v in box)}] px")
  if _RENDER.value:
    render(images[0], answer, path=_RENDER.value)
    print(f"rendered to {_RENDER.value}")


def run():
  cli.run(main, __doc__, required=["prompt"])


if __name__ == "__main__":
  run()
