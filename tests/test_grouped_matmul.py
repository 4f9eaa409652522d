"""The grouped matmul of the dropless MoE path: each kernel against a float64 loop over groups,
values and gradients, with empty groups and rows past the groups; the kernel per backend.
("tokamax" runs tokamax's XLA implementation here: its GPU kernels need a GPU.)"""

import os
import subprocess
import sys

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


@pytest.mark.parametrize("kernel", ["ragged", "megablox", "blocked", "blocked_8", "tokamax"])
@pytest.mark.parametrize("sizes", [(10, 0, 30, 20), (0, 70, 0, 0), (5, 5, 5, 5)])  # m = 70: rows past the groups
def test_each_kernel_matches_a_float64_loop(kernel, sizes):
  rng = np.random.default_rng(0)
  lhs = rng.standard_normal((70, 32)).astype(np.float32)
  rhs = rng.standard_normal((4, 32, 48)).astype(np.float32)
  sizes = np.asarray(sizes, np.int32)
  if kernel == "blocked_8":  # several blocks a group, groups starting mid-block in the input
    run = lambda a, b: gmm_lib.blocked_matmul(a, b, jnp.asarray(sizes), 8)
  else:
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


def test_blocked_swiglu_matches_a_float64_loop():
  # 300 rows (blocks of 80): an empty expert, one spanning two blocks and ending mid-block, 30 rows past.
  rng = np.random.default_rng(1)
  sizes = np.array([0, 150, 20, 100], np.int32)
  xs = rng.standard_normal((300, 16)).astype(np.float32)
  gate, up = (rng.standard_normal((4, 16, 24)).astype(np.float32) * 0.3 for _ in range(2))
  down = rng.standard_normal((4, 24, 16)).astype(np.float32) * 0.3
  weights = rng.standard_normal((300, 16))

  def reference(xs, gate, up, down):  # float64, one expert at a time; rows past the groups stay 0
    out, start = np.zeros(xs.shape), 0
    for e, size in enumerate(sizes):
      x = xs[start:start + size]
      g = x @ gate[e]
      out[start:start + size] = (g / (1 + np.exp(-g)) * (x @ up[e])) @ down[e]
      start += size
    return out

  args64 = [a.astype(np.float64) for a in (xs, gate, up, down)]
  y = gmm_lib.blocked_swiglu(xs, jnp.asarray(sizes), gate, up, down)
  np.testing.assert_allclose(y, reference(*args64), rtol=1e-4, atol=1e-4)
  # Gradients against central differences of the float64 loop along random directions.
  grads = jax.grad(lambda *a: jnp.sum(gmm_lib.blocked_swiglu(a[0], jnp.asarray(sizes), *a[1:]) * weights),
                   argnums=(0, 1, 2, 3))(xs, gate, up, down)
  for i, grad in enumerate(grads):
    direction = rng.standard_normal(args64[i].shape)
    step = [a.copy() for a in args64]
    step[i] = args64[i] + 1e-5 * direction
    back = [a.copy() for a in args64]
    back[i] = args64[i] - 1e-5 * direction
    numeric = (np.sum(reference(*step) * weights) - np.sum(reference(*back) * weights)) / 2e-5
    np.testing.assert_allclose(np.sum(np.asarray(grad, np.float64) * direction), numeric, rtol=1e-4)
  assert not np.asarray(grads[1][0]).any() and not np.asarray(grads[0][270:]).any()  # empty expert, rows past


def test_megablox_tiles_fit_the_shapes_both_ways():
  assert megablox_tiling(70, 128, 128) == (80, 128, 128)  # small: one row tile (16-aligned)
  assert megablox_tiling(8192, 2048, 5632) == (512, 512, 512)  # one tile dividing k and n
  assert megablox_tiling(4096, 2048, 1408) == (512, 128, 128)  # 1408 = 11 x 128


def test_tokamax_runs_under_a_script_with_its_own_arguments():
  # tokamax reads absl flags; a script parsing its own (argparse) arguments must not trip on them.
  code = ("import sys; sys.argv = ['bench.py', '--impls=tokamax']\n"
          "import jax.numpy as jnp\n"
          "from mm15_jax.models.grouped_matmul import grouped_matmul\n"
          "out = grouped_matmul(jnp.ones((6, 8)), jnp.ones((2, 8, 4)), jnp.array([2, 3]), 'tokamax', platform='cpu')\n"
          "assert out.shape == (6, 4) and float(out[5].sum()) == 0 and float(out[0, 0]) == 8, out\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]


class FakeHopper:
  """What tokamax asks of the default device to pick its Hopper kernels (no GPU here)."""
  platform, compute_capability, device_kind, core_count, id = "gpu", "9.0", "NVIDIA H100 80GB HBM3", 132, 0


def test_tokamax_lowers_to_mosaic_gpu_kernels_for_a_hopper_gpu(monkeypatch):
  # Lowered for CUDA on this CPU host, as a Hopper GPU would compile it: the product, the input
  # gradient and the weight gradient (ragged contraction) each become a Mosaic GPU kernel, none
  # falls back to XLA's ragged_dot.
  from jax.extend import backend
  monkeypatch.setattr(backend, "get_default_device", FakeHopper)
  lhs, rhs = jax.ShapeDtypeStruct((1024, 256), jnp.bfloat16), jax.ShapeDtypeStruct((4, 256, 512), jnp.bfloat16)
  loss = lambda a, b, s: jnp.sum(grouped_matmul(a, b, s, "tokamax", platform="gpu").astype(jnp.float32))
  text = jax.jit(jax.grad(loss, (0, 1))).trace(lhs, rhs, jax.ShapeDtypeStruct((4,), jnp.int32)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu") == 3
  assert "chlo.ragged_dot" not in text  # (what jax.lax.ragged_dot lowers to)


def test_block_rows_shrink_with_the_rows_per_group():
  assert gmm_lib.block_rows(8192, 8) == 128  # training: full blocks
  assert gmm_lib.block_rows(300, 4) == 80  # 75 rows a group on average, rounded up to 8
  assert gmm_lib.block_rows(4, 64) == 8  # a decoding step: the smallest block


def test_block_layout_by_hand():
  # Groups of 10, 0, 30 and 20 rows of 70 (10 past them), blocks of 16: each group starts on a
  # block boundary (0, 16, 16, 48), its rows packed from there; rows past the groups are dropped.
  dest, block_group, used = gmm_lib.block_layout(jnp.array([10, 0, 30, 20]), 70, 16)
  want = list(range(10)) + list(range(16, 46)) + list(range(48, 68)) + [9 * 16] * 10  # 9 blocks at worst
  np.testing.assert_array_equal(dest, want)
  np.testing.assert_array_equal(block_group, [0, 2, 2, 3, 3, 3, 3, 3, 3])  # blocks past the last: any group
  assert int(used) == 5


def test_auto_is_megablox_on_tpu_tokamax_on_gpu_and_blocked_on_cpu(monkeypatch, caplog):
  assert kernel_for("auto", "tpu") == "megablox"
  assert kernel_for("auto", "gpu") == "tokamax"  # the test extra installs it, as the gpu extra does
  assert kernel_for("auto", "cpu") == "blocked"
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
