"""MM1.5-3B-MoE: 64 experts, top-2, MoE in every other decoder layer; stages as the dense 3B.

  python -m mm15_jax.train --config=experiments/mm15_3b_moe.py:pretrain --workdir=DIR
"""

from mm15_jax import configs


def get_config(arg="pretrain"):
  return configs.mm15_moe(size="3b", stage=arg or "pretrain")
