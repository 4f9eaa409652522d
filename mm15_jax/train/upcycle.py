"""MoE upcycling: an MoE run's params from a dense run's checkpoint (`config.init.upcycle_from`).

Every param comes from the dense checkpoint, except in each MoE layer (every `interval`-th
decoder layer): each expert's gate/up/down is a copy of that layer's dense FFN and the router
keeps the MoE model's own init. Dense layers, the encoder and the connector are copied as they are.

With top_k > 1 the k routing weights are renormalised to sum to 1 (models/moe.py) and there is
no router noise, so identical experts give the dense FFN's output (to rounding): the upcycled
model starts as the dense one. With top_k = 1 each output is scaled by its router probability,
so it does not; with impl="capacity" a dropped assignment contributes zero, so it does only
where nothing is dropped ("ragged" drops nothing).

The dense checkpoint is read with the dense model's abstract params (the same config with
model.moe.num_experts=0) in its training shardings, then laid out as the MoE model in one jitted
function whose outputs are the MoE params' shardings: no host holds a whole model.
"""

import jax

from mm15_jax import checkpoint as ckpt_lib
from mm15_jax.models import build
from mm15_jax.models.llm import upcycle_decoder_params
from mm15_jax.train.config_checks import init_errors
from mm15_jax.train.state import TrainSetup


def dense_config(config):
  """The dense model an MoE config is upcycled from: the same config with model.moe.num_experts=0."""
  dense = config.copy_and_resolve_references()
  dense.model.moe.num_experts = 0
  return dense


def _upcycle(dense: dict, init: dict) -> dict:
  # Parts the checkpoint lacks (an imported decoder holds only "llm") keep their init.
  params = dict(init, **{part: value for part, value in dense.items() if part != "llm"})
  params["llm"] = upcycle_decoder_params(dense["llm"], init["llm"])
  return params


def load_upcycled(path: str, setup: TrainSetup, init_params: dict, **load_kw) -> dict:
  """The MoE params of `setup` from the dense checkpoint at `path` (a workdir, its checkpoints/
  directory or a step directory), in `setup`'s param shardings.

  `init_params`: freshly initialised params of `setup` (the routers are kept from them, and any
  part the checkpoint does not hold); they are donated, so do not use them afterwards.
  `load_kw` go to `checkpoint.load_param_parts`.
  """
  config = setup.config.copy_and_resolve_references()
  config.init.upcycle_from = path
  errors = init_errors(config)
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))
  try:
    ckpt_lib.find_checkpoint_dir(path)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"config.init.upcycle_from={path!r}: no complete checkpoint found; give a dense run's workdir, "
        "its checkpoints/ directory or a step directory") from None
  have = ckpt_lib.stored_parts(path)
  if "llm" not in have:
    raise ValueError(f"config.init.upcycle_from={path!r} holds no decoder params (it has {have}); "
                     "give a dense run's checkpoint or an imported decoder (`python -m mm15_jax.convert import`)")
  _, _, dense_abstract = build.abstract_params(dense_config(config), setup.mesh)
  try:
    dense = ckpt_lib.load_param_parts({}, dense_abstract, {p: path for p in dense_abstract if p in have},
                                      **load_kw)
  except ValueError as e:
    raise ValueError(f"config.init.upcycle_from={path!r}: the checkpoint is not this experiment's dense model "
                     f"(config.model with moe.num_experts=0): {e}") from e
  return jax.jit(_upcycle, out_shardings=setup.param_shardings, donate_argnums=1)(dense, init_params)
