"""Checks a config against the devices and the data before anything compiles.

Each error names the field, the values, and a fix.
"""

import math

from mm15_jax import hardware_rules
from mm15_jax import sharding as shd


def check_config(config, mesh=None, tokenizer=None) -> None:
  m, t = config.model, config.train
  llm, vit = m.llm, m.vit
  errors = []
  if llm.n_heads % llm.n_kv_heads:
    errors.append(f"model.llm.n_heads={llm.n_heads} is not a multiple of model.llm.n_kv_heads={llm.n_kv_heads}")
  if vit.image_size % vit.patch_size:
    errors.append(f"model.vit.image_size={vit.image_size} is not a multiple of model.vit.patch_size={vit.patch_size}")
  if vit.width % vit.heads:
    errors.append(f"model.vit.width={vit.width} is not a multiple of model.vit.heads={vit.heads}")
  k = m.connector.tokens_per_tile
  if math.isqrt(k) ** 2 != k:
    errors.append(f"model.connector.tokens_per_tile={k} must be a square (pooled to a sqrt x sqrt grid), e.g. 144")
  elif math.isqrt(k) > vit.image_size // vit.patch_size:
    errors.append(f"model.connector.tokens_per_tile={k} exceeds the {vit.image_size // vit.patch_size}^2 patch grid")
  if m.remat not in ("none", "full", "dots"):
    errors.append(f"model.remat={m.remat!r}: use 'none', 'full' or 'dots'")
  if m.attention_impl not in ("xla", "cudnn", "splash"):
    errors.append(f"model.attention_impl={m.attention_impl!r}: use 'xla', 'cudnn' or 'splash'")
  if t.grad_accum < 1 or t.batch_size % t.grad_accum:
    errors.append(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  chunk = t.get("loss_chunk", 0)
  if chunk < 0 or (0 < chunk < config.data.seq_len and config.data.seq_len % chunk):
    errors.append(f"train.loss_chunk={chunk} must be 0 (whole logits), >= data.seq_len={config.data.seq_len} or "
                  f"divide it, e.g. {math.gcd(config.data.seq_len, chunk)}")
  if t.nan_policy not in ("stop", "skip"):
    errors.append(f"train.nan_policy={t.nan_policy!r}: use 'stop' or 'skip'")
  try:
    shd.dcn_sizes(config.get("mesh_dcn"))
  except ValueError as e:
    errors.append(str(e))
  errors += hardware_rules.rule_errors(config)  # every rule, not only the one this hardware matches
  if mesh is not None:
    spec = shd.logical_to_mesh(("batch",), config.sharding_rules, mesh)
    n = shd.axis_size(spec[0], mesh)
    micro = t.batch_size // max(t.grad_accum, 1)
    if micro % n:
      errors.append(
          f"train.batch_size / train.grad_accum = {micro} sequences per micro-batch do not split over the "
          f"{n} batch shards of mesh {dict(mesh.shape)}; use a multiple of {n}")
  # A tokenizer file may have fewer pieces than the embedding has rows (padded tables);
  # the built-in one exactly as many.
  external = bool(config.data.get("tokenizer", ""))
  if tokenizer is not None and (tokenizer.vocab_size > llm.vocab_size or
                                (tokenizer.vocab_size != llm.vocab_size and not external)):
    errors.append(
        f"model.llm.vocab_size={llm.vocab_size} but the tokenizer has {tokenizer.vocab_size} pieces; "
        f"set --config.model.llm.vocab_size={tokenizer.vocab_size}")
  errors += eval_and_profile_errors(config)
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def eval_and_profile_errors(config) -> list[str]:
  """config.eval and config.profile: the in-training evaluation, best checkpoint and trace."""
  from mm15_jax.train import in_training_eval, profiling  # the trainer's own names and rules

  e, errors = config.eval, []
  for field, low in (("every", 0), ("batches", 1), ("generate_per_task", 0)):
    value = e[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      errors.append(f"eval.{field}={value!r}: must be an integer >= {low}")
  if e.best_mode not in ("min", "max"):
    errors.append(f"eval.best_mode={e.best_mode!r}: use 'min' (lower is better) or 'max'")
  if e.best_metric:
    names = in_training_eval.metric_names(config)
    if e.best_metric not in names:
      held_out = len(in_training_eval.METRICS) * (1 + len(config.data.sources))  # overall, then per source
      generated = (f", or a generation accuracy {names[held_out:]}" if names[held_out:] else
                   "; generation accuracies (task_accuracy, task/<task>) need eval.generate_per_task > 0 and "
                   "built-in data.sources")
      errors.append(f"eval.best_metric={e.best_metric!r} is not an eval metric; use one of {names[:4]} or "
                    f"'<source>/<metric>' for a source of data.sources, e.g. {names[held_out - 1]!r}{generated}")
  errors += profiling.check_steps(config.profile, config.train.steps)
  return errors
