"""MM1.5-3B-MoE: 64 experts, top-2, MoE in every other decoder layer; stages as the dense 3B.

  python -m mm15_jax.train --config=experiments/mm15_3b_moe.py:pretrain --workdir=DIR
  python -m mm15_jax.train --config=experiments/mm15_3b_moe.py:cpt --workdir=DIR2 --config.init.from_checkpoint=DIR
  python -m mm15_jax.train --config=experiments/mm15_3b_moe.py:sft --workdir=DIR3 --config.init.from_checkpoint=DIR2
  python -m mm15_jax.plan --config=experiments/mm15_3b_moe.py   # memory and step time on c.topology
"""

from mm15_jax import configs


def get_config(arg="pretrain"):
  c = configs.mm15_moe(size="3b", stage=arg or "pretrain")
  # Planned for pretraining (batch 512, benchmarks/RESULTS.md "Pod plans"): 128 v5p chips as
  # fsdp 16 x expert 8 (the default mesh), 4 sequences each.
  c.topology = "v5p:4x4x8"
  if c.stage == "pretrain":
    # The planner's remat on that slice (`python -m mm15_jax.plan --sweep --config=experiments/mm15_3b_moe.py
    # --remat=full,proj`, benchmarks/RESULTS.md "Remat per topology"): saving the projections
    # fits at 58 of 95 GiB, less than full remat's 64 (no recomputed expert exchange), and has the
    # higher estimated MFU (46.3% vs 44.7%). Other slices keep full remat until planned.
    c.hardware_rules = ((r"^v5p-256$", {"model.remat": "proj"}),)
  else:
    # cpt and sft (the same step shapes: batch 256, up to 27 tiles of 672 px a sequence): `plan
    # --sweep --config=experiments/mm15_3b_moe.py:cpt --remat=full,proj` plans proj at 61.0 GiB and
    # 40.7% against full remat's 56.2 GiB and 39.9%: more than half a point, so proj.
    c.hardware_rules = ((r"^v5p-256$", {"model.remat": "proj"}),)
  return c
