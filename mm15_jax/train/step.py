"""The jitted train and eval steps: pure functions of (state, batch).

Nothing here does Python work that depends on data, so one compile serves the whole run.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mm15_jax import sharding as shd
from mm15_jax.batch import MODEL_INPUTS
from mm15_jax.train import optimizer as opt_lib
from mm15_jax.train.loss import chunked_token_terms, fused_cross_entropy, masked_cross_entropy, token_terms
from mm15_jax.train.state import TrainSetup


def loss_chunk(config, length: int) -> int:
  """Positions per LM-head chunk (train.loss_chunk, at most the sequence `length`); 0: whole logits."""
  return min(config.train.loss_chunk, length)


def _forward_sums(setup: TrainSetup, params, batch):
  """(objective_sum, aux) for one (micro)batch; sums, not means, so accumulation is exact.

  MoE auxiliary losses are per-batch means; weighted by the batch's token count they enter
  the sum like the cross-entropy does, so the final objective is mean CE + weighted aux.
  """
  model = nnx.merge(setup.graphdef, params, setup.rest)
  chunk = loss_chunk(setup.config, batch["tokens"].shape[1])
  out = model(*(batch[k] for k in MODEL_INPUTS), head=not chunk)
  moe_aux = out.aux
  if chunk:
    objective, loss_sum, z_sum, correct = fused_cross_entropy(
        out.hidden, model.llm.head_weight(), batch["targets"], batch["loss_mask"], setup.config.train.z_loss, chunk)
  else:
    loss_sum, z_sum, correct = masked_cross_entropy(
        out.logits, batch["targets"], batch["loss_mask"], setup.config.train.z_loss)
    objective = loss_sum + z_sum
  count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
  moe = setup.config.model.moe
  moe_objective = count * (moe.lb_loss_weight * moe_aux["moe_lb_loss"] + moe.z_loss_weight * moe_aux["moe_z_loss"])
  aux = dict(loss_sum=loss_sum, z_sum=z_sum, correct=correct, count=count,
             moe_lb_sum=count * moe_aux["moe_lb_loss"], moe_z_sum=count * moe_aux["moe_z_loss"],
             expert_load_sum=count * moe_aux["expert_load"], dropped_tokens=moe_aux["dropped_tokens"])
  return objective + moe_objective, aux


def _freeze(setup: TrainSetup, params):
  """Frozen components get no gradient, so their backward pass is never computed."""
  trainable = opt_lib.trainable_components(setup.config.train)
  return {k: (v if k in trainable else jax.lax.stop_gradient(v)) for k, v in params.items()}


def _split_microbatches(batch, accum: int):
  """[B, ...] -> [accum, B/accum, ...], each device keeping its own rows."""
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // accum, accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def loss_and_grads(setup: TrainSetup, params: dict, batch: dict):
  """Mean loss over loss-masked tokens, its gradients, and sums; exact under accumulation."""
  grad_fn = jax.value_and_grad(
      lambda p, b: _forward_sums(setup, _freeze(setup, p), b), has_aux=True)
  accum = setup.config.train.grad_accum
  if accum == 1:
    (_, aux), grads = grad_fn(params, batch)
  else:
    micro = _split_microbatches(batch, accum)

    def body(carry, mb):
      mb = jax.tree.map(lambda x: shd.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
      (_, aux), g = grad_fn(params, mb)
      return jax.tree.map(jnp.add, carry, (g, aux)), None

    first = jax.tree.map(lambda x: x[0], micro)
    aux_shapes = jax.eval_shape(lambda p, b: grad_fn(p, b)[0][1], params, first)
    zeros = jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shapes)
    (grads, aux), _ = jax.lax.scan(body, zeros, micro)
  count = jnp.maximum(aux["count"], 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  return aux["loss_sum"] / count, aux, grads


def train_step(setup: TrainSetup, state: dict, batch: dict):
  config = setup.config
  params = state["params"]
  loss, aux, grads = loss_and_grads(setup, params, batch)
  count = jnp.maximum(aux["count"], 1.0)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  updates, new_opt_state = setup.tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  # A non-finite step never reaches the weights; the loop stops or skips by config.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = dict(
      step=state["step"] + 1,
      params=keep(new_params, params),
      opt_state=keep(new_opt_state, state["opt_state"]),
      rng=state["rng"],
  )
  metrics = dict(
      loss=loss,
      z_loss=aux["z_sum"] / count,
      accuracy=aux["correct"] / count,
      grad_norm=grad_norm,
      lr=opt_lib.learning_rate_schedule(config.train)(state["step"]),
      loss_tokens=aux["count"],
      finite=finite,
  )
  if config.model.moe.num_experts:
    metrics.update(
        moe_lb_loss=aux["moe_lb_sum"] / count, moe_z_loss=aux["moe_z_sum"] / count,
        expert_load=aux["expert_load_sum"] / count, dropped_tokens=aux["dropped_tokens"])
  return new_state, metrics


def eval_step(setup: TrainSetup, params: dict, batch: dict):
  """Sums for loss, token accuracy and exact match of each example's whole answer.

  Exact match under teacher forcing equals greedy-decoding correctness: every trained token
  is the argmax given the correct prefix. Examples are the packed segments of each row.
  """
  model = nnx.merge(setup.graphdef, params, setup.rest)
  chunk = loss_chunk(setup.config, batch["tokens"].shape[1])
  out = model(*(batch[k] for k in MODEL_INPUTS), head=not chunk)
  if chunk:
    nll, _, hit = chunked_token_terms(out.hidden, model.llm.head_weight(), batch["targets"], chunk)
  else:
    nll, _, hit = token_terms(out.logits, batch["targets"])
  mask = batch["loss_mask"] > 0
  loss_sum, correct = jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(jnp.where(mask, hit, 0.0))
  wrong = (hit == 0) & mask
  b, length = mask.shape
  # One id per (row, segment): segment ids are < length + 1.
  ids = (jnp.arange(b)[:, None] * (length + 1) + batch["segment_ids"]).reshape(-1)
  n = b * (length + 1)
  trained = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.int32), ids, num_segments=n)
  errors = jax.ops.segment_sum(wrong.reshape(-1).astype(jnp.int32), ids, num_segments=n)
  examples = trained > 0
  exact = jnp.sum(examples & (errors == 0))
  return dict(loss_sum=loss_sum, correct=correct, count=jnp.sum(mask), exact=exact, examples=jnp.sum(examples))


def _with_rules(setup: TrainSetup, fn):
  """Activation sharding constraints resolve against this run's mesh and rules at trace time."""
  def wrapped(*args):
    with shd.use_rules(setup.mesh, setup.config.sharding_rules):
      return fn(setup, *args)
  return wrapped


def jit_train_step(setup: TrainSetup):
  """State in and out keeps its shardings; batches arrive already placed (loop.py)."""
  return jax.jit(
      _with_rules(setup, train_step),
      out_shardings=(setup.state_shardings, None),
      donate_argnums=(0,),
  )


def jit_loss_and_grads(setup: TrainSetup):
  return jax.jit(_with_rules(setup, loss_and_grads))


def jit_eval_step(setup: TrainSetup):
  return jax.jit(_with_rules(setup, eval_step))
