"""AdamW with warmup + cosine decay, global-norm clipping, decay masks, frozen parts."""

import jax
import optax

from mm15_jax import modes
from mm15_jax.models.build import is_axes

COMPONENTS = modes.values(modes.Component)  # the model's parts, as its param tree names them


def learning_rate_schedule(train_config) -> optax.Schedule:
  t = train_config
  warmup = min(t.warmup_steps, max(t.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=t.lr,
      warmup_steps=warmup,
      decay_steps=max(t.steps, warmup + 1),
      end_value=t.lr * t.lr_min_ratio,
  )


def trainable_components(train_config) -> tuple[modes.Component, ...]:
  """config.train.trainable: "all" or a comma list of modes.Component values."""
  spec = train_config.trainable
  if spec == "all":
    return tuple(modes.Component)
  names = tuple(n.strip() for n in spec.split(",") if n.strip())
  unknown = [n for n in names if n not in COMPONENTS]
  if unknown or not names:
    raise ValueError(
        f"config.train.trainable={spec!r}: unknown parts {unknown}; use 'all' or a comma list of {COMPONENTS}")
  return tuple(map(modes.Component, names))


def decay_mask(logical_axes: dict) -> dict:
  """Weight decay on weight matrices only: not on norms' scales, nor on biases (vectors, or
  [heads, head_dim] for the decoder's q/k/v biases)."""
  def is_matrix(path, names):
    name = str(getattr(path[-1], "key", path[-1]))
    return not name.endswith("bias") and len([n for n in names if n != "layers"]) >= 2
  return jax.tree_util.tree_map_with_path(is_matrix, logical_axes, is_leaf=is_axes)


def _decay_mask_fn(logical_axes: dict):
  """The mask as a function of the params it is given, which may have frozen parts masked out."""
  by_path = {
      tuple(k.key for k in path): m
      for path, m in jax.tree_util.tree_leaves_with_path(decay_mask(logical_axes))
  }
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: by_path[tuple(k.key for k in path)], params)


def make_optimizer(train_config, logical_axes: dict) -> optax.GradientTransformation:
  """The optimizer over the params' pure dict; `logical_axes` has the same structure."""
  t = train_config
  adamw = optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(
          learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
          weight_decay=t.weight_decay, mask=_decay_mask_fn(logical_axes)),
  )
  trainable = trainable_components(t)
  if set(trainable) == set(logical_axes):
    return adamw
  # Frozen parts keep no optimizer state and get no update.
  labels = {k: ("train" if k in trainable else "frozen") for k in logical_axes}
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
