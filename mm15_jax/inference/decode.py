"""Batched generation with a KV cache: a jitted prefill, a jitted one-token step, a host loop.

prefill: the prompts (images scattered in, as in training) -> the first sampled token and
  the cache dict(k, v) [n_layers, batch, max_len, kv_heads, head_dim] (slots past a row's
  prompt are padding, overwritten as it decodes).
step: one token per row at slot/position `lengths` -> the next token; the cache is donated
  and updated in place.
Both are compiled once per (batch, prompt bucket, max_len) and run under the mesh and the
logical-axis rules, so activations and the cache shard like training (batch over the data
axes, KV heads over tensor). The host loop stops a row at a stop token or string and the
batch when every row has stopped or max_new_tokens is reached.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm15_jax import sharding as shd
from mm15_jax.inference.sampling import sample, step_key
from mm15_jax.models.llm import CACHE_AXES

PROMPT_INPUTS = ("tokens", "positions", "segment_ids", "images", "image_token_positions", "last")


def jit_prefill(graphdef, rest, mesh, rules):
  def prefill(params, batch, seed, temperature, top_p, *, max_len):
    with shd.use_rules(mesh, rules):
      model = nnx.merge(graphdef, params, rest)
      logits, cache = model.prefill(*(batch[k] for k in PROMPT_INPUTS))
      pad = [(0, 0), (0, 0), (0, max_len - batch["tokens"].shape[1]), (0, 0), (0, 0)]
      cache = {name: shd.constrain(jnp.pad(c, pad), CACHE_AXES) for name, c in cache.items()}
      return sample(logits, step_key(seed, 0), temperature, top_p), logits, cache
  return jax.jit(prefill, static_argnames="max_len")


def jit_step(graphdef, rest, mesh, rules):
  def step(params, cache, tokens, lengths, seed, index, temperature, top_p):
    with shd.use_rules(mesh, rules):
      model = nnx.merge(graphdef, params, rest)
      # A row's next token sits at position = slot = its length so far (rows are left-aligned).
      logits, cache = model.step(tokens, lengths, cache, lengths)
      return sample(logits, step_key(seed, index), temperature, top_p), logits, cache, lengths + 1
  return jax.jit(step, donate_argnums=(1,))


def jit_forward(graphdef, rest, mesh, rules):
  """The training forward (no cache): logits [batch, length, vocab]."""
  def forward(params, batch):
    with shd.use_rules(mesh, rules):
      model = nnx.merge(graphdef, params, rest)
      return model(*(batch[k] for k in ("tokens", "positions", "segment_ids", "images", "image_token_positions")))
  return jax.jit(forward)


def generate_ids(prefill, step, params, batch, n: int, *, max_len: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int, stop_ids, stop_strings=(), decode=None, with_logits: bool = False):
  """Generated ids of the first `n` rows of `batch` (placed on devices; prompt.batch_arrays'
  fields), each ending before its first stop id, or at the token that completed a stop string
  (`decode(ids) -> str` checks). With `with_logits`, also each row's logits [steps, vocab]
  that chose its tokens (the stop token's step included)."""
  scalars = (np.int32(seed), np.float32(temperature), np.float32(top_p))
  token, logits, cache = prefill(params, batch, *scalars, max_len=max_len)
  lengths = batch["lengths"]
  ids, done, seen = [[] for _ in range(n)], np.zeros(n, bool), [[] for _ in range(n)]
  stop_ids = set(int(i) for i in stop_ids)
  for i in range(max_new_tokens):
    chosen = np.asarray(token)[:n]
    step_logits = np.asarray(logits)[:n] if with_logits else None
    for r in np.flatnonzero(~done):
      if with_logits:
        seen[r].append(step_logits[r])
      if int(chosen[r]) in stop_ids:
        done[r] = True
        continue
      ids[r].append(int(chosen[r]))
      if stop_strings and any(s in decode(ids[r]) for s in stop_strings):
        done[r] = True
    if done.all() or i + 1 == max_new_tokens:
      break
    token, logits, cache, lengths = step(params, cache, token, lengths, scalars[0], np.int32(i + 1), *scalars[1:])
  if with_logits:
    return ids, [np.stack(s) for s in seen]
  return ids
