"""Both sides on the same random inputs: the public implementation (transformers, float32,
CPU) and our model loaded from the import, and the largest relative difference of their
outputs (decoder logits, or the encoder's patch features). A Mixtral decoder runs as our
inference does, dropless ("ragged"), as Mixtral computes."""

import numpy as np
from flax import nnx

from mm15_jax.convert import public_decoder, public_moe_decoder, public_vision
from mm15_jax.convert.exporter import experiment_for
from mm15_jax.convert.importer import abstract_part, import_mesh
from mm15_jax.convert.safetensors_dir import PublicCheckpoint

DECODERS = public_decoder.MODEL_TYPES + public_moe_decoder.MODEL_TYPES


def kind_of(model_type: str) -> str:
  if model_type in DECODERS:
    return "llm"
  if model_type in public_vision.LAYOUT_OF:
    return "vit"
  raise ValueError(f"config.json model_type={model_type!r}: neither a decoder {DECODERS} nor an "
                   f"encoder {sorted(public_vision.LAYOUT_OF)}")


def relative_difference(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|: one number that is small only if every output matches."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def _transformers():
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ImportError("`convert check` runs the public implementation: pip install torch transformers "
                      "(CPU builds suffice)") from e
  return torch, transformers


def public_logits(hf_dir: str, tokens: np.ndarray) -> np.ndarray:
  torch, transformers = _transformers()
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def public_features(hf_dir: str, pixels_nchw: np.ndarray, layout: str) -> np.ndarray:
  """The patch features our connector reads (see public_vision)."""
  torch, transformers = _transformers()
  model = transformers.AutoModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
  vision = getattr(model, "vision_model", model)
  with torch.no_grad():
    out = vision(pixel_values=torch.as_tensor(pixels_nchw), interpolate_pos_encoding=True).last_hidden_state
  out = out.numpy()
  return out[:, 1:] if layout == "clip" else out


def our_logits(config, checkpoint_dir: str, tokens: np.ndarray) -> np.ndarray:
  from mm15_jax.inference import load_model
  model = load_model(config, checkpoint_dir)
  return np.stack([model.logits(row) for row in tokens])


def our_features(config, checkpoint_dir: str, pixels_nhwc: np.ndarray) -> np.ndarray:
  from mm15_jax import checkpoint as ckpt_lib
  from mm15_jax.models.vit import VisionTransformer
  abstract, _ = abstract_part(config, "vit", import_mesh())
  params = ckpt_lib.load_param_parts({}, {"vit": abstract}, {"vit": checkpoint_dir})["vit"]
  m = config.model
  vit = nnx.eval_shape(lambda: VisionTransformer(m.vit, dtype=m.dtype, param_dtype=m.param_dtype,
                                                 rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(vit)
  nnx.replace_by_pure_dict(state, params)
  return np.asarray(nnx.merge(graphdef, state)(pixels_nhwc))


def run_check(hf_dir: str, checkpoint_dir: str, *, config_spec: str | None = None, batch: int = 2,
              length: int = 24, image_size: int = 0, seed: int = 0) -> dict:
  """-> dict(kind, max_relative_difference, shape). image_size 0: the encoder's own size."""
  public = PublicCheckpoint(hf_dir)
  kind = kind_of(public.config.get("model_type"))
  config = experiment_for(checkpoint_dir, config_spec)
  config.model.dtype = "float32"  # compare at full precision
  rng = np.random.default_rng(seed)
  if kind == "llm":
    vocab = public.config["vocab_size"]
    tokens = rng.integers(0, vocab, (batch, length))
    theirs = public_logits(hf_dir, tokens)
    ours = our_logits(config, checkpoint_dir, tokens)[..., :vocab]  # an added <image> row is ours only
  else:
    layout = public_vision.LAYOUT_OF[public.config["model_type"]]
    size = image_size or config.model.vit.image_size
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    theirs = public_features(hf_dir, pixels, layout)
    ours = our_features(config, checkpoint_dir, pixels.transpose(0, 2, 3, 1))
  if ours.shape != theirs.shape:
    raise ValueError(f"output shapes differ: ours {ours.shape}, public {theirs.shape}")
  return dict(kind=kind, max_relative_difference=relative_difference(ours, theirs), shape=list(theirs.shape))
