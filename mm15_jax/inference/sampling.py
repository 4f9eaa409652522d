"""Next-token choice: greedy, temperature, top-p (nucleus); runs inside the jitted steps."""

import jax
import jax.numpy as jnp


def step_key(seed, index):
  """The random key of decoding step `index` (0: the token sampled after the prompt)."""
  return jax.random.fold_in(jax.random.key(seed), index)


def sample(logits, key, temperature, top_p):
  """logits float32 [batch, vocab] -> int32 [batch].

  temperature 0: argmax. Otherwise a draw from softmax(logits / temperature) restricted to
  the nucleus: the most likely tokens, in order, until their mass reaches top_p (the most
  likely one always stays, so top_p -> 0 is greedy). Every row draws with the same key, so a
  row's answer does not depend on its batch mates. temperature and top_p may be traced.
  """
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
  keep = (before < top_p) | (jnp.arange(ordered.shape[-1]) == 0)
  threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
  nucleus = jnp.where(scaled >= threshold, scaled, -jnp.inf)
  drawn = jax.vmap(lambda row: jax.random.categorical(key, row))(nucleus)
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
