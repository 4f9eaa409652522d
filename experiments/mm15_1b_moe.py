"""MM1.5-1B-MoE: 64 experts, top-2, MoE in every other decoder layer; stages as the dense 1B.

  python -m mm15_jax.train --config=experiments/mm15_1b_moe.py:pretrain --workdir=DIR
  python -m mm15_jax.train --config=experiments/mm15_1b_moe.py:cpt --workdir=DIR2 --config.init.from_checkpoint=DIR
  python -m mm15_jax.train --config=experiments/mm15_1b_moe.py:sft --workdir=DIR3 --config.init.from_checkpoint=DIR2
  python -m mm15_jax.plan --config=experiments/mm15_1b_moe.py   # memory and step time on c.topology
"""

from mm15_jax import configs


def get_config(arg="pretrain"):
  c = configs.mm15_moe(size="1b", stage=arg or "pretrain")
  # Planned for pretraining (batch 512, benchmarks/RESULTS.md "Pod plans"): 64 v5p chips as
  # fsdp 8 x expert 8 (the default mesh), 8 sequences each, 78 of 95 GiB per chip.
  c.topology = "v5p:4x4x4"
  if c.stage == "pretrain":
    # The planner's remat on that slice (`python -m mm15_jax.plan --sweep --config=experiments/mm15_1b_moe.py
    # --remat=full,proj`, benchmarks/RESULTS.md "Remat per topology"): saving the projections
    # fits at 75 of 95 GiB, less than full remat's 79 (no recomputed expert exchange),
    # and has the higher estimated MFU (45.4% vs 43.1%). Other slices keep full remat until planned.
    c.hardware_rules = ((r"^v5p-128$", {"model.remat": "proj"}),)
  else:
    # cpt and sft (the same step shapes: batch 256, up to 27 tiles of 672 px a sequence): `plan
    # --sweep --config=experiments/mm15_1b_moe.py:cpt --remat=full,proj` plans both at 88.1 GiB,
    # proj at 38.7% against full remat's 38.1%: more than half a point, so proj.
    c.hardware_rules = ((r"^v5p-128$", {"model.remat": "proj"}),)
  return c
