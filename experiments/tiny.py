"""Tiny MM1.5 for CPU: trains on the built-in shapes data in a few minutes.

  python -m mm15_jax.train --config=experiments/tiny.py --workdir=/tmp/mm15_tiny       # the quick start
  python -m mm15_jax.tools.recipe --config=experiments/tiny.py --workdir=/tmp/mm15_recipe    # pretrain -> cpt -> sft

No argument: the quick start, one run of the built-in SFT-like mixture from scratch, ending with
generation accuracy per task. With a stage (`:pretrain`, `:cpt`, `:sft`): the paper's three-stage
recipe rehearsed at CPU scale (docs/recipe.md); each stage after the first starts from the one
before it (`mm15_jax.tools.recipe` sets `init.from_checkpoint`).
"""

from mm15_jax import configs

# The rehearsal's stages, shaped like the paper's (configs.STAGE_SETTINGS): pretraining on
# captions, interleaved documents and text at small tiles without splitting; high-resolution
# continual pretraining on text-rich images at larger tiles with AnyRes; then the SFT mixture.
STAGES = {
    "pretrain": dict(image_size=32, anyres=False, sources={"caption": 0.5, "interleaved": 0.1, "text_doc": 0.4},
                     steps=150, lr=3e-3, warmup=20),
    "cpt": dict(image_size=48, anyres=True, sources={"text_rich": 1.0}, steps=100, lr=1e-3, warmup=10),
    "sft": dict(image_size=48, anyres=True, sources=dict(configs.BUILTIN_SFT), steps=150, lr=1e-3, warmup=10),
}


def quick_start():
  """The quick start: the tiny model on the built-in SFT-like mixture plus captions, from scratch."""
  c = configs.base()
  c.model.connector.tokens_per_tile = 4  # 4x4 patch grid pooled to 2x2
  c.model.connector.depth = 1
  c.model.connector.hidden_dim = 32
  c.model.dtype = "float32"  # bf16 matmuls are slower than fp32 on CPU
  c.model.remat = "none"
  # Captions beside the SFT mixture: without an alignment signal whose every token depends on
  # the image, the from-scratch encoder collapses to one constant token (a blanked image then
  # scores the same) before the harder tasks can teach it to see (benchmarks/RESULTS.md,
  # "Does the quick-start model see?").
  c.data.sources = {"caption": dict(kind="builtin", weight=0.2),
                    **{name: dict(kind="builtin", weight=0.8 * w) for name, w in configs.BUILTIN_SFT.items()}}
  c.train.steps = 450  # ~3 min on 2 idle cores with the final evaluation
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 20
  c.checkpoint.every = 150
  c.log_every = 10
  # The quick start ends by answering held-out questions: 96 per task (~20 s on 2 cores), as
  # 24 cannot tell 40% from 50% (a standard error of 10 points).
  c.eval.generate_per_task = 96
  return c


def get_config(arg=None):
  c = quick_start()
  if not arg:
    return c
  if arg not in STAGES:
    raise ValueError(f"experiments/tiny.py:{arg}: expected no argument (the quick start) or a stage {tuple(STAGES)}")
  st = STAGES[arg]
  c.stage = arg
  c.model.vit.image_size = st["image_size"]
  c.data.sources = {name: dict(kind="builtin", weight=w) for name, w in st["sources"].items()}
  c.data.anyres.enabled = st["anyres"]
  c.train.steps = st["steps"]
  c.train.lr = st["lr"]
  c.train.warmup_steps = st["warmup"]
  c.checkpoint.every = 50
  c.eval.generate_per_task = 96 if arg == "sft" else 0  # the last stage answers held-out questions
  return c


def get_sweep(arg=None):
  """`python -m mm15_jax.tools.sweep --config=experiments/tiny.py --workdir=/tmp/mm15_sweep`"""
  del arg
  return [{"train.lr": lr} for lr in (1e-3, 3e-3, 1e-2)]
