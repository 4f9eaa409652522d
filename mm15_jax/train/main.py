"""Entry point: `python -m mm15_jax.train --config=experiments/tiny.py --workdir=DIR`.

Any config field can be overridden: `--config.train.steps=50 --config.mesh.data=2`.
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from mm15_jax import cli, distributed

distributed.define_flags()
_CONFIG = config_flags.DEFINE_config_file("config", None, cli.CONFIG_HELP, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events go here "
                                "(a local path or gs://); relaunching with the same workdir resumes.")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "No progress bar: one log line per config.log_every steps "
                                  "(what launchers use; also when stdout is not a terminal).")


def main(argv):
  del argv
  import jax

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO

  distributed.initialize()  # multi-host: --coordinator_address=... or MM15_DISTRIBUTED=1
  cli.use_compilation_cache()

  from mm15_jax import modes
  from mm15_jax.hardware_rules import apply_hardware_rules
  from mm15_jax.train.loop import train_and_evaluate

  if modes.parse(modes.Objective, _CONFIG.value.train.objective) == modes.Objective.OBJECT_BOXES:
    from mm15_jax.train.encoder_stage import train_encoder  # the image encoder alone: no decoder, no token rows

    train_encoder(_CONFIG.value, _WORKDIR.value, progress=not _NO_PROGRESS.value)
    return

  # Before the mesh exists: a rule may change it. Fields set on the command line win over rules.
  config = apply_hardware_rules(
      _CONFIG.value, jax.devices()[0].device_kind, os.environ.get("TPU_ACCELERATOR_TYPE", ""),
      keep=set(config_flags.get_override_values(flags.FLAGS["config"])),
      report=print if jax.process_index() == 0 else None)
  train_and_evaluate(config, _WORKDIR.value, progress=not _NO_PROGRESS.value)


def run():
  cli.run(main, __doc__, required=["config", "workdir"])


if __name__ == "__main__":
  run()
