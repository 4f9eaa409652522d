"""Tiny MoE for CPU: the tiny model with 4 experts (top-2) in every other decoder layer.

  python -m mm15_jax.train --config=experiments/tiny_moe.py --workdir=/tmp/mm15_tiny_moe
"""

import os

from mm15_jax import configs


def get_config(arg=None):
  del arg
  c = configs.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
  c.model.moe.update(num_experts=4, top_k=2, interval=2, expert_mlp_dim=96)
  return c
