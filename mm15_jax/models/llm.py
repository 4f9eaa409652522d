"""Decoder-only LLM: RMSNorm, RoPE, grouped-query attention, SwiGLU; layers stacked and scanned.

With `config.model.moe.num_experts` > 0 every `interval`-th layer's MLP is a mixture of experts
(models/moe.py): the scanned unit is then a group of `interval` layers, `interval - 1` dense
blocks and one MoE block last, so compile time still does not grow with depth.

`embed(tokens)` and `decode(x, positions, segment_ids)` are separate so the multimodal model
can write image tokens into the embedded sequence between the two.
The stacking helpers (`stack_layers`, `scan_layers`) are shared with the ViT.

Inference (mm15_jax/inference): `prefill` runs a prompt like `decode` and also returns every
layer's keys and values, the KV cache [n_layers, batch, length, kv_heads, head_dim] (RoPE
applied); `step` feeds one token per row against that cache and writes its keys and values
in. Same parameters, same blocks, so the cached path computes what the full forward does.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mm15_jax import modes
from mm15_jax import sharding as shd
from mm15_jax.models.attention import attention, check_impl, decode_attention
from mm15_jax.models.dense import dense
from mm15_jax.models.moe import MoE, check_moe, moe_settings, upcycle_dense_mlp
from mm15_jax.sharding import constrain

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


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


# The decoder block's activations by name (checkpoint_name), for the named remat policies: the
# projections are what a backward pass most wants back, at 2-4 x d_model values a token each.
QKV_NAMES = ("q_proj", "k_proj", "v_proj")
PROJ_NAMES = (*QKV_NAMES, "attn_out", "mlp_in")


def remat_policy(remat: str):
  """The jax.checkpoint policy of config.model.remat (None for "none"); an unknown value is refused.
  The named policies keep nothing of the ViT's blocks (no names there: its activations are small
  next to the decoder's)."""
  policies = jax.checkpoint_policies
  return {
      modes.Remat.NONE: lambda: None,
      modes.Remat.FULL: lambda: policies.nothing_saveable,
      modes.Remat.DOTS: lambda: policies.checkpoint_dots_with_no_batch_dims,
      modes.Remat.QKV: lambda: policies.save_only_these_names(*QKV_NAMES),
      modes.Remat.PROJ: lambda: policies.save_only_these_names(*PROJ_NAMES),
      modes.Remat.PROJ_OFFLOAD: lambda: policies.save_and_offload_only_these_names(
          names_which_can_be_saved=[], names_which_can_be_offloaded=list(PROJ_NAMES),
          offload_src="device", offload_dst="pinned_host"),
  }[modes.parse(modes.Remat, remat)]()


# model.scan_unroll=0 (auto) unrolls stacks up to this depth on CPU: XLA:CPU runs a scanned layer
# loop ~10% slower than the same layers unrolled (benchmarks/RESULTS.md, "Train step, CPU").
CPU_UNROLL_MAX_LAYERS = 16


def layer_unroll(unroll: int, layers: int) -> int:
  """Layers per scan iteration for `model.scan_unroll`: as set, or for 0 (auto) every layer when
  compiling for CPU and the stack is at most CPU_UNROLL_MAX_LAYERS deep, else one."""
  if unroll:
    return unroll
  return layers if shd.compile_platform() == "cpu" and layers <= CPU_UNROLL_MAX_LAYERS else 1


def _depth(state) -> int:
  return jax.tree.leaves(state)[0].shape[0]


def scan_layers(layers, x, *args, remat: str = "none", unroll: int = 1):
  """Runs stacked `layers` over `x` with `jax.lax.scan`: compile time does not grow with depth.

  `layers(x, *args) -> (x, stats)` is one block (stats: a pytree, or None for none); `args`
  are the same for every layer. Returns (x, stats stacked over layers, or None). A plain
  `jax.lax.scan` over the split state (rather than `nnx.scan`) also works when the module is
  closed over by `jax.jit`, as inference code tends to do. `unroll` > 1 trades compile time
  for speed where loop overhead shows (CPUs); 0 is `layer_unroll`'s auto.
  """
  graphdef, state = nnx.split(layers)

  def body(x, layer_state):
    return nnx.merge(graphdef, layer_state)(x, *args)

  if modes.parse(modes.Remat, remat) != modes.Remat.NONE:
    body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
  return jax.lax.scan(body, x, state, unroll=layer_unroll(unroll, _depth(state)))


def scan_blocks(layers, x, fn, xs=None, unroll: int = 1):
  """`fn(block, x, xs_l) -> (x, ys_l)` over stacked `layers`; per-layer inputs `xs` and outputs
  `ys` stacked on the leading axis (the KV cache at inference). Returns (x, ys)."""
  graphdef, state = nnx.split(layers)

  def body(x, inputs):
    layer_state, xs_l = inputs
    return fn(nnx.merge(graphdef, layer_state), x, xs_l)

  return jax.lax.scan(body, x, (state, xs), unroll=layer_unroll(unroll, _depth(state)))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), (None,), param_dtype)
    self.eps = eps

  def __call__(self, x):
    # Statistics in float32 whatever the compute dtype.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> np.ndarray:
  """Inverse frequencies [head_dim / 2] in float64: theta^(-2i/head_dim), then the context-extension
  rule of `scaling` (config.model.llm.rope_scaling): "linear" divides them all by `factor`
  (position interpolation); "llama3" divides only the long wavelengths, blending in between, as
  Llama 3.1 was trained. Computed on the host: they are constants of the model."""
  half = head_dim // 2
  inv_freq = float(theta) ** (-np.arange(half, dtype=np.float64) / half)
  kind = modes.RopeScaling.NONE if scaling is None else modes.parse(modes.RopeScaling, scaling["kind"])
  if kind == modes.RopeScaling.NONE:
    return inv_freq
  factor = float(scaling["factor"])
  if kind == modes.RopeScaling.LINEAR:
    return inv_freq / factor
  if kind == modes.RopeScaling.LLAMA3:
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position"])
    wavelen = 2 * np.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelen > context / low, inv_freq / factor, np.where(wavelen < context / high, inv_freq, blended))
  raise AssertionError(kind)  # every RopeScaling is handled above


def rope(x, positions, theta: float, scaling=None):
  """Rotary embedding, half-split layout (rotates dims i and i + head_dim/2).

  x: [batch, length, heads, head_dim]; positions: int [batch, length] (restart per packed segment).
  """
  inv_freq = jnp.asarray(rope_frequencies(x.shape[-1], theta, scaling), jnp.float32)  # [half]
  angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [batch, length, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class DecoderBlock(nnx.Module):
  """Pre-norm block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)) (or x + MoE(RMSNorm(x)))."""

  def __init__(self, cfg, *, dtype, param_dtype, attention_impl, moe=None, rngs):
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    self.dtype, self.theta, self.attention_impl = dtype, cfg.rope_theta, attention_impl
    scaling = dict(cfg.rope_scaling)
    kind = modes.parse(modes.RopeScaling, scaling["kind"])
    # A tuple of plain values: a static attribute of the module, not a pytree of the graph.
    self.rope_scaling = tuple(sorted(scaling.items())) if kind != modes.RopeScaling.NONE else None
    p = lambda init, shape, names: param(rngs, init, shape, names, param_dtype)
    self.attn_norm = RMSNorm(d, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.q = p(dense_init(0), (d, h, hd), ("embed", "heads", "head_dim"))
    self.k = p(dense_init(0), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
    self.v = p(dense_init(0), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
    self.o = p(dense_init((0, 1)), (h, hd, d), ("heads", "head_dim", "embed"))
    # Qwen2-style decoders have q/k/v biases; None elsewhere.
    zeros = jax.nn.initializers.zeros
    bias = lambda heads_axis, n: p(zeros, (n, hd), (heads_axis, "head_dim")) if cfg.qkv_bias else None
    self.q_bias, self.k_bias, self.v_bias = bias("heads", h), bias("kv_heads", kv), bias("kv_heads", kv)
    self.mlp_norm = RMSNorm(d, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    # An MoE block's MLP is `moe` (its stats come back from __call__); a dense block's is gate/up/down.
    self.moe = MoE(d, moe, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if moe is not None else None
    if self.moe is not None:
      return
    self.gate = p(dense_init(0), (d, f), ("embed", "mlp"))
    self.up = p(dense_init(0), (d, f), ("embed", "mlp"))
    self.down = p(dense_init(0), (f, d), ("mlp", "embed"))

  def _qkv(self, x, positions):
    # x: [batch, length, embed] -> q [batch, length, heads, head_dim], k, v [.., kv_heads, ..], RoPE on q, k.
    w = lambda v: v[...].astype(self.dtype)
    y = self.attn_norm(x)

    def project(name, heads_axis):
      out = dense(y, w(getattr(self, name)))
      if getattr(self, name + "_bias") is not None:
        out = out + w(getattr(self, name + "_bias"))
      return checkpoint_name(constrain(out, ("batch", "length", heads_axis, "head_dim")), name + "_proj")

    q, k, v = project("q", "heads"), project("k", "kv_heads"), project("v", "kv_heads")
    scaling = dict(self.rope_scaling) if self.rope_scaling else None
    return rope(q, positions, self.theta, scaling), rope(k, positions, self.theta, scaling), v

  def _rest(self, x, a, valid):
    """Attention output projection, then the MLP (or MoE): (x, MoE stats or None)."""
    w = lambda v: v[...].astype(self.dtype)
    out = checkpoint_name(dense(a, w(self.o), contract=2), "attn_out")
    x = constrain(x + out, ("batch", "length", "embed"))

    y = checkpoint_name(self.mlp_norm(x), "mlp_in")
    if self.moe is not None:
      # Padding (segment 0) takes no expert capacity and no part in the routing statistics.
      y, stats = self.moe(y, valid=valid)
      return constrain(x + y, ("batch", "length", "embed")), stats
    g, u = dense(y, w(self.gate)), dense(y, w(self.up))
    hidden = constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
    x = constrain(x + dense(hidden, w(self.down)), ("batch", "length", "embed"))
    return x, None

  def _self_attention(self, q, k, v, segment_ids):
    return attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True,
                     impl=self.attention_impl)  # [batch, length, heads, head_dim]

  def __call__(self, x, positions, segment_ids):
    """x: [batch, length, embed] -> (x, MoE stats of this block or None for a dense one)."""
    q, k, v = self._qkv(x, positions)
    return self._rest(x, self._self_attention(q, k, v, segment_ids), segment_ids != 0)

  def prefill(self, x, positions, segment_ids):
    """`__call__` that also returns this layer's (k, v) [batch, length, kv_heads, head_dim]."""
    q, k, v = self._qkv(x, positions)
    x, _ = self._rest(x, self._self_attention(q, k, v, segment_ids), segment_ids != 0)
    return x, (k, v)

  def step(self, x, positions, cache, lengths):
    """One new token per row: x [batch, 1, embed], positions int [batch, 1]; cache (k, v)
    [batch, max_len, kv_heads, head_dim] holding the row's earlier tokens in slots [0, lengths).
    Returns (x, the new token's (k, v) [batch, 1, kv_heads, head_dim])."""
    q, k, v = self._qkv(x, positions)
    a = decode_attention(q, k, v, *cache, lengths)
    x, _ = self._rest(x, a, jnp.ones(x.shape[:2], bool))
    return x, (k, v)


class DecoderGroup(nnx.Module):
  """`interval - 1` stacked dense blocks, then one MoE block: the scanned unit of an MoE decoder."""

  def __init__(self, cfg, moe, *, scan_unroll, rngs, **block_kw):
    self.scan_unroll = scan_unroll
    dense = moe["interval"] - 1  # with interval 1 every block is sparse: `dense` is None
    self.dense = stack_layers(lambda r: DecoderBlock(cfg, rngs=r, **block_kw), dense, rngs) if dense else None
    self.sparse = DecoderBlock(cfg, moe=moe, rngs=rngs, **block_kw)

  def __call__(self, x, positions, segment_ids):
    """-> (x, the MoE block's stats)."""
    if self.dense is not None:  # the outer scan's remat covers these too
      x, _ = scan_layers(self.dense, x, positions, segment_ids, unroll=self.scan_unroll)
    return self.sparse(x, positions, segment_ids)

  def blocks(self, x, fn, xs=None):
    """`fn(block, x, xs_l) -> (x, ys_l)` over the group's `interval` blocks in order (xs, ys:
    leading axis `interval`), for the inference passes."""
    take = lambda sl: None if xs is None else jax.tree.map(lambda a: a[sl], xs)
    ys = []
    if self.dense is not None:
      x, y = scan_blocks(self.dense, x, fn, take(slice(None, -1)), unroll=self.scan_unroll)
      ys.append(y)
    x, y = fn(self.sparse, x, take(-1))
    ys.append(jax.tree.map(lambda a: a[None], y))
    return x, jax.tree.map(lambda *a: jnp.concatenate(a), *ys)


def no_moe_aux():
  """The aux of a dense model, so a train step can always read it."""
  zero = jnp.zeros((), jnp.float32)
  return dict(moe_lb_loss=zero, moe_z_loss=zero, expert_load=jnp.zeros((0,), jnp.float32), dropped_tokens=zero)


class DecoderOutput(NamedTuple):
  """What `Decoder.decode` and `MM15.__call__` return: the same fields whatever was asked.

  logits: float32 [batch, length, vocab], or None when the caller asked for no head (the loss
    then forms them a chunk at a time from `hidden` and `Decoder.head_weight`, train/loss.py).
  hidden: the final norm's output [batch, length, embed], what the LM head reads.
  aux: dict(moe_lb_loss, moe_z_loss: means over MoE layers (alpha-free, see
    moe.finalize_stats), expert_load: [E] mean over MoE layers, dropped_tokens: over-capacity
    assignments summed over layers); zeros and an empty load for a dense model.
  """
  logits: jax.Array | None
  hidden: jax.Array
  aux: dict


class Decoder(nnx.Module):
  """Token embedding -> `n_layers` scanned DecoderBlocks -> RMSNorm -> LM head (float32 logits).

  `moe`: `config.model.moe` (None or num_experts 0: dense).
  """

  def __init__(self, config, *, dtype="float32", param_dtype="float32", remat="none",
               attention_impl="xla", scan_unroll: int = 1, moe=None, rngs: nnx.Rngs):
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
    moe = moe_settings(moe, config.mlp_dim)
    self.is_moe = moe is not None
    block_kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    if moe is None:
      self.layers = stack_layers(lambda r: DecoderBlock(config, rngs=r, **block_kw), config.n_layers, rngs)
    else:
      check_moe(moe, config.n_layers)
      self.layers = stack_layers(
          lambda r: DecoderGroup(config, moe, scan_unroll=scan_unroll, rngs=r, **block_kw),
          config.n_layers // moe["interval"], rngs)
    self.final_norm = RMSNorm(d, config.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.lm_head = None if self.tie else param(rngs, dense_init(0), (d, vocab), ("embed", "vocab"), param_dtype)

  def embed(self, tokens):
    """tokens: int [batch, length] -> [batch, length, embed] in the compute dtype."""
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
    return constrain(x, ("batch", "length", "embed"))

  def decode(self, x, positions, segment_ids, *, head=True) -> DecoderOutput:
    """x: [batch, length, embed]; positions, segment_ids: int [batch, length] -> DecoderOutput
    (logits None with head=False)."""
    x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))
    x, stats = scan_layers(self.layers, x, positions, segment_ids, remat=self.remat, unroll=self.scan_unroll)
    if stats is None:
      aux = no_moe_aux()
    else:  # each [groups, ...]
      aux = dict(moe_lb_loss=jnp.mean(stats["lb_loss"]), moe_z_loss=jnp.mean(stats["z_loss"]),
                 expert_load=jnp.mean(stats["load"], axis=0), dropped_tokens=jnp.sum(stats["dropped"]))
    hidden = self.final_norm(x)
    return DecoderOutput(logits=self.logits(hidden) if head else None, hidden=hidden, aux=aux)

  def head_weight(self):
    """The LM head [embed, vocab] in the compute dtype (the embedding's transpose when tied)."""
    if self.tie:
      return self.embedding[...].astype(self.dtype).T
    return self.lm_head[...].astype(self.dtype)

  def head(self, x):
    """Final norm and LM head: [batch, length, embed] -> float32 [batch, length, vocab]."""
    return self.logits(self.final_norm(x))

  def logits(self, hidden):
    """The LM head alone: the final norm's output [batch, length, embed] -> float32 [batch, length, vocab]."""
    logits = dense(hidden, self.head_weight(), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))

  def _blocks(self, x, fn, cache=None):
    """`fn(block, x, cache_l) -> (x, kv_l)` over every layer in order; kv stacked [n_layers, ...]."""
    if not self.is_moe:
      return scan_blocks(self.layers, x, fn, cache, unroll=self.scan_unroll)
    groups = self.layers.sparse.attn_norm.scale.shape[0]
    grouped = None if cache is None else jax.tree.map(lambda a: a.reshape((groups, -1) + a.shape[1:]), cache)
    x, kv = scan_blocks(self.layers, x, lambda group, x, c: group.blocks(x, fn, c), grouped,
                        unroll=self.scan_unroll)
    return x, jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), kv)

  def prefill(self, x, positions, segment_ids, last):
    """The prompt pass of inference: `decode` that also fills the KV cache.

    x: [batch, length, embed] (embedded, images written in); positions, segment_ids as in
    `decode`; last: int [batch], each row's last prompt token. Returns (logits float32
    [batch, vocab] at `last`, cache dict(k, v) [n_layers, batch, length, kv_heads, head_dim]).
    """
    x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))
    x, (k, v) = self._blocks(x, lambda block, x, _: block.prefill(x, positions, segment_ids))
    x = x[jnp.arange(x.shape[0]), last][:, None]  # the norm and head act per position
    return self.head(x)[:, 0], dict(k=constrain(k, CACHE_AXES), v=constrain(v, CACHE_AXES))

  def step(self, x, positions, cache, lengths):
    """One decoding step: x [batch, 1, embed] (the newest token), positions int [batch, 1];
    cache dict(k, v) [n_layers, batch, max_len, kv_heads, head_dim], slots [0, lengths) filled.
    Returns (logits float32 [batch, vocab], the cache with this token written at slot `lengths`).
    Shapes are static: nothing recompiles per step."""
    x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))
    x, (k, v) = self._blocks(x, lambda block, x, c: block.step(x, positions, c, lengths), (cache["k"], cache["v"]))
    rows = jnp.arange(x.shape[0])
    cache = {name: constrain(cache[name].at[:, rows, lengths].set(new[:, :, 0]), CACHE_AXES)
             for name, new in (("k", k), ("v", v))}
    return self.head(x)[:, 0], cache

  def __call__(self, tokens, positions, segment_ids, *, head=True) -> DecoderOutput:
    return self.decode(self.embed(tokens), positions, segment_ids, head=head)


def upcycle_decoder_params(dense: dict, moe: dict, noise: float = 0.0, key=None) -> dict:
  """Pure-dict params of a trained dense Decoder -> an MoE Decoder's, every expert a copy of its layer's FFN.

  `moe` is a freshly initialised MoE Decoder's pure dict (structure, and the router init kept).
  Dense layer l goes to group l // interval: position l % interval < interval - 1 to `dense`, the
  last to `sparse`. With identical experts and renormalised top-k (k > 1) weights the upcycled
  model computes exactly what the dense one did.
  """
  sparse_init = moe["layers"]["sparse"]
  num_experts = sparse_init["moe"]["router"].shape[-1]
  groups = sparse_init["moe"]["router"].shape[0]
  split = jax.tree.map(lambda a: a.reshape((groups, -1) + a.shape[1:]), dense["layers"])  # [G, interval, ...]
  last = jax.tree.map(lambda a: a[:, -1], split)
  ffn = {k: last.pop(k) for k in ("gate", "up", "down")}
  layers = dict(sparse=dict(last, moe=dict(router=sparse_init["moe"]["router"],
                                           **upcycle_dense_mlp(**ffn, num_experts=num_experts, noise=noise, key=key))))
  if "dense" in moe["layers"]:
    layers["dense"] = jax.tree.map(lambda a: a[:, :-1], split)
  return dict(dense, layers=layers)
