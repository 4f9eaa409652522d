"""Tiny MM1.5 for CPU: trains on the built-in shapes data in a few minutes.

  python -m mm15_jax.train --config=experiments/tiny.py --workdir=/tmp/mm15_tiny
"""

from mm15_jax import configs


def get_config(arg=None):
  del arg
  c = configs.base()
  c.model.connector.tokens_per_tile = 4  # 4x4 patch grid pooled to 2x2
  c.model.connector.depth = 1
  c.model.connector.hidden_dim = 32
  c.model.dtype = "float32"  # bf16 matmuls are slower than fp32 on CPU
  c.model.remat = "none"
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 20
  c.checkpoint.every = 100
  c.log_every = 10
  c.eval.generate_per_task = 24  # the quick start ends by answering held-out questions
  return c


def get_sweep(arg=None):
  """`python -m mm15_jax.sweep --config=experiments/tiny.py --workdir=/tmp/mm15_sweep`"""
  del arg
  return [{"train.lr": lr} for lr in (1e-3, 3e-3, 1e-2)]
