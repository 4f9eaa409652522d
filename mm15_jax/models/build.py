"""The model built concretely (`build_model`) or abstractly, each param a ShapeDtypeStruct carrying
its sharding on a mesh (`abstract_params`): what training, inference, checkpoint import and the
planner all start from, so it lives with the models, below them all.
"""

from typing import NamedTuple

import jax
from flax import nnx
from jax.sharding import NamedSharding

from mm15_jax import sharding as shd
from mm15_jax.models.mm15 import MM15


def build_model(model_config, seed: int = 0) -> MM15:
  return MM15(model_config, rngs=nnx.Rngs(seed))


class ModelParts(NamedTuple):
  """The model of a config split for jax transformations."""
  graphdef: nnx.GraphDef
  rest: nnx.State  # every non-param variable (none today; kept so a merge is always whole)
  logical: dict  # each param's logical axis names (logical_axes)
  params: dict  # pure dict of arrays, or of ShapeDtypeStructs when abstract


def model_parts(config, abstract: bool = True) -> ModelParts:
  """`config.model` built with `config.seed` and split; abstract (the default) allocates nothing.
  Inside a jit with abstract=False, the params come out initialised in their shardings."""
  make = lambda: build_model(config.model, config.seed)
  graphdef, params, rest = nnx.split(nnx.eval_shape(make) if abstract else make(), nnx.Param, ...)
  return ModelParts(graphdef, rest, logical_axes(params), nnx.to_pure_dict(params))


def logical_axes(param_state: nnx.State) -> dict:
  """Pure dict of each param's logical axis names (None for an unnamed dimension)."""
  out: dict = {}
  for path, var in nnx.to_flat_state(param_state):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    if len(names) != len(var.shape):
      raise ValueError(f"param {'/'.join(map(str, path))}: logical axes {names} do not match shape {var.shape}")
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = tuple(names)
  return out


def is_axes(x) -> bool:
  """A leaf of logical_axes' output: a tuple of axis names (or None)."""
  return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def param_shardings(logical: dict, abstract_params: dict, mesh, rules) -> dict:
  def one(path, names, shape_struct):
    spec = shd.logical_to_mesh(names, rules, mesh)
    shd.check_divisible(
        shape_struct.shape, spec, mesh, f"param {jax.tree_util.keystr(path)} with logical axes {names}",
        "change config.mesh, config.sharding_rules, or the model dimension")
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(one, logical, abstract_params, is_leaf=is_axes)


def abstract_params(config, mesh):
  """(graphdef, rest, params as ShapeDtypeStructs carrying their shardings on `mesh`): the model
  of `config` without allocating it, as inference and checkpoint import place params."""
  graphdef, rest, logical, abstract = model_parts(config)
  shardings = param_shardings(logical, abstract, mesh, config.sharding_rules)
  structs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return graphdef, rest, structs
