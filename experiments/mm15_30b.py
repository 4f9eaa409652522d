"""MM1.5-30B: the three training stages of the paper's dense 30B model.

  python -m mm15_jax.train --config=experiments/mm15_30b.py:pretrain --workdir=DIR
  python -m mm15_jax.train --config=experiments/mm15_30b.py:cpt --workdir=DIR2 --config.init.from_checkpoint=DIR
  python -m mm15_jax.train --config=experiments/mm15_30b.py:sft --workdir=DIR3 --config.init.from_checkpoint=DIR2
  python -m mm15_jax.plan --config=experiments/mm15_30b.py   # memory and step time on c.topology
"""

from mm15_jax import configs


def get_config(arg="pretrain"):
  c = configs.mm15(size="30b", stage=arg or "pretrain")
  # Planned for pretraining (batch 512, benchmarks/RESULTS.md "Pod plans"): FSDP over 128 v5p
  # chips, 4 sequences each, 51 of 95 GiB per chip.
  c.topology = "v5p:4x4x8"
  if c.stage == "pretrain":
    # The planner's remat on that slice (`python -m mm15_jax.plan --sweep --config=experiments/mm15_30b.py
    # --remat=full,proj`, benchmarks/RESULTS.md "Remat per topology"): saving the projections
    # fits at 91 of 95 GiB (4 to spare: replan before lengthening sequences) and has the higher
    # estimated MFU (52.4% vs 46.0% with full remat). Other slices keep full remat until planned.
    c.hardware_rules = ((r"^v5p-256$", {"model.remat": "proj"}),)
  else:
    # cpt and sft (the same step shapes: batch 256, up to 27 tiles of 672 px a sequence): `plan
    # --sweep --config=experiments/mm15_30b.py:cpt --remat=full,proj` plans proj at 66.7 GiB and
    # 38.1% against full remat's 55.3 GiB and 37.2%: more than half a point, so proj.
    c.hardware_rules = ((r"^v5p-256$", {"model.remat": "proj"}),)
  return c
