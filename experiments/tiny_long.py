"""The quick start trained 1500 steps (~10 min on 2 CPU cores), answering held-out questions
every 250 steps: the learning curve per task. By its end QA, text reading and referring use
the images clearly (they score lower blanked); grounding and counting do not yet
(benchmarks/RESULTS.md, "Does the quick-start model see?").

  python -m mm15_jax.train --config=experiments/tiny_long.py --workdir=/tmp/mm15_tiny_long
"""

import os

from mm15_jax import configs


def get_config(arg=None):
  del arg
  c = configs.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
  c.train.steps = 1500
  c.checkpoint.every = 500
  c.log_every = 50
  c.eval.every = 250  # generation accuracy per task at each (eval.generate_per_task from the quick start)
  return c
