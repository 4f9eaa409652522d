"""Next-token cross-entropy over loss-masked positions, with optional z-loss."""

import jax
import jax.numpy as jnp


def masked_cross_entropy(logits, targets, loss_mask, z_loss: float = 0.0):
  """Sums over masked positions; the caller divides by the token count.

  logits: [batch, length, vocab] (float32), targets: [batch, length] int,
  loss_mask: [batch, length]. Returns (loss_sum, z_loss_sum, correct_sum).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  mask = loss_mask.astype(jnp.float32)
  z_term = z_loss * jnp.square(log_z)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(z_term * mask), jnp.sum(correct * mask)
