"""The train state and its shardings, built abstractly first so nothing big lives on the host.

The state is a plain pytree: {"step", "params", "opt_state", "rng"}, with params as the
pure dict of the NNX model's `nnx.Param`s. The model is split once; the jitted step merges
the graph definition with the params, so no Python graph walk happens per step.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mm15_jax import sharding as shd
from mm15_jax.models import build
from mm15_jax.train import optimizer as opt_lib


@dataclasses.dataclass
class TrainSetup:
  """Everything static about a run: graph, abstract state, shardings, optimizer."""
  config: object
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  rest: nnx.State
  logical: dict
  abstract_params: dict
  tx: optax.GradientTransformation
  state_shardings: dict
  abstract_state: dict

  @property
  def param_shardings(self):
    return self.state_shardings["params"]

  def batch_sharding(self, ndim: int) -> NamedSharding:
    spec = shd.logical_to_mesh(("batch",) + (None,) * (ndim - 1), self.config.sharding_rules, self.mesh)
    return NamedSharding(self.mesh, spec)


def _key_names(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def optimizer_state_shardings(abstract_opt, abstract_params, p_shardings, replicated):
  """Each optimizer leaf shaped like a param (Adam moments) is sharded like that param.

  Optax keeps the params' dict structure under a prefix (chain index, `mu`, ...), so a
  param is found as the longest key-path suffix of the optimizer leaf.
  """
  by_path = {}
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(p_shardings)):
    by_path[_key_names(path)] = (x.shape, s)

  def one(path, leaf):
    names = _key_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def make_setup(config, mesh) -> TrainSetup:
  """Abstract model, optimizer and every sharding, checked before any compile."""
  graphdef, rest, logical, abstract_params = build.model_parts(config)
  tx = opt_lib.make_optimizer(config.train, logical)
  p_shardings = build.param_shardings(logical, abstract_params, mesh, config.sharding_rules)
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optimizer_state_shardings(abstract_opt, abstract_params, p_shardings, replicated)
  state_shardings = dict(step=replicated, params=p_shardings, opt_state=opt_shardings, rng=replicated)
  abstract_state = dict(
      step=jax.ShapeDtypeStruct((), jnp.int32),
      params=abstract_params,
      opt_state=abstract_opt,
      rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
  )
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings)
  return TrainSetup(config, mesh, graphdef, rest, logical, abstract_params, tx, state_shardings, abstract_state)


def init_state(setup: TrainSetup) -> dict:
  """Initialises params and optimizer state directly in their shardings (no host copy)."""
  config = setup.config

  def init():
    params = build.model_parts(config, abstract=False).params
    return dict(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=setup.tx.init(params),
        rng=jax.random.key_data(jax.random.key(config.seed)),
    )

  return jax.jit(init, out_shardings=setup.state_shardings)()
