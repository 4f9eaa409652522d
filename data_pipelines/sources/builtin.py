"""kind="builtin": a generated task of data_pipelines/builtin (the task name defaults to the source's)."""

from data_pipelines import builtin
from data_pipelines.sources import specs

KEYS = ("task",)


def build(name: str, spec, config, split: str):
  task = specs.field(spec, "task", name)
  if task not in builtin.SOURCES:
    raise ValueError(f"{specs.where(name)}.task={task!r}: built-in tasks are {sorted(builtin.SOURCES)}"
                     f"{specs.did_you_mean(task, builtin.SOURCES)}")
  size = config.data.num_examples if split == "train" else config.data.eval_examples
  return builtin.SOURCES[task](split, size, seed=config.seed, image_scale=config.data.image_scale)
