"""Evaluate a checkpoint on a JSONL benchmark or on the built-in held-out split.

  python -m mm15_jax.evaluation --config=experiments/mm15_3b.py:sft --checkpoint=WORKDIR \
      --benchmark=textvqa_val.jsonl --out=DIR [--metric=vqa] [--image_root=IMAGES] [--limit=100]
  python -m mm15_jax.evaluation --config=experiments/tiny.py --checkpoint=WORKDIR --builtin --out=DIR
  python -m mm15_jax.evaluation --checkpoint=WORKDIR --builtin --out=DIR   # the run's own config.json

Without --config, the config is the one the run wrote beside its checkpoints (WORKDIR/config.json,
with every override it was launched with).

Writes DIR/REPORT.json and DIR/REPORT.md (the built-in evaluation also DIR/grounding.png)
and prints the markdown table. Several processes (launch/local.sh with
MM15_MODULE=mm15_jax.evaluation, or MM15_DISTRIBUTED=1) evaluate together over all their
devices; process 0 writes and prints.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines import storage
from mm15_jax import cli, distributed

distributed.define_flags()

_CONFIG = config_flags.DEFINE_config_file("config", None, cli.CONFIG_HELP, lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A run's workdir, its checkpoints/ dir or one step dir.")
_BENCHMARK = flags.DEFINE_string("benchmark", None, "JSONL benchmark file (see mm15_jax/evaluation/runner.py).")
_BUILTIN = flags.DEFINE_bool("builtin", False, "Evaluate on the built-in held-out split instead.")
_OUT = flags.DEFINE_string("out", None, "Folder for REPORT.json and REPORT.md.")
_METRIC = flags.DEFINE_enum("metric", None, ["vqa", "anls", "exact_match", "grounding"],
                            "Metric of rows without their own (default: grounding with a box, else vqa).")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Image paths are relative to this (default: the JSONL's folder).")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first rows.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Questions generated together.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None,
                                       "Answer length limit in tokens (default 64; --builtin: 80, room for 3 boxes).")
_NUM_PER_TASK = flags.DEFINE_integer("num_per_task", None,
                                     "--builtin: questions per task (default data.eval_examples).")
_TASKS = flags.DEFINE_list("tasks", None, "--builtin: tasks (default: the config's built-in question tasks).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if bool(_BENCHMARK.value) == _BUILTIN.value:
    raise app.UsageError("give exactly one of --benchmark=FILE.jsonl and --builtin")
  cli.check_config_source(_CONFIG.value, _CHECKPOINT.value)
  distributed.initialize()
  from mm15_jax.inference import load_model

  model = load_model(_CONFIG.value, _CHECKPOINT.value)
  if _BUILTIN.value:
    from mm15_jax.evaluation.builtin_eval import evaluate_builtin

    evaluate_builtin(model, _CONFIG.value, tasks=_TASKS.value, num_per_task=_NUM_PER_TASK.value,
                     batch_size=_BATCH_SIZE.value, max_new_tokens=_MAX_NEW_TOKENS.value or 80, out_dir=_OUT.value,
                     progress=True)
  else:
    from mm15_jax.evaluation.runner import evaluate

    evaluate(model, _BENCHMARK.value, metric=_METRIC.value, image_root=_IMAGE_ROOT.value, limit=_LIMIT.value,
             batch_size=_BATCH_SIZE.value, max_new_tokens=_MAX_NEW_TOKENS.value or 64, out_dir=_OUT.value,
             progress=True)
  if distributed.is_main():
    print(storage.read_text(storage.join(_OUT.value, "REPORT.md")))


def run():
  cli.run(main, __doc__, required=["checkpoint", "out"])


if __name__ == "__main__":
  run()
