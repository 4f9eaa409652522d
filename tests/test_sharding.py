"""Mesh construction, logical-axis mapping and the errors users see."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from mm15_jax import configs
from mm15_jax import sharding as shd


def test_mesh_fills_minus_one_axis():
  mesh = shd.make_mesh(dict(data=2, fsdp=-1, tensor=2, expert=1))
  assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2, expert=1)


def test_mesh_size_mismatch_names_field_and_fix():
  with pytest.raises(ValueError, match=r"config.mesh: .* = 6 .* 8 devices .*--config.mesh"):
    shd.make_mesh(dict(data=3, fsdp=2, tensor=1, expert=1))


def test_mesh_unknown_axis():
  with pytest.raises(ValueError, match="unknown axes"):
    shd.make_mesh(dict(data=8, pipeline=1))


def test_logical_to_mesh_skips_used_and_trivial_axes():
  mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2, expert=1))
  rules = configs.DEFAULT_RULES
  # Activations: batch takes data and fsdp, so embed (-> fsdp) stays replicated.
  assert shd.logical_to_mesh(("batch", "length", "embed"), rules, mesh) == P(("data", "fsdp"), None, None)
  # Params: embed -> fsdp, mlp -> tensor; expert axis has size 1 and is dropped.
  assert shd.logical_to_mesh(("layers", "embed", "mlp"), rules, mesh) == P(None, "fsdp", "tensor")
  assert shd.logical_to_mesh(("vocab", "embed"), rules, mesh) == P("tensor", "fsdp")


def test_divisibility_error_names_param_and_fix():
  mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=8, expert=1))
  spec = shd.logical_to_mesh(("embed", "heads"), configs.DEFAULT_RULES, mesh)
  with pytest.raises(ValueError, match=r"q_proj.*dimension 4 .*size 8"):
    shd.check_divisible((64, 4), spec, mesh, "param q_proj", "change config.mesh")


def test_constrain_is_noop_without_rules():
  x = jax.numpy.ones((4, 4))
  assert shd.constrain(x, ("batch", "embed")) is x
