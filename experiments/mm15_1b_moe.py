"""MM1.5-1B-MoE: 64 experts, top-2, MoE in every other decoder layer; stages as the dense 1B.

  python -m mm15_jax.train --config=experiments/mm15_1b_moe.py:pretrain --workdir=DIR
"""

from mm15_jax import configs


def get_config(arg="pretrain"):
  return configs.mm15_moe(size="1b", stage=arg or "pretrain")
