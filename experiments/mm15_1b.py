"""MM1.5-1B: the three training stages of the paper's dense 1B model.

  python -m mm15_jax.train --config=experiments/mm15_1b.py:pretrain --workdir=DIR
  python -m mm15_jax.train --config=experiments/mm15_1b.py:cpt --workdir=DIR2 --config.init.from_checkpoint=DIR
  python -m mm15_jax.train --config=experiments/mm15_1b.py:sft --workdir=DIR3 --config.init.from_checkpoint=DIR2
"""

from mm15_jax import configs


def get_config(arg="pretrain"):
  return configs.mm15(size="1b", stage=arg or "pretrain")
