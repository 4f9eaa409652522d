"""Grouped matmul for the dropless MoE path: rows sorted by group, one weight matrix per group.

  grouped_matmul(lhs [M, K], rhs [G, K, N], sizes int [G], kernel) -> [M, N]

Rows [start_g, start_g + sizes[g]) use rhs[g]; rows past sum(sizes) come out zero (as
`jax.lax.ragged_dot` defines them). Kernels (`modes.MoeImpl`'s dropless ones):
  "ragged"    jax.lax.ragged_dot, which lowers on every backend
  "megablox"  the Pallas grouped matmul (megablox) that ships with JAX: a TPU kernel, tiled for
              the shapes here; elsewhere it runs in Pallas' interpret mode (slow: for tests)
  "blocked"   XLA on any backend: each group's rows laid out in whole blocks of `block_rows` rows
              (zeros between groups), one [block, K] x [K, N] product per block in a loop,
              the weights' gradient summed in place per group; the FLOPs of the rows plus at
              most a block per group. CPU's choice (4.5x ragged_dot's speed there)
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
  (ragged_dot, with a warning naming the fix, where tokamax is not installed), blocked on CPU."""
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
  return modes.MoeImpl.BLOCKED


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
  if kernel == modes.MoeImpl.BLOCKED:
    return blocked_matmul(lhs, rhs, sizes, block_rows(lhs.shape[0], rhs.shape[0]))
  if kernel != modes.MoeImpl.MEGABLOX:
    raise ValueError(f"grouped_matmul: kernel {kernel!r} is not one of ('ragged', 'megablox', 'blocked', 'tokamax')")
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
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    # tokamax reads its options from absl flags and, unparsed, would parse sys.argv for them: a
    # script's own arguments (argparse, a notebook's) would fail there. Its defaults it is.
    flags.FLAGS.mark_as_parsed()

  # tokamax picks its kernel per GPU (and falls back to XLA where none applies). The GPU kernels
  # write only the groups' rows: rows past sum(sizes) go in as zeros (a zero gradient) and come
  # out as zeros, as jax.lax.ragged_dot defines them.
  filled = (jnp.arange(lhs.shape[0]) < jnp.sum(sizes))[:, None]
  out = tokamax.ragged_dot(jnp.where(filled, lhs, 0), rhs, sizes)
  return jnp.where(filled, out, 0).astype(lhs.dtype)


# ---------------------------------------------------------------- blocked: a loop of plain matmuls

BLOCK_ROWS = 128  # CPU, [8192 rows, 256] x [8 groups, 256, 512], forward + backward: 128, 256, 512 within 15%


def block_rows(m: int, groups: int) -> int:
  """BLOCK_ROWS, or fewer (a multiple of 8) when the groups average fewer rows: decoding's few
  rows a step would otherwise fill whole blocks of padding."""
  return min(BLOCK_ROWS, max(8, -(-m // groups // 8) * 8))


def block_layout(sizes, m: int, block: int):
  """Where each of the m sorted rows goes when every group starts on a block boundary.

  Returns (dest [m]: row in the blocked layout, num_blocks for rows past the groups, i.e. dropped;
  block_group [num_blocks]: each block's group; used_blocks: blocks holding rows, the rest zero).
  num_blocks = ceil((m + G (block - 1)) / block) is static: the worst case of the padding.
  """
  g = sizes.shape[0]
  num_blocks = -(-(m + g * (block - 1)) // block)
  ends = jnp.cumsum(sizes)
  padded = -(-sizes // block) * block
  padded_ends = jnp.cumsum(padded)
  rows = jnp.arange(m)
  group = jnp.searchsorted(ends, rows, side="right")  # G for rows past the groups
  clamped = jnp.minimum(group, g - 1)
  dest = jnp.where(group < g, padded_ends[clamped] - padded[clamped] + rows - (ends[clamped] - sizes[clamped]),
                   num_blocks * block)
  block_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(num_blocks) * block, side="right"), g - 1)
  return dest, block_group, padded_ends[-1] // block


def _to_blocks(x, dest, num_blocks: int, block: int):
  out = jnp.zeros((num_blocks * block, x.shape[1]), x.dtype).at[dest].set(x, mode="drop")
  return out.reshape(num_blocks, block, x.shape[1])


def _from_blocks(y, dest):
  return y.reshape(-1, y.shape[-1]).at[dest].get(mode="fill", fill_value=0)


def _each_block(blocks, w, block_group, used, transpose: bool = False):
  """blocks[b] @ w[block_group[b]] (its transpose): a loop, so one group's weights at a time."""
  n = w.shape[1] if transpose else w.shape[2]

  def body(b, inputs):
    x, g = inputs
    product = lambda: x @ (w[g].T if transpose else w[g])
    return b + 1, jax.lax.cond(b < used, product, lambda: jnp.zeros((x.shape[0], n), x.dtype))

  return jax.lax.scan(body, 0, (blocks, block_group))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def blocked_matmul(lhs, rhs, sizes, block: int):
  """`grouped_matmul` as a loop over blocks of `block` rows, each within one group."""
  return _blocked_forward(lhs, rhs, sizes, block)[0]


def _blocked_forward(lhs, rhs, sizes, block):
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  dest, block_group, used = block_layout(sizes, lhs.shape[0], block)
  blocks = _to_blocks(lhs, dest, block_group.shape[0], block)
  out = _from_blocks(_each_block(blocks, rhs, block_group, used), dest)
  return out, (blocks, rhs, dest, block_group, used)


def _blocked_backward(block, residuals, d_out):
  blocks, rhs, dest, block_group, used = residuals
  d_blocks = _to_blocks(d_out.astype(blocks.dtype), dest, blocks.shape[0], block)
  d_lhs = _from_blocks(_each_block(d_blocks, rhs, block_group, used, transpose=True), dest).astype(blocks.dtype)

  def add_block(d_rhs, inputs):  # d rhs[g] += x_b^T dy_b, in place
    b, x, dy, g = inputs
    return jax.lax.cond(b < used, lambda: d_rhs.at[g].add((x.T @ dy).astype(d_rhs.dtype)), lambda: d_rhs), None

  indices = jnp.arange(blocks.shape[0])
  d_rhs = jax.lax.scan(add_block, jnp.zeros_like(rhs), (indices, blocks, d_blocks, block_group))[0]
  return d_lhs, d_rhs, None


blocked_matmul.defvjp(_blocked_forward, _blocked_backward)


@jax.custom_vjp
def blocked_swiglu(xs, sizes, gate, up, down):
  """The experts' SwiGLU on rows sorted by expert, in the blocked layout from end to end:
  silu(x @ gate[e]) * (x @ up[e]) @ down[e] for each row of expert e; rows past sum(sizes) give 0.

  One loop over blocks does a block's three products (three grouped matmuls would each lay the
  rows out in blocks and back); the backward pass is one loop too, each expert's weight gradients
  summed in place.
  """
  return _swiglu_forward(xs, sizes, gate, up, down)[0]


def _swiglu_forward(xs, sizes, gate, up, down):
  xs, gate, up, down = (jnp.asarray(a) for a in (xs, gate, up, down))
  block = block_rows(xs.shape[0], gate.shape[0])
  dest, block_group, used = block_layout(sizes, xs.shape[0], block)
  blocks = _to_blocks(xs, dest, block_group.shape[0], block)
  d = down.shape[2]

  def body(b, inputs):
    x, e = inputs

    def ffn():
      g, u = x @ gate[e], x @ up[e]
      return (jax.nn.silu(g) * u) @ down[e], g, u

    zeros = lambda: (jnp.zeros((block, d), x.dtype),) + (jnp.zeros((block, gate.shape[2]), x.dtype),) * 2
    return b + 1, jax.lax.cond(b < used, ffn, zeros)

  y, g, u = jax.lax.scan(body, 0, (blocks, block_group))[1]
  return _from_blocks(y, dest), (blocks, g, u, dest, block_group, used, gate, up, down)


def _swiglu_backward(residuals, d_out):
  blocks, g_all, u_all, dest, block_group, used, gate, up, down = residuals
  d_blocks = _to_blocks(d_out.astype(blocks.dtype), dest, blocks.shape[0], blocks.shape[1])

  def body(carry, inputs):
    b, d_gate, d_up, d_down = carry
    x, g, u, dy, e = inputs

    def grads():
      sig = jax.nn.sigmoid(g)
      act = g * sig  # silu(g)
      dh = dy @ down[e].T
      dg = dh * u * sig * (1 + g * (1 - sig))  # silu'(g) = sig (1 + g (1 - sig))
      du = dh * act
      dx = dg @ gate[e].T + du @ up[e].T
      add = lambda acc, grad: acc.at[e].add(grad.astype(acc.dtype))
      return dx, add(d_gate, x.T @ dg), add(d_up, x.T @ du), add(d_down, (act * u).T @ dy)

    skip = lambda: (jnp.zeros_like(x), d_gate, d_up, d_down)
    dx, d_gate, d_up, d_down = jax.lax.cond(b < used, grads, skip)
    return (b + 1, d_gate, d_up, d_down), dx

  zeros = (0, jnp.zeros_like(gate), jnp.zeros_like(up), jnp.zeros_like(down))
  (_, d_gate, d_up, d_down), dx = jax.lax.scan(body, zeros, (blocks, g_all, u_all, d_blocks, block_group))
  return _from_blocks(dx, dest).astype(blocks.dtype), None, d_gate, d_up, d_down


blocked_swiglu.defvjp(_swiglu_forward, _swiglu_backward)
