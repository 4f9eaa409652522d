"""Connectors: ViT patch features [n, patches, vit_width] -> LLM tokens [n, tokens_per_tile, d_model].

`CAbstractor` is honeybee's C-Abstractor: position embedding -> ResNet-bottleneck stage ->
adaptive average pool to sqrt(K) x sqrt(K) -> second stage -> MLP readout. Each bottleneck
block follows timm's RegNet `Bottleneck` as honeybee configures it (bottle_ratio 1, depthwise
3x3, squeeze-excite 0.25, LayerNorm over channels, SiLU). `MLPConnector` is the ablation:
pool, then a 2-layer MLP.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm15_jax import modes
from mm15_jax.models.dense import dense
from mm15_jax.models.llm import dense_init, param
from mm15_jax.models.vit import LayerNorm, resize_pos_embedding, sincos_init
from mm15_jax.sharding import constrain


def pooling_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's adaptive average pooling along one axis.

  Bin i averages inputs floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1.
  """
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x, out_h: int, out_w: int):
  """x: [n, h, w, c] -> [n, out_h, out_w, c], exact for sizes that do not divide (two small matmuls)."""
  ph = jnp.asarray(pooling_matrix(x.shape[1], out_h), x.dtype)
  pw = jnp.asarray(pooling_matrix(x.shape[2], out_w), x.dtype)
  return jnp.einsum("nhwc,ah,bw->nabc", x, ph, pw)


def _grid(patches: int) -> int:
  side = math.isqrt(patches)
  if side * side != patches:
    raise ValueError(f"connector: {patches} patch features are not a square grid; use square image tiles")
  return side


class Bottleneck(nnx.Module):
  """1x1 conv -> LN -> SiLU -> depthwise 3x3 -> LN -> SiLU -> SE -> 1x1 conv -> LN, + shortcut, SiLU."""

  def __init__(self, c_in: int, c_out: int, eps: float, *, dtype, param_dtype, rngs):
    b, se = c_out, max(1, round(c_in * 0.25))  # bottle_ratio 1; SE width from the block input
    p = lambda init, shape, names: param(rngs, init, shape, names, param_dtype)
    ln = lambda c: LayerNorm(c, eps, param_dtype=param_dtype, rngs=rngs)
    zeros = jax.nn.initializers.zeros
    self.dtype = dtype
    self.conv1, self.norm1 = p(dense_init(0), (c_in, b), ("embed", "mlp")), ln(b)
    self.conv2, self.norm2 = p(dense_init((0, 1)), (3, 3, b), (None, None, "mlp")), ln(b)
    self.se_fc1, self.se_fc1_bias = p(dense_init(0), (b, se), ("mlp", None)), p(zeros, (se,), (None,))
    self.se_fc2, self.se_fc2_bias = p(dense_init(0), (se, b), (None, "mlp")), p(zeros, (b,), (None,))
    self.conv3, self.norm3 = p(dense_init(0), (b, c_out), ("mlp", "embed")), ln(c_out)
    if c_in != c_out:  # timm's conv1x1 + norm downsample path
      self.shortcut, self.shortcut_norm = p(dense_init(0), (c_in, c_out), ("embed", None)), ln(c_out)
    else:
      self.shortcut = None

  def __call__(self, x):
    # x: [n, h, w, c_in]
    w = lambda v: v[...].astype(self.dtype)
    y = jax.nn.silu(self.norm1(dense(x, w(self.conv1))))
    kernel = w(self.conv2)[:, :, None, :]  # HWIO with one input channel per group: depthwise
    y = jax.lax.conv_general_dilated(y, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=y.shape[-1])
    y = jax.nn.silu(self.norm2(y))
    s = y.mean(axis=(1, 2))  # squeeze-excite: [n, b]
    s = jax.nn.silu(s @ w(self.se_fc1) + w(self.se_fc1_bias))
    y = y * jax.nn.sigmoid(s @ w(self.se_fc2) + w(self.se_fc2_bias))[:, None, None, :]
    y = self.norm3(dense(y, w(self.conv3)))
    if self.shortcut is not None:
      x = self.shortcut_norm(dense(x, w(self.shortcut)))
    return jax.nn.silu(x + y)


class CAbstractor(nnx.Module):

  def __init__(self, vit_width: int, vit_grid: int, d_model: int, tokens_per_tile: int, depth: int,
               hidden_dim: int, *, eps: float = 1e-6, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
    side = math.isqrt(tokens_per_tile)
    if side * side != tokens_per_tile:
      raise ValueError(f"config.model.connector.tokens_per_tile={tokens_per_tile} must be a square (e.g. 144)")
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    self.dtype, self.side = dtype, side
    block = lambda c_in, c_out: Bottleneck(c_in, c_out, eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Sin-cos codes as the ViT's, small: they are added to the ViT's normalised features.
    self.pos_embedding = param(rngs, sincos_init(0.1), (vit_grid, vit_grid, vit_width),
                               (None, None, "embed"), param_dtype)
    self.stage1 = nnx.List([block(vit_width if i == 0 else hidden_dim, hidden_dim) for i in range(depth)])
    self.stage2 = nnx.List([block(hidden_dim, hidden_dim) for _ in range(depth)])
    p = lambda init, shape, names: param(rngs, init, shape, names, param_dtype)
    zeros = jax.nn.initializers.zeros
    self.readout1 = p(dense_init(0), (hidden_dim, d_model), (None, "embed"))
    self.readout1_bias = p(zeros, (d_model,), (None,))
    self.readout2 = p(dense_init(0), (d_model, d_model), ("mlp", "embed"))
    self.readout2_bias = p(zeros, (d_model,), (None,))

  def __call__(self, x):
    # x: [n, patches, vit_width] -> [n, tokens_per_tile, d_model]
    n, patches, width = x.shape
    g = _grid(patches)
    w = lambda v: v[...].astype(self.dtype)
    x = x.astype(self.dtype).reshape(n, g, g, width) + resize_pos_embedding(w(self.pos_embedding), g, g)
    for blk in self.stage1:
      x = blk(x)
    x = adaptive_avg_pool(x, self.side, self.side)
    for blk in self.stage2:
      x = blk(x)
    x = x.reshape(n, self.side * self.side, -1)
    x = jax.nn.silu(x @ w(self.readout1) + w(self.readout1_bias))
    x = x @ w(self.readout2) + w(self.readout2_bias)
    return constrain(x, ("batch", "length", "embed"))


class MLPConnector(nnx.Module):
  """Ablation: adaptive average pool to tokens_per_tile, then Linear -> GELU -> Linear."""

  def __init__(self, vit_width: int, d_model: int, tokens_per_tile: int, *, dtype="float32",
               param_dtype="float32", rngs: nnx.Rngs):
    side = math.isqrt(tokens_per_tile)
    if side * side != tokens_per_tile:
      raise ValueError(f"config.model.connector.tokens_per_tile={tokens_per_tile} must be a square (e.g. 144)")
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    self.dtype, self.side = dtype, side
    p = lambda init, shape, names: param(rngs, init, shape, names, param_dtype)
    zeros = jax.nn.initializers.zeros
    self.fc1, self.fc1_bias = p(dense_init(0), (vit_width, d_model), (None, "embed")), p(zeros, (d_model,), (None,))
    self.fc2, self.fc2_bias = p(dense_init(0), (d_model, d_model), ("mlp", "embed")), p(zeros, (d_model,), (None,))

  def __call__(self, x):
    n, patches, width = x.shape
    g = _grid(patches)
    w = lambda v: v[...].astype(self.dtype)
    x = adaptive_avg_pool(x.astype(self.dtype).reshape(n, g, g, width), self.side, self.side)
    x = x.reshape(n, self.side * self.side, width)
    x = jax.nn.gelu(x @ w(self.fc1) + w(self.fc1_bias), approximate=False)
    x = x @ w(self.fc2) + w(self.fc2_bias)
    return constrain(x, ("batch", "length", "embed"))


def make_connector(model_config, rngs: nnx.Rngs):
  """The connector named by `config.model.connector.kind`."""
  c = model_config.connector
  vit, llm = model_config.vit, model_config.llm
  common = dict(dtype=model_config.dtype, param_dtype=model_config.param_dtype, rngs=rngs)
  kind = modes.parse(modes.ConnectorKind, c.kind)
  if kind == modes.ConnectorKind.C_ABSTRACTOR:
    return CAbstractor(vit.width, vit.image_size // vit.patch_size, llm.d_model, c.tokens_per_tile, c.depth,
                       c.hidden_dim, **common)
  return MLPConnector(vit.width, llm.d_model, c.tokens_per_tile, **common)
