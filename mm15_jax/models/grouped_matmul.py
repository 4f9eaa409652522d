"""Grouped matmul for the dropless MoE path: rows sorted by group, one weight matrix per group.

  grouped_matmul(lhs [M, K], rhs [G, K, N], sizes int [G], kernel) -> [M, N]

Rows [start_g, start_g + sizes[g]) use rhs[g]; rows past sum(sizes) come out zero (as
`jax.lax.ragged_dot` defines them). Kernels (`modes.MoeImpl`'s dropless ones):
  "ragged"    jax.lax.ragged_dot, which lowers on every backend
  "megablox"  the Pallas grouped matmul (megablox) that ships with JAX: a TPU kernel, tiled for
              the shapes here; elsewhere it runs in Pallas' interpret mode (slow: for tests)
  "tokamax"   `tokamax.ragged_dot` (the `gpu` extra): Mosaic GPU kernels on Hopper and Blackwell
              for the product and both gradients (the weights' one contracts over the ragged
              rows), Triton on other NVIDIA GPUs, its autotuned tilings; XLA's ragged_dot elsewhere

On GPU, XLA lowers `jax.lax.ragged_dot` to a product over every group for every row (G times
the FLOPs: 1.6% of a same-run matmul at 64 experts, benchmarks/RESULTS.md), hence tokamax there.
"""

import functools
import importlib.util
import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from mm15_jax import modes

TOKAMAX_MISSING = ("model.moe.impl='tokamax' needs the tokamax package, which the gpu extra installs: "
                   "pip install 'mm15_jax[gpu]' (or pip install tokamax); or set --config.model.moe.impl=ragged")


@functools.cache
def tokamax_installed() -> bool:
  return importlib.util.find_spec("tokamax") is not None


def kernel_for(impl: str, platform: str) -> str:
  """The grouped-matmul kernel of moe.impl on `platform`: "auto" is megablox on TPU, tokamax on GPU
  (ragged_dot, with a warning naming the fix, where tokamax is not installed), ragged_dot on CPU."""
  impl = modes.parse(modes.MoeImpl, impl)
  if impl != modes.MoeImpl.AUTO:
    return impl
  if platform == "tpu":
    return modes.MoeImpl.MEGABLOX
  if platform == "gpu":
    if tokamax_installed():
      return modes.MoeImpl.TOKAMAX
    _warn_once(f"MoE on GPU runs jax.lax.ragged_dot, which XLA computes over every expert for every "
               f"row: {TOKAMAX_MISSING}")
  return modes.MoeImpl.RAGGED


@functools.cache
def _warn_once(message: str) -> None:
  logging.warning(message)


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  """(tm, tk, tn) for k and n multiples of 128: row tiles of up to 512 (m is padded to a
  multiple); one lane-aligned tile for k and n alike, the largest of 512, 256, 128 dividing both,
  as the backward pass runs the kernel with k and n swapped (d lhs = d out @ rhs^T)."""
  tm = min(512, -(-m // 16) * 16)  # 16 rows: a bf16 sublane tile
  t = next(t for t in (512, 256, 128) if k % t == 0 and n % t == 0)
  return tm, t, t


def _round_up(x: int, to: int) -> int:
  return -(-x // to) * to


def grouped_matmul(lhs, rhs, sizes, kernel: str = modes.MoeImpl.RAGGED, platform: str = "tpu"):
  """`platform`: the backend the program is compiled for (a CPU host planning for a TPU compiles
  the TPU kernel); megablox elsewhere runs interpreted."""
  sizes = sizes.astype(jnp.int32)
  if kernel == modes.MoeImpl.RAGGED:
    return jax.lax.ragged_dot(lhs, rhs, sizes)
  if kernel == modes.MoeImpl.TOKAMAX:
    return _tokamax(lhs, rhs, sizes)
  if kernel != modes.MoeImpl.MEGABLOX:
    raise ValueError(f"grouped_matmul: kernel {kernel!r} is not one of ('ragged', 'megablox', 'tokamax')")
  (m, k), n = lhs.shape, rhs.shape[2]
  # TPU tiles are multiples of 128 lanes: k and n are padded with zeros to one (the paper sizes
  # need none), m to a multiple of the row tile.
  kp, np_ = _round_up(k, 128), _round_up(n, 128)
  tm, tk, tn = megablox_tiling(m, kp, np_)
  mp = _round_up(m, tm)
  # The kernel leaves rows past sum(sizes) unwritten: zero them going in (so their gradient is
  # zero too) and coming out.
  filled = (jnp.arange(mp) < jnp.sum(sizes))[:, None]
  x = jnp.where(filled, jnp.pad(lhs, ((0, mp - m), (0, kp - k))), 0)
  w = jnp.pad(rhs, ((0, 0), (0, kp - k), (0, np_ - n)))
  out = megablox.gmm(x, w, sizes, lhs.dtype, (tm, tk, tn), None, None, False,
                     platform != "tpu")  # output type, tiling, group offset, existing out, transpose, interpret
  return jnp.where(filled, out, 0)[:m, :n]


def _tokamax(lhs, rhs, sizes):
  if not tokamax_installed():
    raise ImportError(TOKAMAX_MISSING)
  import tokamax  # pylint: disable=import-outside-toplevel  (an optional extra)

  # tokamax picks its kernel per GPU (and falls back to XLA where none applies). The GPU kernels
  # write only the groups' rows: rows past sum(sizes) go in as zeros (a zero gradient) and come
  # out as zeros, as jax.lax.ragged_dot defines them.
  filled = (jnp.arange(lhs.shape[0]) < jnp.sum(sizes))[:, None]
  out = tokamax.ragged_dot(jnp.where(filled, lhs, 0), rhs, sizes)
  return jnp.where(filled, out, 0).astype(lhs.dtype)
