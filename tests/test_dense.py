"""Dense projections folded to one 2-D matmul (models/dense.py), and the layer loop's unroll."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm15_jax import sharding as shd
from mm15_jax.models import llm
from mm15_jax.models.dense import dense
from mm15_jax.plan import chips as chips_lib


@pytest.mark.parametrize("x_shape, w_shape, contract, spec", [
    ((2, 5, 8), (8, 6), 1, "bld,df->blf"),
    ((2, 5, 8), (8, 3, 4), 1, "bld,dhk->blhk"),  # q/k/v: into heads
    ((2, 5, 3, 4), (3, 4, 8), 2, "blhk,hkd->bld"),  # attention output: out of heads
    ((2, 3, 3, 2, 2, 3), (2, 2, 3, 8), 3, "nhwpqc,pqcd->nhwd"),  # patch embedding
])
def test_dense_is_the_einsum_and_so_are_its_gradients(x_shape, w_shape, contract, spec):
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
  cot = rng.standard_normal(np.einsum(spec, x, w).shape)
  # float64 references: the einsum and its two gradients for the cotangent `cot`.
  out_spec = spec.split("->")[1]
  x_spec, w_spec = spec.split("->")[0].split(",")
  want = np.einsum(spec, x, w)
  want_dx = np.einsum(f"{out_spec},{w_spec}->{x_spec}", cot, w)
  want_dw = np.einsum(f"{x_spec},{out_spec}->{w_spec}", x, cot)
  x32, w32 = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
  got, vjp = jax.vjp(lambda a, b: dense(a, b, contract=contract), x32, w32)
  dx, dw = vjp(jnp.asarray(cot, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


def test_dense_accumulates_in_the_preferred_type_and_refuses_mismatched_axes():
  x, w = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
  assert dense(x, w, preferred_element_type=jnp.float32).dtype == jnp.float32
  with pytest.raises(ValueError, match=r"does not end with w's input axes \(3,\)"):
    dense(x, jnp.ones((3, 5)))


def test_auto_unroll_unrolls_cpu_stacks_only():
  assert llm.layer_unroll(0, 4) == 4  # compiled for this CPU: every layer
  assert llm.layer_unroll(0, llm.CPU_UNROLL_MAX_LAYERS + 1) == 1  # deeper: compile time wins
  assert llm.layer_unroll(2, 4) == 2  # set: as set


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the test extra)")
def test_auto_unroll_keeps_the_loop_when_tracing_for_a_tpu():
  tpu = shd.make_mesh(dict(data=4, fsdp=1, tensor=1, expert=1), devices=chips_lib.tpu_devices("v5p:2x2x1"))
  with shd.use_rules(tpu, ()):  # a CPU host tracing for a TPU pod: one layer per iteration
    assert shd.compile_platform() == "tpu" and llm.layer_unroll(0, 4) == 1
