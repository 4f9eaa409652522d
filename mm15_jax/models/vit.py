"""CLIP-style Vision Transformer (open_clip layout): images -> patch features for the connector.

Choices: a class token is kept, as in CLIP, so pretrained CLIP weights compute what they were
trained to; it is dropped from the output. There is no ln_post: the connector reads the last
block's patch tokens (as honeybee reads CLIP's `last_hidden_state`). Position embeddings are
learned for the `image_size` grid and bilinearly resized at call time for any other grid.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm15_jax import modes
from mm15_jax.models.attention import attention, check_impl
from mm15_jax.models.dense import dense
from mm15_jax.models.llm import dense_init, param, remat_policy, scan_layers, stack_layers
from mm15_jax.sharding import constrain

ACTS = {
    modes.VitAct.QUICK_GELU: lambda x: x * jax.nn.sigmoid(1.702 * x),
    modes.VitAct.GELU: lambda x: jax.nn.gelu(x, approximate=False),
    modes.VitAct.GELU_TANH: lambda x: jax.nn.gelu(x, approximate=True),  # SigLIP's "gelu_pytorch_tanh"
}


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis; statistics in float32."""

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), (None,), param_dtype)
    self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), (None,), param_dtype)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """[n_out, n_in] weights of 1-D bicubic resizing as torch's `interpolate(mode="bicubic",
  align_corners=False)` computes it (Keys kernel a=-0.75, half-pixel centres, edge samples
  repeated), so encoders tuned with it see the same position embeddings at other sizes."""

  def kernel(t):
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0

  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = (i + 0.5) * n_in / n_out - 0.5
    base = int(np.floor(src))
    for j in range(base - 1, base + 3):
      m[i, min(max(j, 0), n_in - 1)] += kernel(src - j)
  return m


def sincos_2d(grid: int, width: int, scale: float = 1.0) -> np.ndarray:
  """[grid, grid, width] 2-D sin-cos position codes (a quarter of the channels each for
  sin x, cos x, sin y, cos y; frequencies 1 / 10000^(k / (width/4)))."""
  if width % 4:
    raise ValueError(f"sin-cos position codes need a width divisible by 4, got {width}")
  quarter = width // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
  y, x = np.mgrid[:grid, :grid]
  x = x.reshape(-1, 1) * omega
  y = y.reshape(-1, 1) * omega
  codes = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return (scale * codes).reshape(grid, grid, width)


def sincos_init(scale: float = 1.0):
  """An initializer for a learned [grid, grid, width] position table: 2-D sin-cos codes.

  From scratch, a table that already says where each patch is lets the model learn where an
  object is several hundred steps sooner than a random one (benchmarks/RESULTS.md, "Boxes"); it
  stays trainable, and imported weights replace it."""
  def init(key, shape, dtype=jnp.float32):
    del key
    grid, grid_w, width = shape
    assert grid == grid_w, shape
    return jnp.asarray(sincos_2d(grid, width, scale), dtype)
  return init


def resize_pos_embedding(table, grid_h: int, grid_w: int, method: str = "bilinear"):
  """table: [h, w, width] learned grid -> [grid_h, grid_w, width]: "bilinear" (half-pixel
  centres) or "bicubic" (torch's, see bicubic_matrix).

  Returns the table itself at its own grid, so native-resolution inputs see the learned values.
  """
  if table.shape[:2] == (grid_h, grid_w):
    return table
  if modes.parse(modes.PosResize, method) == modes.PosResize.BICUBIC:
    rows = jnp.asarray(bicubic_matrix(table.shape[0], grid_h), jnp.float32)
    cols = jnp.asarray(bicubic_matrix(table.shape[1], grid_w), jnp.float32)
    out = jnp.einsum("ih,jw,hwd->ijd", rows, cols, table.astype(jnp.float32), precision="highest")
    return out.astype(table.dtype)
  return jax.image.resize(table, (grid_h, grid_w, table.shape[-1]), method="bilinear", antialias=False)


class ViTBlock(nnx.Module):
  """Pre-norm block: x + MHA(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, cfg, *, dtype, param_dtype, attention_impl, rngs):
    d, h, f = cfg.width, cfg.heads, cfg.mlp_dim
    hd = d // h
    self.dtype, self.act, self.attention_impl = dtype, ACTS[modes.parse(modes.VitAct, cfg.act)], attention_impl
    p = lambda init, shape, names: param(rngs, init, shape, names, param_dtype)
    zeros = jax.nn.initializers.zeros
    self.ln_1 = LayerNorm(d, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.q = p(dense_init(0), (d, h, hd), ("embed", "heads", "head_dim"))
    self.k = p(dense_init(0), (d, h, hd), ("embed", "heads", "head_dim"))
    self.v = p(dense_init(0), (d, h, hd), ("embed", "heads", "head_dim"))
    # Biases are 1-D ([heads * head_dim]) so weight-decay masks treat them as biases.
    self.q_bias = p(zeros, (h * hd,), (None,))
    self.k_bias = p(zeros, (h * hd,), (None,))
    self.v_bias = p(zeros, (h * hd,), (None,))
    self.o = p(dense_init((0, 1)), (h, hd, d), ("heads", "head_dim", "embed"))
    self.o_bias = p(zeros, (d,), (None,))
    self.ln_2 = LayerNorm(d, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = p(dense_init(0), (d, f), ("embed", "mlp"))
    self.fc1_bias = p(zeros, (f,), (None,))
    self.fc2 = p(dense_init(0), (f, d), ("mlp", "embed"))
    self.fc2_bias = p(zeros, (d,), (None,))

  def __call__(self, x, segment_ids):
    # x: [n, tokens, width]; segment_ids: all ones [n, tokens] (every token sees every token).
    w = lambda v: v[...].astype(self.dtype)
    heads, hd = self.q.shape[1], self.q.shape[2]
    proj = lambda y, k, b: dense(y, w(k)) + w(b).reshape(heads, hd)
    y = self.ln_1(x)
    q = constrain(proj(y, self.q, self.q_bias), ("batch", "length", "heads", "head_dim"))
    k = constrain(proj(y, self.k, self.k_bias), ("batch", "length", "heads", "head_dim"))
    v = constrain(proj(y, self.v, self.v_bias), ("batch", "length", "heads", "head_dim"))
    a = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=False,
                  impl=self.attention_impl)
    x = x + dense(a, w(self.o), contract=2) + w(self.o_bias)
    x = constrain(x, ("batch", "length", "embed"))
    y = self.ln_2(x)
    hidden = self.act(dense(y, w(self.fc1)) + w(self.fc1_bias))
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    x = x + dense(hidden, w(self.fc2)) + w(self.fc2_bias)
    return constrain(x, ("batch", "length", "embed")), None  # no per-layer statistics (scan_layers)


class VisionTransformer(nnx.Module):
  """images [n, H, W, 3] -> patch features [n, (H/p) * (W/p), width]."""

  def __init__(self, config, *, dtype="float32", param_dtype="float32", remat="none", scan_unroll: int = 1,
               attention_impl="xla", rngs: nnx.Rngs):
    modes.parse(modes.VitAct, config.act)
    if config.width % config.heads:
      raise ValueError(f"config.model.vit: width={config.width} is not a multiple of heads={config.heads}")
    pos_resize = modes.parse(modes.PosResize, config.pos_resize)
    if config.image_size % config.patch_size:
      raise ValueError(f"config.model.vit: image_size={config.image_size} is not a multiple of "
                       f"patch_size={config.patch_size}")
    check_impl(attention_impl, platform=False)
    remat_policy(remat)
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    self.dtype, self.remat, self.patch_size = dtype, remat, config.patch_size
    self.scan_unroll = scan_unroll
    self.pos_resize = pos_resize
    p, d, g = config.patch_size, config.width, config.image_size // config.patch_size
    emb = jax.nn.initializers.normal(d ** -0.5)  # CLIP's scale for class and position embeddings
    # Conv kernel layout [p, p, 3, width] (open_clip's conv1, transposed), applied as a matmul.
    self.patch_embedding = param(rngs, dense_init((0, 1, 2)), (p, p, 3, d), (None, None, None, "embed"), param_dtype)
    # Optional parts are None when the checkpoint family has none (as every module here does).
    self.patch_bias = param(rngs, jax.nn.initializers.zeros, (d,), (None,), param_dtype) if config.patch_bias else None
    self.class_embedding = param(rngs, emb, (d,), (None,), param_dtype) if config.class_token else None
    self.class_pos_embedding = param(rngs, emb, (d,), (None,), param_dtype) if config.class_token else None
    # At CLIP's scale for embeddings: larger codes drown the colours early in training.
    self.pos_embedding = param(rngs, sincos_init(d ** -0.5), (g, g, d), (None, None, "embed"), param_dtype)
    norm = lambda: LayerNorm(d, config.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.ln_pre = norm() if config.pre_norm else None
    self.ln_post = norm() if config.post_norm else None
    self.layers = stack_layers(
        lambda r: ViTBlock(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=r),
        config.depth, rngs)

  def __call__(self, images):
    n, h, w, c = images.shape
    p = self.patch_size
    if h % p or w % p or c != 3:
      raise ValueError(f"VisionTransformer: images of shape {images.shape} must be [n, H, W, 3] with H, W "
                       f"multiples of patch_size={p}; check config.model.vit.image_size")
    gh, gw = h // p, w // p
    # Non-overlapping patches: [n, gh, gw, p, p, 3] -> [n, gh, gw, width].
    patches = images.astype(self.dtype).reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = dense(patches, self.patch_embedding[...].astype(self.dtype), contract=3)
    if self.patch_bias is not None:
      x = x + self.patch_bias[...].astype(self.dtype)
    x = x + resize_pos_embedding(self.pos_embedding[...], gh, gw, self.pos_resize).astype(self.dtype)
    x = x.reshape(n, gh * gw, -1)
    has_cls = self.class_embedding is not None
    if has_cls:
      cls = (self.class_embedding[...] + self.class_pos_embedding[...]).astype(self.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, cls.shape[-1])), x], axis=1)
    if self.ln_pre is not None:
      x = self.ln_pre(x)
    x = constrain(x, ("batch", "length", "embed"))
    segment_ids = jnp.ones(x.shape[:2], jnp.int32)
    x, _ = scan_layers(self.layers, x, segment_ids, remat=self.remat, unroll=self.scan_unroll)
    if self.ln_post is not None:
      x = self.ln_post(x)
    return x[:, 1:] if has_cls else x  # patch tokens only: [n, gh * gw, width]
