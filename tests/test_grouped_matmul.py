"""The grouped matmul of the dropless MoE path: each kernel against a float64 loop over groups,
values and gradients, with empty groups and rows past the groups; the kernel per backend.
("tokamax" runs tokamax's XLA implementation here: its GPU kernels need a GPU.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm15_jax.models import grouped_matmul as gmm_lib
from mm15_jax.models import moe as moe_lib
from mm15_jax.models.grouped_matmul import grouped_matmul, kernel_for, megablox_tiling


def loop_reference(lhs, rhs, sizes):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out  # rows past sum(sizes) stay zero


@pytest.mark.parametrize("kernel", ["ragged", "megablox", "tokamax"])
@pytest.mark.parametrize("sizes", [(10, 0, 30, 20), (0, 70, 0, 0), (5, 5, 5, 5)])  # m = 70: rows past the groups
def test_each_kernel_matches_a_float64_loop(kernel, sizes):
  rng = np.random.default_rng(0)
  lhs = rng.standard_normal((70, 32)).astype(np.float32)
  rhs = rng.standard_normal((4, 32, 48)).astype(np.float32)
  sizes = np.asarray(sizes, np.int32)
  run = lambda a, b: grouped_matmul(a, b, jnp.asarray(sizes), kernel, platform="cpu")
  np.testing.assert_allclose(run(lhs, rhs), loop_reference(lhs, rhs, sizes), rtol=1e-5, atol=1e-4)
  # Gradients of a weighted sum: d lhs = w @ rhs_g^T per row, d rhs_g = lhs_g^T @ w_g.
  weights = rng.standard_normal((70, 48))
  d_lhs, d_rhs = jax.grad(lambda a, b: jnp.sum(run(a, b) * weights), argnums=(0, 1))(lhs, rhs)
  want_lhs, want_rhs, start = np.zeros(lhs.shape), np.zeros(rhs.shape), 0
  for g, size in enumerate(sizes):
    rows = slice(start, start + size)
    want_lhs[rows] = weights[rows] @ rhs[g].astype(np.float64).T
    want_rhs[g] = lhs[rows].astype(np.float64).T @ weights[rows]
    start += size
  np.testing.assert_allclose(d_lhs, want_lhs, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(d_rhs, want_rhs, rtol=1e-4, atol=1e-3)


def test_megablox_tiles_fit_the_shapes_both_ways():
  assert megablox_tiling(70, 128, 128) == (80, 128, 128)  # small: one row tile (16-aligned)
  assert megablox_tiling(8192, 2048, 5632) == (512, 512, 512)  # one tile dividing k and n
  assert megablox_tiling(4096, 2048, 1408) == (512, 128, 128)  # 1408 = 11 x 128


def test_auto_is_megablox_on_tpu_tokamax_on_gpu_and_ragged_dot_on_cpu(monkeypatch, caplog):
  assert kernel_for("auto", "tpu") == "megablox"
  assert kernel_for("auto", "gpu") == "tokamax"  # the test extra installs it, as the gpu extra does
  assert kernel_for("auto", "cpu") == "ragged"
  assert kernel_for("ragged", "tpu") == "ragged" and kernel_for("megablox", "cpu") == "megablox"
  # Without tokamax, a GPU falls back to ragged_dot and the log says why and how to fix it.
  monkeypatch.setattr(gmm_lib, "tokamax_installed", lambda: False)
  with caplog.at_level("WARNING"):
    assert kernel_for("auto", "gpu") == "ragged"
  assert "pip install 'mm15_jax[gpu]'" in caplog.text
  with pytest.raises(ImportError, match=r"mm15_jax\[gpu\]"):
    grouped_matmul(jnp.ones((4, 8)), jnp.ones((2, 8, 8)), jnp.array([2, 2]), "tokamax", platform="gpu")
  # An explicit impl="tokamax" without tokamax is a config error, before anything is built.
  monkeypatch.setattr(moe_lib, "tokamax_installed", lambda: False)
  with pytest.raises(ValueError, match=r"model.moe.impl='tokamax' needs the tokamax package"):
    moe_lib.check_moe(dict(impl="tokamax", num_experts=4, top_k=2, interval=1), 2)
