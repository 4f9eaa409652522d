"""Tiny MoE for CPU: the tiny model with 4 experts (top-2) in every other decoder layer.

  python -m mm15_jax.train --config=experiments/tiny_moe.py --workdir=/tmp/mm15_tiny_moe   # the quick start
  python -m mm15_jax.tools.recipe --config=experiments/tiny_moe.py --workdir=/tmp/mm15_moe_recipe  # 3 stages

Every argument of experiments/tiny.py works here (no argument: the quick start; `:pretrain`,
`:cpt`, `:sft`: its three-stage recipe), with the experts added to each.
"""

import os

from mm15_jax import configs

_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")
STAGES = tuple(configs.experiment_module(_TINY).STAGES)


def get_config(arg=None):
  if arg and arg not in STAGES:
    raise ValueError(f"experiments/tiny_moe.py:{arg}: expected no argument (the quick start) or a stage {STAGES}")
  c = configs.load_experiment(f"{_TINY}:{arg}" if arg else _TINY)
  c.model.moe.update(num_experts=4, top_k=2, interval=2, expert_mlp_dim=96)
  return c
