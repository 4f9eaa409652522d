"""MM1.5-30B: the three training stages of the paper's dense 30B model.

  python -m mm15_jax.train --config=experiments/mm15_30b.py:pretrain --workdir=DIR
  python -m mm15_jax.train --config=experiments/mm15_30b.py:cpt --workdir=DIR2 --config.init.from_checkpoint=DIR
  python -m mm15_jax.train --config=experiments/mm15_30b.py:sft --workdir=DIR3 --config.init.from_checkpoint=DIR2
  python -m mm15_jax.plan --config=experiments/mm15_30b.py   # memory and step time on c.topology
"""

from mm15_jax import configs


def get_config(arg="pretrain"):
  c = configs.mm15(size="30b", stage=arg or "pretrain")
  # Planned for pretraining (batch 512, benchmarks/RESULTS.md "Pod plans"): FSDP over 128 v5p
  # chips, 4 sequences each, 51 of 95 GiB per chip.
  c.topology = "v5p:4x4x8"
  return c
