"""MM1.5-1B: the three training stages of the paper's dense 1B model.

  python -m mm15_jax.train --config=experiments/mm15_1b.py:pretrain --workdir=DIR
  python -m mm15_jax.train --config=experiments/mm15_1b.py:cpt --workdir=DIR2 --config.init.from_checkpoint=DIR
  python -m mm15_jax.train --config=experiments/mm15_1b.py:sft --workdir=DIR3 --config.init.from_checkpoint=DIR2
  python -m mm15_jax.plan --config=experiments/mm15_1b.py   # memory and step time on c.topology
"""

from mm15_jax import configs


def get_config(arg="pretrain"):
  c = configs.mm15(size="1b", stage=arg or "pretrain")
  # Planned for pretraining (batch 512, benchmarks/RESULTS.md "Pod plans"): FSDP over 64 v5p
  # chips, 8 sequences each, 43 of 95 GiB per chip.
  c.topology = "v5p:4x4x4"
  if c.stage == "pretrain":
    # The planner's remat on that slice (`python -m mm15_jax.plan --sweep --config=experiments/mm15_1b.py
    # --remat=full,qkv,proj`, benchmarks/RESULTS.md "Remat per topology"): saving the projections
    # fits at 56 of 95 GiB and has the highest estimated MFU (36.3% vs 35.0% with full remat).
    # Other slices keep full remat until planned.
    c.hardware_rules = ((r"^v5p-128$", {"model.remat": "proj"}),)
  # cpt and sft keep full remat, also the planner's choice there (`--config=experiments/mm15_1b.py:cpt
  # --remat=full,proj`: 84.3 GiB, 29.8% vs 84.8 GiB, 30.1%; within half a point, the least memory).
  return c
