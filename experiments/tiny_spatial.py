"""The tiny model taught to see and to ground, in ~15 minutes on 2 CPU cores: an encoder stage,
a spatial stage, then the quick start's mixture.

  python -m mm15_jax.tools.recipe --config=experiments/tiny_spatial.py --workdir=/tmp/mm15_spatial

The quick start (experiments/tiny.py) learns to read colours, shapes and words from its images
in a few minutes, but not to count or to give boxes: trained only through its decoder, its
from-scratch encoder does not learn what is where. MM1.5 starts from a pretrained encoder; this
experiment makes one first (`:encoder`, train.objective="object_boxes": the ViT and connector
alone learn, per token, which colour of object is centred in its cell and that object's box),
then trains the model with that encoder frozen on the spatial tasks (`:spatial`: grounding,
referring, counting, with captions, multi-image and QA beside them) as single 32-px tiles in
128-token rows, which is cheap and frequent, then the quick start's mixture at a lower learning
rate (`:sft`, single tiles too). It ends by answering 96 held-out questions per built-in task
(WORKDIR/sft/eval_tasks/REPORT.md): every image task above its no-image baseline and above the
same model with its images blanked, grounding clearly above zero (docs/recipe.md;
benchmarks/RESULTS.md, "A pretrained encoder: the tiny model grounds"). One stage alone:
`python -m mm15_jax.train --config=experiments/tiny_spatial.py:STAGE --workdir=DIR` (no
argument: the spatial stage, which then needs `--config.init.vit_from=ENCODER_WORKDIR
--config.init.connector_from=ENCODER_WORKDIR`; `:sft` needs `--config.init.from_checkpoint=SPATIAL_WORKDIR`).
"""

import os

from mm15_jax import configs

# Stage name -> (mixture weights, steps, learning rate), run in this order by mm15_jax.tools.recipe.
STAGES = {
    # The image encoder alone, on labelled built-in tiles (which colours, and where): MM1.5's
    # encoder comes pretrained, this one is made here. Batch 64 tiles, no decoder: ~2 min.
    "encoder": dict(sources=None, steps=6000, lr=1e-3),
    "spatial": dict(sources={"ground": 0.4, "refer": 0.15, "counting": 0.15, "caption": 0.1, "multi_image": 0.1,
                             "qa": 0.1}, steps=4000, lr=3e-3),
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
  if stage == "encoder":
    c.train.objective = "object_boxes"
    c.train.batch_size = 64
    c.train.warmup_steps = 100
    c.checkpoint.every = st["steps"]
    c.eval.every = 1000
    return c
  # The encoder made above stays frozen from here on: the decoder learns to read it.
  c.train.trainable = "llm"
  if stage == "spatial":
    c.data.sources = {name: dict(kind="builtin", weight=w) for name, w in st["sources"].items()}
    # One tile per image, short rows: about three examples a row, each step cheap.
    c.data.anyres.enabled = False
    c.data.seq_len = 128
    c.train.loss_chunk = 128
    c.eval.generate_per_task = 0
    c.eval.every = 1000  # held-out loss per source: the learning curve
  else:
    # Single tiles here too: the encoder was taught on whole images in one tile, and AnyRes
    # sub-images undo the grounding the spatial stage learnt (benchmarks/RESULTS.md).
    c.data.anyres.enabled = False
    c.eval.every = 0  # at the end: held-out loss and the quick start's 96 questions per task
  return c
