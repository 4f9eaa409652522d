"""MM1.5-7B: the three training stages of the paper's dense 7B model.

  python -m mm15_jax.train --config=experiments/mm15_7b.py:pretrain --workdir=DIR
  python -m mm15_jax.train --config=experiments/mm15_7b.py:cpt --workdir=DIR2 --config.init.from_checkpoint=DIR
  python -m mm15_jax.train --config=experiments/mm15_7b.py:sft --workdir=DIR3 --config.init.from_checkpoint=DIR2
  python -m mm15_jax.plan --config=experiments/mm15_7b.py   # memory and step time on c.topology
"""

from mm15_jax import configs


def get_config(arg="pretrain"):
  c = configs.mm15(size="7b", stage=arg or "pretrain")
  # Planned for pretraining (batch 512, benchmarks/RESULTS.md "Pod plans"): FSDP over 64 v5p
  # chips, 8 sequences each, 56 of 95 GiB per chip.
  c.topology = "v5p:4x4x4"
  if c.stage == "pretrain":
    # The planner's remat on that slice (`python -m mm15_jax.plan --sweep --config=experiments/mm15_7b.py
    # --remat=full,proj`, benchmarks/RESULTS.md "Remat per topology"): saving the projections
    # fits at 87 of 95 GiB and has the higher estimated MFU (44.1% vs 42.5% with full remat).
    # Other slices keep full remat until planned.
    c.hardware_rules = ((r"^v5p-128$", {"model.remat": "proj"}),)
  else:
    # cpt and sft (the same step shapes: batch 256, up to 27 tiles of 672 px a sequence): `plan
    # --sweep --config=experiments/mm15_7b.py:cpt --remat=full,proj` plans proj at 84.7 GiB and
    # 34.1% against full remat's 84.7 GiB and 33.6%: the same memory and a higher estimate, so proj.
    c.hardware_rules = ((r"^v5p-128$", {"model.remat": "proj"}),)
  return c
