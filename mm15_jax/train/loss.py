"""Next-token cross-entropy over loss-masked positions, with optional z-loss.

Two ways to the same sums:
  masked_cross_entropy(logits, ...)          from whole float32 logits [batch, length, vocab];
  fused_cross_entropy(hidden, head, ...)     from the LM head's input and weight, `chunk`
      positions at a time. Each chunk's logits live only inside its loop iteration, and its
      gradients (to the hidden state and the head weight) are formed right there from the
      softmax, so the backward pass needs no logits either: the [batch, length, vocab] array
      (20 GB in float32 for 8 x 4096 tokens of a 150k vocabulary) never exists, and no matmul
      is recomputed.
"""

import functools

import jax
import jax.numpy as jnp

from mm15_jax.sharding import constrain


def token_terms(logits, targets):
  """Per position: (nll, log_z, correct) float32 [batch, length] of float32 logits."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return log_z - target_logit, log_z, correct


def masked_cross_entropy(logits, targets, loss_mask, z_loss: float = 0.0):
  """Sums over masked positions; the caller divides by the token count.

  logits: [batch, length, vocab] (float32), targets: [batch, length] int,
  loss_mask: [batch, length]. Returns (loss_sum, z_loss_sum, correct_sum).
  """
  nll, log_z, correct = token_terms(logits, targets)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(z_loss * jnp.square(log_z) * mask), jnp.sum(correct * mask)


def _chunks(x, chunk: int):
  """[batch, length, ...] -> [length / chunk, batch, chunk, ...] (the batch axis keeps its sharding)."""
  b, length = x.shape[:2]
  return jnp.swapaxes(x.reshape((b, length // chunk, chunk) + x.shape[2:]), 0, 1)


def _logits(h, head):
  """One chunk's float32 logits, sharded as the LM head's are (vocab over the tensor axis)."""
  return constrain(jnp.einsum("bcd,dv->bcv", h, head, preferred_element_type=jnp.float32),
                   ("batch", "length", "vocab"))


def chunked_token_terms(hidden, head, targets, chunk: int):
  """token_terms(hidden @ head) computed `chunk` positions at a time (no gradient: evaluation)."""
  b, length = targets.shape
  terms = jax.lax.map(lambda args: token_terms(_logits(args[0], head), args[1]),
                      (_chunks(hidden, chunk), _chunks(targets, chunk)))
  return tuple(jnp.swapaxes(t, 0, 1).reshape(b, length) for t in terms)


def fused_cross_entropy(hidden, head, targets, loss_mask, z_loss: float, chunk: int):
  """masked_cross_entropy(hidden @ head, targets, loss_mask, z_loss), `chunk` positions at a time.

  hidden: [batch, length, embed] (the final norm's output, compute dtype); head: [embed, vocab]
  (compute dtype); the matmul accumulates in float32 as the LM head does. length % chunk == 0.
  Returns (objective, loss_sum, z_loss_sum, correct_sum): objective = loss_sum + z_loss_sum
  carries the gradients (to hidden and head); the three sums are for logging only.
  """
  objective, sums = _fused(hidden, head, targets, loss_mask, float(z_loss), int(chunk))
  return (objective, *jax.lax.stop_gradient(sums))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(hidden, head, targets, loss_mask, z_loss, chunk):
  return _fused_forward(hidden, head, targets, loss_mask, z_loss, chunk)[0]


def _fused_forward(hidden, head, targets, loss_mask, z_loss, chunk):
  """(objective, sums) and, per chunk, d(objective)/d(logits) folded into the hidden state's and
  the head's gradients right away (for a unit cotangent; the backward pass scales them)."""
  mask = loss_mask.astype(jnp.float32)

  def body(d_head, args):
    h, t, m = args
    logits = _logits(h, head)
    nll, log_z, correct = token_terms(logits, t)
    # d/dlogits of m * (nll + z * log_z^2) = m * ((1 + 2 z log_z) softmax - onehot(t)).
    probs = jnp.exp(logits - log_z[..., None])
    d_logits = (m * (1 + 2 * z_loss * log_z))[..., None] * probs
    d_logits = (d_logits - m[..., None] * jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32)).astype(head.dtype)
    d_h = jnp.einsum("bcv,dv->bcd", d_logits, head, preferred_element_type=jnp.float32).astype(h.dtype)
    d_head = d_head + jnp.einsum("bcd,bcv->dv", h, d_logits, preferred_element_type=jnp.float32)
    sums = jnp.stack([jnp.sum(nll * m), jnp.sum(z_loss * jnp.square(log_z) * m), jnp.sum(correct * m)])
    return d_head, (sums, d_h)

  d_head, (sums, d_h) = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32),
                                     (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(mask, chunk)))
  d_hidden = jnp.swapaxes(d_h, 0, 1).reshape(hidden.shape)
  sums = jnp.sum(sums, axis=0)
  return (sums[0] + sums[1], sums), (d_hidden, d_head.astype(head.dtype))


def _fused_bwd(z_loss, chunk, residuals, cotangents):
  del z_loss, chunk
  d_hidden, d_head = residuals
  g = cotangents[0]  # the sums' cotangents are zero: fused_cross_entropy stops their gradient
  return (g * d_hidden).astype(d_hidden.dtype), (g * d_head).astype(d_head.dtype), None, None


_fused.defvjp(_fused_forward, _fused_bwd)
