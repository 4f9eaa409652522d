"""The tiny model taught to see, in ~13 minutes on 2 CPU cores: a spatial stage, then the quick start.

  python -m mm15_jax.tools.recipe --config=experiments/tiny_spatial.py --workdir=/tmp/mm15_spatial

The quick start (experiments/tiny.py) learns to read colours, shapes and words from its images
in a few minutes, but not to count or to give boxes. This experiment first trains the same
model on the spatial tasks (grounding, referring, counting, with captions, multi-image and QA
beside them) as single 32-px tiles without AnyRes splitting in 128-token rows, which is cheap
and frequent, then runs the quick start's mixture from it at a lower learning rate. It ends by
answering 96 held-out questions per built-in task (WORKDIR/sft/eval_tasks/REPORT.md): qa,
text_rich, refer and multi_image well above their no-image baselines, counting a little above;
grounding stays at its median-box baseline at this scale: at 32-px tiles the model does not
see the shapes that grounding phrases name (benchmarks/RESULTS.md, "A staged experiment that
sees", "Why the tiny model does not ground" and "Before binding and boxes"). One stage alone:
`python -m mm15_jax.train --config=experiments/tiny_spatial.py:spatial --workdir=DIR` (no
argument: the spatial stage); `:sft` needs `--config.init.from_checkpoint=SPATIAL_WORKDIR`.
"""

import os

from mm15_jax import configs

# Stage name -> (mixture weights, steps, learning rate), run in this order by mm15_jax.tools.recipe.
STAGES = {
    "spatial": dict(sources={"ground": 0.4, "refer": 0.15, "counting": 0.15, "caption": 0.1, "multi_image": 0.1,
                             "qa": 0.1}, steps=5000, lr=3e-3),
    "sft": dict(sources=None, steps=900, lr=1e-3),  # None: the quick start's mixture
}


def get_config(arg=None):
  stage = arg or "spatial"
  if stage not in STAGES:
    raise ValueError(f"experiments/tiny_spatial.py:{arg}: expected a stage {tuple(STAGES)}")
  c = configs.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
  st = STAGES[stage]
  c.stage = stage
  c.train.steps, c.train.lr = st["steps"], st["lr"]
  c.checkpoint.every = 1000
  if stage == "spatial":
    c.data.sources = {name: dict(kind="builtin", weight=w) for name, w in st["sources"].items()}
    # One tile per image, short rows: about three examples a row, each step cheap.
    c.data.anyres.enabled = False
    c.data.seq_len = 128
    c.train.loss_chunk = 128
    c.eval.generate_per_task = 0
    c.eval.every = 1000  # held-out loss per source: the learning curve
  else:
    c.eval.every = 450  # and the quick start's final 96 questions per task
  return c
