"""Batched generation with a KV cache: a jitted prefill, jitted runs of decoding steps, a host loop.

prefill: the prompts (images scattered in, as in training) -> the first sampled token and
  the cache dict(k, v) [n_layers, batch, max_len, kv_heads, head_dim] (slots past a row's
  prompt are padding, overwritten as it decodes).
steps: STEPS_PER_CALL tokens per row, from slot/position `lengths` on, in one call (a scan on
  the device): the host waits for the device once per run, not once per token. The cache is
  donated and updated in place.
Both are compiled once per (batch, prompt bucket, max_len) and run under the mesh and the
logical-axis rules, so activations and the cache shard like training (batch over the data
axes, KV heads over tensor); the rules are lenient (sharding.use_rules): an activation that does
not divide over its mesh axes, e.g. a batch of one, is left to the compiler rather than refused.
The host loop stops a row at a stop token or string and the batch when every row has stopped
or max_new_tokens is reached; the tokens a run computed past that are dropped. Step i draws
with the key of step i however the steps are grouped into runs, so the answers do not depend
on STEPS_PER_CALL.

Several processes (jax.distributed): every process runs the same host loop on the same global
prompt batch; the tokens of each run are gathered so that every process reads all rows and
takes the same stop decisions (the same device calls, in the same order, everywhere).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm15_jax import distributed
from mm15_jax import sharding as shd
from mm15_jax.batch import MODEL_INPUTS
from mm15_jax.inference.sampling import sample, step_key
from mm15_jax.models.llm import CACHE_AXES

PROMPT_INPUTS = (*MODEL_INPUTS, "last")
STEPS_PER_CALL = 8  # decoding steps per device call: fewer host round trips, at most 7 wasted steps


def jit_prefill(graphdef, rest, mesh, rules):
  def prefill(params, batch, seed, temperature, top_p, *, max_len):
    with shd.use_rules(mesh, rules, lenient=True):
      model = nnx.merge(graphdef, params, rest)
      logits, cache = model.prefill(*(batch[k] for k in PROMPT_INPUTS))
      pad = [(0, 0), (0, 0), (0, max_len - batch["tokens"].shape[1]), (0, 0), (0, 0)]
      cache = {name: shd.constrain(jnp.pad(c, pad), CACHE_AXES) for name, c in cache.items()}
      return sample(logits, step_key(seed, 0), temperature, top_p), logits, cache
  return jax.jit(prefill, static_argnames="max_len")


def jit_steps(graphdef, rest, mesh, rules, count: int = STEPS_PER_CALL):
  """`count` decoding steps from `tokens` (the last sampled) -> (tokens [count, batch], logits
  [count, batch, vocab] or None, cache, lengths); step j of the run is decoding step index + j."""
  def steps(params, cache, tokens, lengths, seed, index, temperature, top_p, *, with_logits):
    with shd.use_rules(mesh, rules, lenient=True):
      model = nnx.merge(graphdef, params, rest)

      def one(carry, j):
        tokens, cache, lengths = carry
        # A row's next token sits at position = slot = its length so far (rows are left-aligned).
        logits, cache = model.step(tokens, lengths, cache, lengths)
        tokens = sample(logits, step_key(seed, index + j), temperature, top_p)
        return (tokens, cache, lengths + 1), (tokens, logits if with_logits else None)

      (_, cache, lengths), (chosen, logits) = jax.lax.scan(one, (tokens, cache, lengths), jnp.arange(count))
      return chosen, logits, cache, lengths
  return jax.jit(steps, donate_argnums=(1,), static_argnames="with_logits")


def jit_forward(graphdef, rest, mesh, rules):
  """The training forward (no cache): logits [batch, length, vocab]."""
  def forward(params, batch):
    with shd.use_rules(mesh, rules, lenient=True):
      model = nnx.merge(graphdef, params, rest)
      return model(*(batch[k] for k in MODEL_INPUTS)).logits
  return jax.jit(forward)


def cache_length(prompt_length: int, max_new_tokens: int, count: int = STEPS_PER_CALL) -> int:
  """KV slots a generation needs: the prompt, the new tokens, and the rest of the last run's steps."""
  return prompt_length + -(-max_new_tokens // count) * count


def generate_ids(prefill, steps, params, batch, n: int, *, max_len: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int, stop_ids, stop_strings=(), decode=None, with_logits: bool = False):
  """Generated ids of the first `n` rows of `batch` (placed on devices; prompt.batch_arrays'
  fields), each ending before its first stop id, or at the token that completed a stop string
  (`decode(ids) -> str` checks). With `with_logits`, also each row's logits [steps, vocab]
  that chose its tokens (the stop token's step included). `steps` is a `jit_steps` function;
  max_len at least `cache_length`."""
  scalars = (np.int32(seed), np.float32(temperature), np.float32(top_p))
  token, logits, cache = prefill(params, batch, *scalars, max_len=max_len)
  lengths = batch["lengths"]
  ids, done, seen = [[] for _ in range(n)], np.zeros(n, bool), [[] for _ in range(n)]
  stop_ids = set(int(i) for i in stop_ids)
  run_tokens = distributed.host_value(token)[None, :n]
  run_logits = distributed.host_value(logits)[None, :n] if with_logits else None
  i = 0  # decoding step index: 0 is the token the prefill chose
  while True:
    for j in range(len(run_tokens)):
      for r in np.flatnonzero(~done):
        if with_logits:
          seen[r].append(run_logits[j, r])
        if int(run_tokens[j, r]) in stop_ids:
          done[r] = True
          continue
        ids[r].append(int(run_tokens[j, r]))
        if stop_strings and any(s in decode(ids[r]) for s in stop_strings):
          done[r] = True
      i += 1
      if done.all() or i == max_new_tokens:
        return (ids, [np.stack(s) for s in seen]) if with_logits else ids
    chosen, logits, cache, lengths = steps(params, cache, token, lengths, scalars[0], np.int32(i), *scalars[1:],
                                           with_logits=with_logits)
    token = chosen[-1]
    run_tokens = distributed.host_value(chosen)[:, :n]  # the one wait for the device per run
    run_logits = distributed.host_value(logits)[:, :n] if with_logits else None
