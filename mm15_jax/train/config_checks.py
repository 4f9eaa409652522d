"""Checks a config against the devices and the data before anything compiles.

Each error names the field, the values, and a fix.
"""

import math

import numpy as np

from data_pipelines import builtin, storage
from data_pipelines import sources as sources_lib
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.builtin import video as builtin_video
from mm15_jax import hardware_rules, modes
from mm15_jax import sharding as shd
from mm15_jax.train import in_training_eval, optimizer, profiling  # the trainer's own names and rules


def check_config(config, mesh=None, tokenizer=None, paths: bool = True) -> None:
  """Raises one ValueError listing every error. paths=False skips the init.* paths (a plan of a
  stage whose previous stage has not run yet)."""
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
  errors += mode_errors(config)
  if t.grad_accum < 1 or t.batch_size % t.grad_accum:
    errors.append(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  chunk = t.loss_chunk
  if chunk < 0 or (0 < chunk < config.data.seq_len and config.data.seq_len % chunk):
    errors.append(f"train.loss_chunk={chunk} must be 0 (whole logits), >= data.seq_len={config.data.seq_len} or "
                  f"divide it, e.g. {math.gcd(config.data.seq_len, chunk)}")
  try:
    shd.dcn_sizes(config.mesh_dcn)
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
  vocab = tokenizer_lib.vocab_error(config, tokenizer) if tokenizer is not None else None
  errors += [vocab] if vocab else []
  errors += range_errors(config)
  errors += init_path_errors(config) if paths else []
  errors += eval_and_profile_errors(config)
  errors += video_errors(config, tokenizer)
  errors += tile_budget_errors(config)
  errors += init_errors(config)
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))


# Mode fields whose check is elsewhere: a RULES row (its message predates the enum).
_MODES_IN_RULES = (modes.WandbMode,)


def mode_errors(config) -> list[str]:
  """Each field that names a mode (modes.FIELDS) against its enum, and train.trainable's parts."""
  errors = [modes.error(mode, config[field], field) for mode, field in modes.FIELDS.items()
            if mode not in _MODES_IN_RULES]
  try:
    optimizer.trainable_components(config.train)
  except ValueError as e:
    errors.append(str(e))
  return [e for e in errors if e]


def _int(low, high=None):
  return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def _number(low, high=None, above=False):
  ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  return lambda v: ok(v) and (v > low if above else v >= low) and (high is None or v <= high)


def _float_dtype(v) -> bool:
  if v == "bfloat16":  # ml_dtypes' name, which numpy alone does not know
    return True
  try:
    return isinstance(v, str) and np.dtype(v).kind == "f"
  except TypeError:
    return False


# Every field whose value alone can make a run meaningless: (field, test, what it must be, e.g.).
RULES = (
    ("train.lr", _number(0, above=True), "a learning rate > 0", "3e-4"),
    ("train.lr_min_ratio", _number(0, 1), "in [0, 1] (the schedule's floor as a share of train.lr)", "0.1"),
    ("train.steps", _int(1), "an integer >= 1", "1000"),
    ("train.batch_size", _int(1), "an integer >= 1 (sequences per step)", "8"),
    ("train.warmup_steps", _int(0), "an integer >= 0", "20"),
    ("train.grad_clip", _number(0), "a number >= 0 (0: no clipping)", "1.0"),
    ("train.weight_decay", _number(0), "a number >= 0", "0.1"),
    ("log_every", _int(1), "an integer >= 1 (steps per metrics row)", "10"),
    ("checkpoint.every", _int(0), "an integer >= 0 (0: only the last step is saved)", "100"),
    ("checkpoint.keep", _int(1), "an integer >= 1 (steps kept)", "3"),
    ("checkpoint.sigterm_grace_s", _number(0, above=True), "seconds > 0 to wait for a step boundary after a SIGTERM",
     "120"),
    ("data.seq_len", _int(1), "an integer >= 1", "4096"),
    ("data.read_threads", _int(-1), "an integer >= -1 (-1: auto, 0: read in the packer's thread)", "-1"),
    ("model.dtype", _float_dtype, "a floating dtype name", "'bfloat16' or 'float32'"),
    ("model.param_dtype", _float_dtype, "a floating dtype name", "'float32'"),
    ("log.wandb.mode", lambda v: v in modes.values(modes.WandbMode),
     " or ".join(map(repr, modes.values(modes.WandbMode))) + " (W&B without a server)", modes.WandbMode.OFFLINE.value),
)

# The least text any example carries besides its image tiles: "User:", an indicator, a short
# question, "Assistant:", a one-word answer and the end token (built-in tokenizer).
MIN_TEXT_TOKENS = 24


def range_errors(config) -> list[str]:
  """The RULES table, then the rules that relate fields: the smallest example against data.seq_len,
  the built-in tokenizer's smallest vocabulary, the source weights."""
  errors = []
  for field, test, what, example in RULES:
    value = config[field]
    if not test(value):
      errors.append(f"{field}={value!r}: must be {what}, e.g. --config.{field}={example}")
  if errors:
    return errors
  d, k = config.data, config.model.connector.tokens_per_tile
  for name, spec in d.sources.items():  # kinds and keys (typos), named with a suggestion
    try:
      sources_lib.validate_spec(name, spec)
    except ValueError as e:
      errors.append(str(e))
  if errors:
    return errors
  images = any(spec.get("kind", "builtin") != "builtin" or (spec.get("task", None) or name) not in builtin.TEXT_ONLY
               for name, spec in d.sources.items())
  need = (k if images else 0) + MIN_TEXT_TOKENS
  if d.seq_len < need:
    errors.append(f"data.seq_len={d.seq_len} cannot hold the smallest example ({k} image tokens of one tile "
                  f"+ {MIN_TEXT_TOKENS} of text)" if images else f"data.seq_len={d.seq_len} cannot hold the "
                  f"smallest example ({MIN_TEXT_TOKENS} tokens of text)")
    errors[-1] += f": every record would be dropped; set --config.data.seq_len={max(need, 256)} or more"
  if not d.tokenizer:
    least = tokenizer_lib.min_vocab_size()
    if config.model.llm.vocab_size < least:
      errors.append(f"model.llm.vocab_size={config.model.llm.vocab_size}: the built-in tokenizer needs at least "
                    f"{least} pieces (256 bytes, the special pieces and every character of its corpus); set "
                    f"--config.model.llm.vocab_size=512, or data.tokenizer to a tokenizer file")
  weights = {name: spec.get("weight", 1.0) for name, spec in d.sources.items()}
  bad = {name: w for name, w in weights.items() if not _number(0)(w)}
  if bad or not any(w > 0 for w in weights.values()):
    errors.append(f"data.sources weights {bad or weights}: each must be a number >= 0 (0 turns a source off) and "
                  "at least one > 0")
  return errors


def init_path_errors(config) -> list[str]:
  """Each init.* path exists, named by its own field."""
  errors = []
  for field in ("from_checkpoint", "llm_from", "vit_from", "connector_from", "upcycle_from"):
    path = config.init[field]
    if path and not storage.exists(path):
      errors.append(f"init.{field}={path!r}: no such run or checkpoint; give a run's workdir, its checkpoints/ or "
                    "a step directory (local or gs://)")
  return errors


def eval_and_profile_errors(config) -> list[str]:
  """config.eval and config.profile: the in-training evaluation, best checkpoint and trace
  (eval.best_mode, a mode, is checked with the others: mode_errors)."""
  e, errors = config.eval, []
  for field, low in (("every", 0), ("batches", 1), ("generate_per_task", 0)):
    value = e[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      errors.append(f"eval.{field}={value!r}: must be an integer >= {low}")
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


def init_errors(config) -> list[str]:
  """config.init.upcycle_from: an MoE model, experts the dense FFN's size, no other source of its params."""
  i, moe, llm = config.init, config.model.moe, config.model.llm
  path = i.upcycle_from
  if not path:
    return []
  errors = []
  if not moe.num_experts:
    errors.append(f"init.upcycle_from={path!r} starts an MoE model from a dense run, but model.moe.num_experts=0; "
                  "set model.moe (e.g. experiments/tiny_moe.py), or use init.from_checkpoint for a dense run")
  elif moe.expert_mlp_dim not in (0, llm.mlp_dim):
    errors.append(f"init.upcycle_from copies the dense FFN into every expert, but model.moe.expert_mlp_dim="
                  f"{moe.expert_mlp_dim} differs from model.llm.mlp_dim={llm.mlp_dim}; "
                  f"set --config.model.moe.expert_mlp_dim=0 (the dense size)")
  for field in ("from_checkpoint", "llm_from"):  # each would replace the upcycled decoder
    if i[field]:
      errors.append(f"init.upcycle_from={path!r} and init.{field}={i[field]!r} are both set; "
                    f"keep one (init.{field} loads params of this MoE model's own shape)")
  return errors


def tile_budget_errors(config) -> list[str]:
  """data.max_tiles against the row and the AnyRes settings: a sample the splitting rule makes
  must fit a row's tiles, or data.overlong drops (or cuts) every such sample."""
  d, errors = config.data, []
  k, seq_len, max_tiles = config.model.connector.tokens_per_tile, d.seq_len, d.max_tiles
  if not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < 1:
    errors.append(f"data.max_tiles={max_tiles!r}: must be an integer >= 1 (image tiles per packed row), e.g. "
                  f"--config.data.max_tiles={max(1, seq_len // (2 * k))}")
  elif max_tiles * k > seq_len:
    errors.append(f"data.max_tiles={max_tiles} tiles x model.connector.tokens_per_tile={k} = {max_tiles * k} "
                  f"image tokens overflow data.seq_len={seq_len}; set --config.data.max_tiles={seq_len // k} "
                  f"or raise data.seq_len to at least {max_tiles * k}")
  anyres = d.anyres
  n_min, n_max, split_max = anyres.n_min, anyres.n_max, anyres.split_max_images
  if not 1 <= n_min <= n_max:
    errors.append(f"data.anyres.n_min={n_min}, data.anyres.n_max={n_max}: need 1 <= n_min <= n_max "
                  "(sub-images per split image), e.g. n_min=4, n_max=9")
  if split_max < 0:
    errors.append(f"data.anyres.split_max_images={split_max}: must be >= 0 (0: never split)")
  if errors or not anyres.enabled or not split_max:
    return errors
  per_image = n_max + 1 if n_max > 1 else 1  # a 1x1 grid is the unsplit tile, no overview
  need = split_max * per_image
  if need > max_tiles:
    errors.append(
        f"data.max_tiles={max_tiles} cannot hold the largest split sample: data.anyres.split_max_images="
        f"{split_max} images x (data.anyres.n_max={n_max} sub-images + 1 overview) = {need} tiles, so "
        f"data.overlong={d.overlong!r} drops or cuts every such sample; set "
        f"--config.data.max_tiles={need}" + (f" (and data.seq_len >= {need * k})" if need * k > seq_len else "")
        + ", or lower data.anyres.n_max or data.anyres.split_max_images")
  return errors


def video_errors(config, tokenizer=None) -> list[str]:
  """config.video (experiments/mm15_video.py): each frame one tile, never split, and a whole
  clip (frames x (tile tokens + "Image k:") + its text) in one row."""
  video = config.get("video", None)
  if not video:
    return []
  frames = video.get("frames", None)
  if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
    return [f"video.frames={frames!r}: must be an integer >= 1 (frames sampled per clip; MM1.5-Video: 24)"]
  data, errors = config.data, []
  builtin_clips = any(spec.get("kind", "builtin") == "builtin" and (spec.get("task", None) or name) == "video"
                      for name, spec in data.sources.items())
  n = max(frames, builtin_video.MAX_FRAMES) if builtin_clips else frames
  why = f"{n} frames (video.frames={frames}" + (
      f"; the built-in 'video' clips have up to {builtin_video.MAX_FRAMES})" if builtin_clips else ")")
  if data.anyres.enabled and data.anyres.split_max_images > 0:
    errors.append(f"data.anyres.split_max_images={data.anyres.split_max_images}: clips of up to that many frames "
                  "would be split into sub-images; video frames are one tile each: set "
                  "--config.data.anyres.split_max_images=0")
  if data.max_tiles < n:
    errors.append(f"data.max_tiles={data.max_tiles} cannot hold {why}, one tile each; set "
                  f"--config.data.max_tiles={n} or sample fewer frames")
  k = config.model.connector.tokens_per_tile
  indicator = 0
  if data.anyres.indicators == modes.Indicators.INDEX:  # "Image k:" before each frame's tile
    indicator = len(tokenizer.encode_span(f"Image {n}:")) if tokenizer is not None else 4 + len(str(n))
  text = 64  # "User:", a question, "Assistant:", a short answer and a follow-up turn
  need = n * (k + indicator) + text
  if data.seq_len < need:
    errors.append(f"data.seq_len={data.seq_len} cannot hold {why}: {n} x ({k} image tokens + {indicator} for "
                  f"'Image k:') + {text} for the text = {need} tokens; set --config.data.seq_len={need} or more, "
                  "or sample fewer frames")
  return errors
