"""CLIP and SigLIP vision towers (Hugging Face layout) -> our VisionTransformer (models/vit.py).

A whole CLIP/SigLIP model (text tower included) or the vision model alone may be given: the
vision tensors live under `vision_model.` (a vision model saved by transformers >= 5 drops that
prefix), the rest is ignored. What the MM1.5
connector reads is the last block's patch tokens: CLIP's `last_hidden_state` without its class
token (CLIP applies post_layernorm only to the pooled class token), SigLIP's `last_hidden_state`
(post_layernorm applied to every token; its attention-pooling head is not used).
"""

from mm15_jax import configs, modes
from mm15_jax.convert.tensor_map import Tensor

LAYOUT_OF = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
# The public hidden_act -> our model.vit.act (plain strings: they are written into configs).
ACTS = {"quick_gelu": modes.VitAct.QUICK_GELU.value, "gelu": modes.VitAct.GELU.value,
        "gelu_pytorch_tanh": modes.VitAct.GELU_TANH.value}
PREFIX = "vision_model."


def prefix_of(names) -> str:
  """"vision_model." if the checkpoint's names carry it, else ""."""
  return PREFIX if any(n.startswith(PREFIX) for n in names) else ""


def vit_config(hf: dict, preprocessor: dict | None = None) -> dict:
  """config.json (and preprocessor_config.json, if any) -> our `config.model.vit` fields."""
  model_type = hf.get("model_type")
  if model_type not in LAYOUT_OF:
    raise ValueError(f"config.json model_type={model_type!r}: --kind=vit reads {sorted(LAYOUT_OF)}")
  layout = LAYOUT_OF[model_type]
  vision = hf.get("vision_config", hf) if model_type in ("clip", "siglip") else hf
  act = vision.get("hidden_act", "quick_gelu" if layout == "clip" else "gelu_pytorch_tanh")
  if act not in ACTS:
    raise ValueError(f"config.json vision hidden_act={act!r} is not supported; supported: {sorted(ACTS)}")
  if vision.get("num_channels", 3) != 3:
    raise ValueError(f"config.json vision num_channels={vision['num_channels']}: RGB (3) encoders only")
  out = dict(patch_size=vision["patch_size"], width=vision["hidden_size"], depth=vision["num_hidden_layers"],
             heads=vision["num_attention_heads"], mlp_dim=vision["intermediate_size"], act=ACTS[act],
             image_size=vision["image_size"], norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
             **configs.VIT_LAYOUT[layout])
  out["pos_resize"] = modes.PosResize.BICUBIC.value  # as the public towers interpolate their position embeddings
  if preprocessor and "image_mean" in preprocessor:
    out.update(image_mean=tuple(preprocessor["image_mean"]), image_std=tuple(preprocessor["image_std"]))
  return out


def tensors(vit, prefix: str = PREFIX) -> list[Tensor]:
  """The entries of our VisionTransformer params for `config.model.vit` (import only); tensor
  names under `prefix` (see prefix_of)."""
  d, h, p = vit["width"], vit["heads"], vit["patch_size"]
  g = vit["image_size"] // p
  hd = d // h
  emb, layer = prefix + "embeddings.", prefix + "encoder.layers.{i}."
  same = lambda w: w  # noqa: E731
  out = [
      # torch conv weight [d, 3, p, p] -> [p, p, 3, d]
      Tensor(("patch_embedding",), emb + "patch_embedding.weight", lambda w: w.transpose(2, 3, 1, 0)),
  ]
  if vit["class_token"]:
    # One table [1 + g*g, d]: row 0 is the class token's position.
    out += [Tensor(("class_embedding",), emb + "class_embedding", same),
            Tensor(("class_pos_embedding",), emb + "position_embedding.weight", lambda w: w[0]),
            Tensor(("pos_embedding",), emb + "position_embedding.weight", lambda w: w[1:].reshape(g, g, d))]
  else:
    out.append(Tensor(("pos_embedding",), emb + "position_embedding.weight", lambda w: w.reshape(g, g, d)))
  if vit["patch_bias"]:
    out.append(Tensor(("patch_bias",), emb + "patch_embedding.bias", same))
  if vit["pre_norm"]:
    # (sic) CLIP's attribute is spelled "pre_layrnorm".
    out += [Tensor(("ln_pre", "scale"), prefix + "pre_layrnorm.weight", same),
            Tensor(("ln_pre", "bias"), prefix + "pre_layrnorm.bias", same)]
  if vit["post_norm"]:
    out += [Tensor(("ln_post", "scale"), prefix + "post_layernorm.weight", same),
            Tensor(("ln_post", "bias"), prefix + "post_layernorm.bias", same)]
  per_layer = [
      (("ln_1", "scale"), "layer_norm1.weight", same), (("ln_1", "bias"), "layer_norm1.bias", same),
      (("ln_2", "scale"), "layer_norm2.weight", same), (("ln_2", "bias"), "layer_norm2.bias", same),
      (("o",), "self_attn.out_proj.weight", lambda w: w.T.reshape(h, hd, d)),
      (("o_bias",), "self_attn.out_proj.bias", same),
      (("fc1",), "mlp.fc1.weight", lambda w: w.T), (("fc1_bias",), "mlp.fc1.bias", same),
      (("fc2",), "mlp.fc2.weight", lambda w: w.T), (("fc2_bias",), "mlp.fc2.bias", same),
  ]
  for name in ("q", "k", "v"):
    per_layer += [((name,), f"self_attn.{name}_proj.weight", lambda w: w.T.reshape(d, h, hd)),
                  ((f"{name}_bias",), f"self_attn.{name}_proj.bias", same)]
  out += [Tensor(("layers",) + ours, layer + theirs, fn, stacked=True) for ours, theirs, fn in per_layer]
  return out


def ignored(prefix: str = PREFIX) -> tuple:
  """The parts of a whole CLIP/SigLIP checkpoint the encoder does not use."""
  return ("text_model.", "visual_projection", "text_projection", "logit_scale", "logit_bias",
          prefix + "head.", prefix + "embeddings.position_ids", prefix + "post_layernorm.")
