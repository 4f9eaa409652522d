"""Decoder-only LLM: RMSNorm, RoPE, grouped-query attention, SwiGLU; layers stacked and scanned.

`embed(tokens)` and `decode(x, positions, segment_ids)` are separate so the multimodal model
can write image tokens into the embedded sequence between the two.
The stacking helpers (`stack_layers`, `scan_layers`) are shared with the ViT.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mm15_jax.models.attention import attention, check_impl
from mm15_jax.sharding import constrain

REMAT = ("none", "full", "dots")


def param(rngs, init, shape, names, dtype):
  """A parameter with one logical axis name (or None) per dimension."""
  assert len(names) == len(shape), (names, shape)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(names))


def dense_init(fan_in_axes):
  """Truncated normal with variance 1/fan_in over the given input axes (LeCun)."""
  return jax.nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=fan_in_axes, out_axis=-1)


def stack_layers(make_block, n_layers: int, rngs: nnx.Rngs):
  """Creates `n_layers` blocks as one module whose params have a leading "layers" axis."""

  @nnx.split_rngs(splits=n_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(rngs):
    return make_block(rngs)

  return create(rngs)


def remat_policy(remat: str):
  if remat not in REMAT:
    raise ValueError(f"config.model.remat={remat!r}: expected one of {REMAT}")
  return {
      "full": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }.get(remat)


def scan_layers(layers, x, *args, remat: str = "none", unroll: int = 1):
  """Runs stacked `layers` over `x` with `jax.lax.scan`: compile time does not grow with depth.

  `layers(x, *args) -> x` is one block; `args` are the same for every layer. A plain
  `jax.lax.scan` over the split state (rather than `nnx.scan`) also works when the module is
  closed over by `jax.jit`, as inference code tends to do. `unroll` > 1 trades compile time
  for speed where loop overhead shows (CPUs).
  """
  graphdef, state = nnx.split(layers)

  def body(x, layer_state):
    return nnx.merge(graphdef, layer_state)(x, *args), None

  if remat != "none":
    body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
  x, _ = jax.lax.scan(body, x, state, unroll=unroll)
  return x


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), (None,), param_dtype)
    self.eps = eps

  def __call__(self, x):
    # Statistics in float32 whatever the compute dtype.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta: float):
  """Rotary embedding, half-split layout (rotates dims i and i + head_dim/2).

  x: [batch, length, heads, head_dim]; positions: int [batch, length] (restart per packed segment).
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [batch, length, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class DecoderBlock(nnx.Module):
  """Pre-norm block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

  def __init__(self, cfg, *, dtype, param_dtype, attention_impl, rngs):
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    self.dtype, self.theta, self.attention_impl = dtype, cfg.rope_theta, attention_impl
    p = lambda init, shape, names: param(rngs, init, shape, names, param_dtype)
    self.attn_norm = RMSNorm(d, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.q = p(dense_init(0), (d, h, hd), ("embed", "heads", "head_dim"))
    self.k = p(dense_init(0), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
    self.v = p(dense_init(0), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
    self.o = p(dense_init((0, 1)), (h, hd, d), ("heads", "head_dim", "embed"))
    self.mlp_norm = RMSNorm(d, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.gate = p(dense_init(0), (d, f), ("embed", "mlp"))
    self.up = p(dense_init(0), (d, f), ("embed", "mlp"))
    self.down = p(dense_init(0), (f, d), ("mlp", "embed"))

  def __call__(self, x, positions, segment_ids):
    # x: [batch, length, embed]
    w = lambda v: v[...].astype(self.dtype)
    y = self.attn_norm(x)
    q = constrain(jnp.einsum("bld,dhk->blhk", y, w(self.q)), ("batch", "length", "heads", "head_dim"))
    k = constrain(jnp.einsum("bld,dhk->blhk", y, w(self.k)), ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(jnp.einsum("bld,dhk->blhk", y, w(self.v)), ("batch", "length", "kv_heads", "head_dim"))
    q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
    a = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True,
                  impl=self.attention_impl)  # [batch, length, heads, head_dim]
    x = constrain(x + jnp.einsum("blhk,hkd->bld", a, w(self.o)), ("batch", "length", "embed"))

    y = self.mlp_norm(x)
    g = jnp.einsum("bld,df->blf", y, w(self.gate))
    u = jnp.einsum("bld,df->blf", y, w(self.up))
    hidden = constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
    x = constrain(x + jnp.einsum("blf,fd->bld", hidden, w(self.down)), ("batch", "length", "embed"))
    return x


class Decoder(nnx.Module):
  """Token embedding -> `n_layers` scanned DecoderBlocks -> RMSNorm -> LM head (float32 logits)."""

  def __init__(self, config, *, dtype="float32", param_dtype="float32", remat="none",
               attention_impl="xla", scan_unroll: int = 1, rngs: nnx.Rngs):
    if config.n_heads % config.n_kv_heads:
      raise ValueError(f"config.model.llm: n_heads={config.n_heads} is not a multiple of "
                       f"n_kv_heads={config.n_kv_heads}")
    if config.head_dim % 2:
      raise ValueError(f"config.model.llm.head_dim={config.head_dim} must be even for RoPE")
    check_impl(attention_impl, platform=False)  # the platform is checked when it runs
    remat_policy(remat)
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    self.dtype, self.remat, self.tie = dtype, remat, bool(config.tie_embeddings)
    self.scan_unroll = scan_unroll
    d, vocab = config.d_model, config.vocab_size
    # Std 1/sqrt(d): O(1) logits when the table doubles as the LM head.
    self.embedding = param(rngs, dense_init(1), (vocab, d), ("vocab", "embed"), param_dtype)
    self.layers = stack_layers(
        lambda r: DecoderBlock(config, dtype=dtype, param_dtype=param_dtype,
                               attention_impl=attention_impl, rngs=r),
        config.n_layers, rngs)
    self.final_norm = RMSNorm(d, config.norm_eps, param_dtype=param_dtype, rngs=rngs)
    if not self.tie:
      self.lm_head = param(rngs, dense_init(0), (d, vocab), ("embed", "vocab"), param_dtype)

  def embed(self, tokens):
    """tokens: int [batch, length] -> [batch, length, embed] in the compute dtype."""
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
    return constrain(x, ("batch", "length", "embed"))

  def decode(self, x, positions, segment_ids):
    """x: [batch, length, embed]; positions, segment_ids: int [batch, length] -> float32 [batch, length, vocab]."""
    x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))
    x = scan_layers(self.layers, x, positions, segment_ids, remat=self.remat, unroll=self.scan_unroll)
    x = self.final_norm(x)
    if self.tie:
      head = self.embedding[...].astype(self.dtype).T
    else:
      head = self.lm_head[...].astype(self.dtype)
    logits = jnp.einsum("bld,dv->blv", x, head, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))

  def __call__(self, tokens, positions, segment_ids):
    return self.decode(self.embed(tokens), positions, segment_ids)
