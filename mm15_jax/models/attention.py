"""Multi-head attention with grouped KV heads and packed segments: one function, three backends.

`config.model.attention_impl` picks the backend:
  "xla"    einsum reference, float32 softmax; any device (the default, and what tests compare to)
  "cudnn"  cuDNN flash attention through `jax.nn.dot_product_attention`; GPU, bf16/fp16 inputs
  "splash" Pallas splash attention; TPU

Segment ids pack several examples into one row: a query attends only to keys with the same
segment id (and, if causal, at an index <= its own). Segment id 0 is padding: those query rows
attend to nothing and return zeros, in every backend.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mm15_jax import modes

_PLATFORM = {modes.AttentionImpl.CUDNN: "gpu", modes.AttentionImpl.SPLASH: "tpu"}


def check_impl(impl: str, platform: bool = True) -> modes.AttentionImpl:
  """The backend `impl` names; a clear error for an unknown one or (if `platform`) one this
  platform cannot run ('xla' runs everywhere)."""
  impl = modes.parse(modes.AttentionImpl, impl)
  if not platform:
    return impl
  need = _PLATFORM.get(impl)
  platform = jax.default_backend()
  if need is not None and platform != need:
    raise ValueError(f"config.model.attention_impl={impl.value!r} needs a {need.upper()} but the backend is "
                     f"{platform!r}; use --config.model.attention_impl=xla "
                     f"(or {'splash' if platform == 'tpu' else 'cudnn'} on {platform})")
  return impl


def attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal=True, impl="xla"):
  """Scaled dot-product attention.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] with
  heads % kv_heads == 0. Segment ids: int [batch, q_len] / [batch, kv_len], 0 = padding.
  Causality compares indices within the arrays (self-attention: q_len == kv_len).
  Returns [batch, q_len, heads, head_dim] in q.dtype.
  """
  heads, kv_heads = q.shape[2], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"attention: {heads} query heads do not split into {kv_heads} KV heads; "
                     "set config.model.llm.n_heads to a multiple of n_kv_heads")
  impl = check_impl(impl)
  if impl == modes.AttentionImpl.XLA:
    out = _xla(q, k, v, q_segment_ids, kv_segment_ids, causal)
  elif impl == modes.AttentionImpl.CUDNN:
    out = _cudnn(q, k, v, q_segment_ids, kv_segment_ids, causal)
  else:
    out = _splash(q, k, v, q_segment_ids, kv_segment_ids, causal)
  # Padding rows: zeros, whatever the backend computed for them.
  return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


def _mask(q_segment_ids, kv_segment_ids, causal):
  """mask: bool [batch, q_len, kv_len], True where the query may attend to the key."""
  mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] != 0)
  if causal:
    q_len, kv_len = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    mask &= jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :]
  return mask


def _xla(q, k, v, q_segment_ids, kv_segment_ids, causal):
  b, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  # Group query heads by the KV head they share: q: [batch, q_len, kv_heads, group, head_dim].
  q = q.reshape(b, q_len, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
  logits *= 1.0 / np.sqrt(head_dim)
  mask = _mask(q_segment_ids, kv_segment_ids, causal)[:, None, None]
  # A large finite value, not -inf: fully masked rows stay finite (softmax goes uniform).
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, q_len, heads, head_dim)


def decode_attention(q, k, v, cache_k, cache_v, lengths):
  """One new query per row against a KV cache and its own key (incremental decoding).

  q: [batch, 1, heads, head_dim]; k, v: [batch, 1, kv_heads, head_dim] of the new token;
  cache_k, cache_v: [batch, max_len, kv_heads, head_dim] with the row's earlier tokens in slots
  [0, lengths) (int [batch]); later slots are ignored. The einsum path on every backend: a
  single query row gains nothing from a flash kernel. Returns [batch, 1, heads, head_dim].
  """
  b, _, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, 1, kv_heads, heads // kv_heads, head_dim)
  scale = 1.0 / np.sqrt(head_dim)
  past = jnp.einsum("bqkgd,bskd->bkgqs", q, cache_k, preferred_element_type=jnp.float32) * scale
  own = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  filled = jnp.arange(cache_k.shape[1])[None, :] < lengths[:, None]  # [batch, max_len]
  past = jnp.where(filled[:, None, None, None], past, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(jnp.concatenate([past, own], axis=-1), axis=-1).astype(v.dtype)
  out = (jnp.einsum("bkgqs,bskd->bqkgd", probs[..., :-1], cache_v, preferred_element_type=jnp.float32)
         + jnp.einsum("bkgqs,bskd->bqkgd", probs[..., -1:], v, preferred_element_type=jnp.float32))
  return out.reshape(b, 1, heads, head_dim).astype(q.dtype)


def _pad_lengths(q, k, v, q_segment_ids, kv_segment_ids, multiple):
  """Pads q_len and kv_len up to a multiple with segment id 0 (padding attends to nothing)."""
  pq, pkv = -q.shape[1] % multiple, -k.shape[1] % multiple
  pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))
  return pad(q, pq), pad(k, pkv), pad(v, pkv), pad(q_segment_ids, pq), pad(kv_segment_ids, pkv)


def _cudnn(q, k, v, q_segment_ids, kv_segment_ids, causal):
  # cuDNN takes causality as a flag (it skips the upper blocks) and the segment mask as a
  # boolean [batch, 1, q_len, kv_len] mask broadcast over heads. Its training kernels with a
  # mask need even lengths (the ViT's 1 + 27*27 = 730 tokens are, 1 + 4*4 are not): pad to 64.
  q_len = q.shape[1]
  q, k, v, q_segment_ids, kv_segment_ids = _pad_lengths(q, k, v, q_segment_ids, kv_segment_ids, 64)
  mask = _mask(q_segment_ids, kv_segment_ids, causal=False)[:, None]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
  return out[:, :q_len]


def _splash(q, k, v, q_segment_ids, kv_segment_ids, causal, interpret=False):
  """Pallas splash attention (TPU); `interpret=True` runs the kernel on CPU for tests."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU-only module path

  b, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  # The kernel works in blocks: pad both lengths to a block multiple with segment id 0.
  block = 512 if max(q_len, kv_len) >= 512 else 128
  q, k, v, q_segment_ids, kv_segment_ids = _pad_lengths(q, k, v, q_segment_ids, kv_segment_ids, block)
  shape = (q.shape[1], k.shape[1])
  group = heads // kv_heads
  head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mqa_single_device(
      splash.MultiHeadMask([head_mask] * group), block_sizes=sizes, interpret=interpret)

  # The kernel does not scale q; it takes one example and one KV head (MQA) at a time:
  # q: [group, q_len, head_dim], k, v: [kv_len, head_dim].
  q = (q * (1.0 / np.sqrt(head_dim))).astype(q.dtype)
  q = q.reshape(b, shape[0], kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def one(q, k, v, qs, kvs):
    segments = splash.SegmentIds(q=qs, kv=kvs)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q, k, v)

  out = jax.vmap(one)(q, k, v, q_segment_ids, kv_segment_ids)  # [b, kv_heads, group, q, d]
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, shape[0], heads, head_dim)
  return out[:, :q_len]


splash_interpret = functools.partial(_splash, interpret=True)  # for CPU tests of the TPU path
