"""Starting a command-line tool so that `--help` is useful.

absl's `--help` lists only the "key flags" of the module named by sys.argv[0] (the `__main__`
file, or the console script), and prints that module's docstring as the usage. Our tools define
their flags in library modules (`mm15_jax.train.main`, `mm15_jax.distributed`, ...) and the
console scripts have no docstring, so `--help` printed nothing useful. `run` declares every flag
this project defines as a key flag of the running program and gives it the tool's docstring.
"""

import os
import sys

from absl import app, flags

CONFIG_HELP = ("Experiment file, FILE or FILE:arg: one of experiments/ (e.g. experiments/tiny.py, "
               "experiments/mm15_3b.py:sft) or your own. Override any field on the command line with "
               "--config.FIELD=VALUE, e.g. --config.train.steps=50 --config.mesh.fsdp=-1.")
_OURS = ("mm15_jax", "data_pipelines")


def run(main, doc: str | None = None, required=(), argv=None) -> None:
  """app.run(main) with every flag of this project listed by --help and `doc` as the usage."""
  values = flags.FLAGS
  if required:
    flags.mark_flags_as_required(list(required))
  program = sys.argv[0]
  for module, module_flags in values.flags_by_module_dict().items():
    if module.split(".")[0] in _OURS:
      for flag in module_flags:
        values.register_key_flag_for_module(program, flag)
  main_module = sys.modules.get("__main__")
  if doc and main_module is not None and not main_module.__doc__:
    main_module.__doc__ = doc  # a console script: absl prints this as the usage
  app.run(main, argv=argv)


def check_config_source(config, checkpoint: str | None) -> None:
  """A tool that loads a run: without --config it reads the config.json the run wrote beside its
  checkpoints; say so before anything loads when there is none."""
  if config is not None:
    return
  from mm15_jax import run_record  # imports jax: only for the tools that load a run

  if not checkpoint or run_record.find_config(checkpoint) is None:
    where = f"--checkpoint={checkpoint} has no config.json of a run at or above it" if checkpoint else "no --checkpoint"
    raise app.UsageError(f"{where}: give --config=FILE.py[:arg], the experiment it was trained with")


def use_compilation_cache() -> None:
  """Compiled programs persist across runs in ~/.cache/mm15_jax/jax_cache, unless the user's
  JAX_COMPILATION_CACHE_DIR names another place."""
  import jax

  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/mm15_jax/jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def inspect_data() -> None:
  """`mm15-inspect`: data_pipelines.inspect (what the model sees of a config's mixture)."""
  from data_pipelines import inspect

  inspect.define_flags()
  run(inspect.main, inspect.__doc__, required=["config", "out"])


def convert_data() -> None:
  """`mm15-convert-data`: data_pipelines.convert (JSONL/Parquet/WebDataset -> ArrayRecord shards)."""
  from data_pipelines import convert

  convert.define_flags()
  run(convert.main, convert.__doc__)
