"""MM1.5-3B: the three training stages of the paper's dense 3B model.

  python -m mm15_jax.train --config=experiments/mm15_3b.py:pretrain --workdir=DIR
  python -m mm15_jax.train --config=experiments/mm15_3b.py:cpt --workdir=DIR2 --config.init.from_checkpoint=DIR
  python -m mm15_jax.train --config=experiments/mm15_3b.py:sft --workdir=DIR3 --config.init.from_checkpoint=DIR2
  python -m mm15_jax.plan --config=experiments/mm15_3b.py   # memory and step time on c.topology
"""

from mm15_jax import configs


def get_config(arg="pretrain"):
  c = configs.mm15(size="3b", stage=arg or "pretrain")
  # Planned for pretraining (batch 512, benchmarks/RESULTS.md "Pod plans"): FSDP over 64 v5p
  # chips, 8 sequences each, 44 of 95 GiB per chip.
  c.topology = "v5p:4x4x4"
  if c.stage == "pretrain":
    # The planner's remat on that slice (`python -m mm15_jax.plan --sweep --config=experiments/mm15_3b.py
    # --remat=full,proj`, benchmarks/RESULTS.md "Remat per topology"): saving the projections
    # fits at 65 of 95 GiB and has the higher estimated MFU (41.4% vs 40.0% with full remat).
    # Other slices keep full remat until planned.
    c.hardware_rules = ((r"^v5p-128$", {"model.remat": "proj"}),)
  else:
    # cpt and sft (the same step shapes: batch 256, up to 27 tiles of 672 px a sequence): `plan
    # --sweep --config=experiments/mm15_3b.py:cpt --remat=full,proj` plans proj at 83.9 GiB and
    # 32.2% against full remat's 91.7 GiB and 31.9%: less memory and a higher estimate, so proj.
    c.hardware_rules = ((r"^v5p-128$", {"model.remat": "proj"}),)
  return c
