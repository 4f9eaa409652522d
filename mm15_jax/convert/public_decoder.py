"""Llama/Mistral/Qwen2-layout decoders <-> our Decoder (mm15_jax/models/llm.py).

The public layout stores each projection as a torch Linear weight [out, in]; ours keeps the
input axis first and splits heads: q [embed, heads, head_dim], o [heads, head_dim, embed].
Both use the half-split ("rotate_half") RoPE layout, so no permutation of q/k rows is needed.
Qwen2 adds biases to q, k and v. Anything the Decoder cannot compute (biases on o or the MLP,
sliding-window attention, other RoPE scalings, other activations) is refused by name.
Mixtral decoders share this layout except for their experts (public_moe_decoder).
"""

from mm15_jax import modes
from mm15_jax.convert.tensor_map import Tensor

MODEL_TYPES = ("llama", "mistral", "qwen2")
# The public rope_type -> our model.llm.rope_scaling.kind (plain strings: they are written into configs).
ROPE_TYPES = {"default": modes.RopeScaling.NONE.value, "linear": modes.RopeScaling.LINEAR.value,
              "llama3": modes.RopeScaling.LLAMA3.value}


def _rope(hf: dict) -> tuple[float, dict]:
  """(theta, our rope_scaling) from either spelling: transformers >= 5 `rope_parameters`, or
  `rope_theta` + `rope_scaling` before it."""
  params = dict(hf.get("rope_parameters") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  scaling = hf.get("rope_scaling") or params
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"config.json rope type {rope_type!r} is not supported; supported: {sorted(ROPE_TYPES)}")
  ours = dict(kind=ROPE_TYPES[rope_type], factor=float(scaling.get("factor", 1.0)),
              low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
              high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
              original_max_position=int(scaling.get("original_max_position_embeddings", 8192)))
  return float(theta), ours


def llm_config(hf: dict) -> dict:
  """config.json of a public decoder -> our `config.model.llm` fields."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r}: --kind=llm reads {MODEL_TYPES} decoders and "
                     "'mixtral' mixture-of-experts decoders")
  return decoder_fields(hf)


def decoder_fields(hf: dict) -> dict:
  """Our `config.model.llm` fields from what every Llama-family config.json has (Mixtral's too)."""
  model_type = hf.get("model_type")
  refuse = {
      "hidden_act": hf.get("hidden_act", "silu") != "silu",
      "mlp_bias": bool(hf.get("mlp_bias")),
      "attention_bias": model_type != "qwen2" and bool(hf.get("attention_bias")),  # bias on o_proj too
      "use_sliding_window": bool(hf.get("use_sliding_window")),
      "sliding_window": model_type in ("mistral", "mixtral") and hf.get("sliding_window") is not None,
  }
  bad = [k for k, v in refuse.items() if v]
  if bad:
    raise ValueError(f"config.json sets {', '.join(f'{k}={hf.get(k)!r}' for k in bad)}: our Decoder computes "
                     "SiLU MLPs without biases and full causal attention; this checkpoint would not match")
  heads = hf["num_attention_heads"]
  theta, scaling = _rope(hf)
  return dict(
      n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"], n_heads=heads,
      n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"], rope_theta=theta, rope_scaling=scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=model_type == "qwen2")


def public_config(llm, *, dtype: str = "bfloat16", bos_id=None, eos_id=None) -> dict:
  """Our `config.model.llm` -> config.json of the public layout (Qwen2 when q/k/v have biases)."""
  qwen = bool(llm["qkv_bias"])
  scaling = dict(llm["rope_scaling"])
  rope_type = {v: k for k, v in ROPE_TYPES.items()}[modes.parse(modes.RopeScaling, scaling["kind"])]
  rope = {"rope_type": rope_type, "rope_theta": float(llm["rope_theta"])}
  if rope_type != "default":
    rope["factor"] = scaling["factor"]
  if rope_type == "llama3":
    rope.update(low_freq_factor=scaling["low_freq_factor"], high_freq_factor=scaling["high_freq_factor"],
                original_max_position_embeddings=scaling["original_max_position"])
  config = {
      "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
      "model_type": "qwen2" if qwen else "llama",
      "hidden_size": llm["d_model"], "num_hidden_layers": llm["n_layers"],
      "num_attention_heads": llm["n_heads"], "num_key_value_heads": llm["n_kv_heads"], "head_dim": llm["head_dim"],
      "intermediate_size": llm["mlp_dim"], "vocab_size": llm["vocab_size"], "hidden_act": "silu",
      "rms_norm_eps": llm["norm_eps"], "tie_word_embeddings": bool(llm["tie_embeddings"]),
      "max_position_embeddings": 8192, "attention_bias": False, "mlp_bias": False,
      # Both spellings: transformers >= 5 reads rope_parameters, earlier releases rope_theta/rope_scaling.
      "rope_parameters": rope, "rope_theta": float(llm["rope_theta"]),
      "rope_scaling": None if rope_type == "default" else rope,
      "torch_dtype": dtype, "use_cache": True,
  }
  if bos_id is not None:
    config.update(bos_token_id=bos_id, eos_token_id=eos_id)
  return config


def tensors(llm, *, layers=("layers",), mlp: bool = True) -> list[Tensor]:
  """The entries of our Decoder params for `config.model.llm`: `layers` is the path of the stacked
  blocks (("layers", "sparse") in an MoE decoder), `mlp` False leaves out the dense MLP."""
  d, h, kv, hd = llm["d_model"], llm["n_heads"], llm["n_kv_heads"], llm["head_dim"]
  layer = "model.layers.{i}."

  def heads_in(n):  # [n * hd, d] -> [d, n, hd]
    return lambda w: w.T.reshape(d, n, hd), lambda w: w.reshape(d, n * hd).T

  def transpose():
    return lambda w: w.T, lambda w: w.T

  def same():
    return lambda w: w, lambda w: w

  out = [
      Tensor(("embedding",), "model.embed_tokens.weight", *same()),
      Tensor(("final_norm", "scale"), "model.norm.weight", *same()),
      Tensor((*layers, "attn_norm", "scale"), layer + "input_layernorm.weight", *same(), stacked=True),
      Tensor((*layers, "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", *same(), stacked=True),
      Tensor((*layers, "q"), layer + "self_attn.q_proj.weight", *heads_in(h), stacked=True),
      Tensor((*layers, "k"), layer + "self_attn.k_proj.weight", *heads_in(kv), stacked=True),
      Tensor((*layers, "v"), layer + "self_attn.v_proj.weight", *heads_in(kv), stacked=True),
      # [d, h * hd] -> [h, hd, d]
      Tensor((*layers, "o"), layer + "self_attn.o_proj.weight",
             lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T, stacked=True),
  ]
  if mlp:
    out += [Tensor((*layers, name), layer + f"mlp.{name}_proj.weight", *transpose(), stacked=True)
            for name in ("gate", "up", "down")]
  if llm["qkv_bias"]:
    for name, n in (("q", h), ("k", kv), ("v", kv)):
      out.append(Tensor((*layers, f"{name}_bias"), layer + f"self_attn.{name}_proj.bias",
                        lambda w, n=n: w.reshape(n, hd), lambda w: w.reshape(-1), stacked=True))
  if not llm["tie_embeddings"]:
    out.append(Tensor(("lm_head",), "lm_head.weight", *transpose()))
  return out


# Buffers some checkpoints carry that are computed, not learned.
IGNORED = ("rotary_emb.inv_freq",)
