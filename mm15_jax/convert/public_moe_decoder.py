"""Mixtral-layout decoders <-> our MoE Decoder with routed experts in every layer (moe.interval 1).

Attention, norms and embeddings are the Llama layout (public_decoder), under our scanned
`layers/sparse` blocks. The router and the experts, per layer i, expert j:

  block_sparse_moe.gate.weight             [E, d]   -> moe/router [d, E]
  block_sparse_moe.experts.{j}.w1.weight   [ff, d]  -> moe/gate [E, d, ff]  (row j)
  block_sparse_moe.experts.{j}.w3.weight   [ff, d]  -> moe/up   [E, d, ff]
  block_sparse_moe.experts.{j}.w2.weight   [d, ff]  -> moe/down [E, ff, d]

That is the layout of the published checkpoints, and the one transformers (5.x too) writes
with save_pretrained. transformers >= 5 holds the experts fused in memory (mlp.gate.weight,
mlp.experts.gate_up_proj [E, 2ff, d] with the gate rows first, mlp.experts.down_proj [E, d, ff])
and loads a directory stored that way as well, so an import reads either; export writes the
published one.

Routing computes the same: float32 logits, softmax over experts, top-k, the k weights
renormalised to sum to 1. Mixtral renormalises with k = 1 too (weight 1) where our top-1 keeps the
router probability (Switch), so num_experts_per_tok=1 is refused. An import sets moe.impl="auto",
dropless like Mixtral; "capacity" computes the same only while no assignment is dropped
(capacity_factor >= num_experts / top_k guarantees it). router_jitter_noise only scales the MoE
input by random factors while transformers trains: inference is unchanged and our training applies
no jitter, so it is accepted and not carried over; likewise router_aux_loss_coef (the import keeps
our moe.lb_loss_weight).

An expert param has one public tensor per layer and expert, where a `tensor_map.Tensor` has one
per layer: `Experts` entries, checked, loaded and exported here (other entries go to tensor_map).
Each device's shard is cut from the tensors of the layers and experts it holds, so with the
expert axis sharded over the mesh no device reads another's experts.
"""

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np

from mm15_jax import modes
from mm15_jax.convert import public_decoder, tensor_map
from mm15_jax.convert.tensor_map import Tensor, get_path, set_path

MODEL_TYPES = ("mixtral",)
PUBLISHED = "model.layers.{i}.block_sparse_moe."
FUSED = "model.layers.{i}.mlp."  # transformers >= 5 in memory


@dataclasses.dataclass(frozen=True)
class Experts:
  """An expert param [layers, experts, ...] from one public tensor per layer ("{i}") and expert ("{j}")."""
  ours: tuple
  theirs: str
  count: int  # experts
  to_ours: Callable  # one expert's public array -> our layout
  to_theirs: Callable

  def per_expert(self) -> list[Tensor]:
    """One layer-stacked Tensor per expert (their names, and expert j's public -> our layout)."""
    return [Tensor(self.ours, self.theirs.replace("{j}", str(j)), self.to_ours, self.to_theirs, stacked=True)
            for j in range(self.count)]


def llm_config(hf: dict) -> dict:
  """config.json of a Mixtral decoder -> our `config.model.llm` fields, with "moe": our `config.model.moe`."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r}: expected one of {MODEL_TYPES}")
  # MixtralConfig's defaults, for a config.json written without them.
  experts, top_k = int(hf.get("num_local_experts", 8)), int(hf.get("num_experts_per_tok", 2))
  if top_k < 2:
    raise ValueError(f"config.json num_experts_per_tok={top_k}: Mixtral gives a single chosen expert weight 1, our "
                     "top-1 routing weights it by its router probability; this checkpoint would not match")
  if top_k > experts:
    raise ValueError(f"config.json num_experts_per_tok={top_k} exceeds num_local_experts={experts}")
  llm = public_decoder.decoder_fields(hf)
  return dict(llm, moe=dict(num_experts=experts, top_k=top_k, interval=1, expert_mlp_dim=llm["mlp_dim"],
                            impl=modes.MoeImpl.AUTO.value))


def layout_of(names) -> str:
  """"fused" for experts stored as transformers >= 5 holds them, else "published"."""
  return "fused" if any(n.endswith(".mlp.experts.gate_up_proj") for n in names) else "published"


def tensors(llm, moe, layout: str = "published") -> list:
  """The entries of our MoE Decoder params: `tensor_map.Tensor`s and, for the published layout, `Experts`."""
  if moe["interval"] != 1:
    raise ValueError(f"config.model.moe.interval={moe['interval']}: the Mixtral layout has routed experts in every "
                     "layer (interval 1)")
  ours = ("layers", "sparse", "moe")
  out = public_decoder.tensors(llm, layers=("layers", "sparse"), mlp=False)
  t = lambda w: w.T
  if layout == "fused":
    swap = lambda w: w.transpose(0, 2, 1)  # [E, out, in] -> [E, in, out]
    half = lambda w: w.shape[1] // 2  # gate rows, then up rows
    return out + [
        Tensor(ours + ("router",), FUSED + "gate.weight", t, stacked=True),
        Tensor(ours + ("gate",), FUSED + "experts.gate_up_proj", lambda w: swap(w[:, :half(w)]), stacked=True),
        Tensor(ours + ("up",), FUSED + "experts.gate_up_proj", lambda w: swap(w[:, half(w):]), stacked=True),
        Tensor(ours + ("down",), FUSED + "experts.down_proj", swap, stacked=True),
    ]
  e = moe["num_experts"]
  return out + [
      Tensor(ours + ("router",), PUBLISHED + "gate.weight", t, t, stacked=True),
      Experts(ours + ("gate",), PUBLISHED + "experts.{j}.w1.weight", e, t, t),
      Experts(ours + ("up",), PUBLISHED + "experts.{j}.w3.weight", e, t, t),
      Experts(ours + ("down",), PUBLISHED + "experts.{j}.w2.weight", e, t, t),
  ]


def _split(entries):
  tensors_ = [e for e in entries if not isinstance(e, Experts)]
  return tensors_, [e for e in entries if isinstance(e, Experts)]


def check_names(entries, checkpoint, n_layers: int, *, ignore=(), what: str) -> None:
  """`tensor_map.check_names`, every expert's tensors named (a missing one is listed by its name)."""
  plain, experts = _split(entries)
  every = plain + [one for e in experts for one in e.per_expert()]
  tensor_map.check_names(every, checkpoint, n_layers, ignore=ignore, what=what)


def check_shapes(entries, checkpoint, abstract: dict) -> None:
  """`tensor_map.check_shapes`, an expert param checked as its first expert's [layers, ...]."""
  plain, experts = _split(entries)
  view = jax.tree.map(lambda a: a, abstract)  # a copy of the dicts; the expert params replaced below
  for e in experts:
    target = get_path(abstract, e.ours)
    set_path(view, e.ours, jax.ShapeDtypeStruct(target.shape[:1] + target.shape[2:], target.dtype))
  tensor_map.check_shapes(plain + [e.per_expert()[0] for e in experts], checkpoint, view)


def _load_experts(e: Experts, checkpoint, target, sharding, stats):
  dtype = np.dtype(target.dtype)
  cut = functools.partial(tensor_map.cut_piece, stats)

  # One layer's experts in our layout (built layer by layer, so each is read once per host);
  # devices that split one expert along another axis cut from the one read.
  @functools.lru_cache(maxsize=e.count)
  def one(i, j):
    return np.asarray(e.to_ours(checkpoint.read(e.theirs.format(i=i, j=j))), dtype)

  def experts(index):
    return range(*index.indices(e.count))

  value = tensor_map.place_layers(
      target, sharding, lambda i, index: np.stack([cut(one(i, j), index[1:]) for j in experts(index[0])]))
  if value is None:  # layers split across devices: each device's shard from its layers and experts
    value = jax.make_array_from_callback(target.shape, sharding, lambda index: np.stack([
        np.stack([cut(one(i, j), index[2:]) for j in experts(index[1])])
        for i in range(*index[0].indices(target.shape[0]))]))
  return value


def load(entries, checkpoint, abstract: dict, shardings: dict, stats: dict | None = None, progress=None) -> dict:
  """`tensor_map.load`, with the expert params built shard by shard from the experts each holds."""
  plain, experts = _split(entries)
  out = tensor_map.load(plain, checkpoint, abstract, shardings, stats, progress)
  for e in experts:
    set_path(out, e.ours, _load_experts(e, checkpoint, get_path(abstract, e.ours), get_path(shardings, e.ours), stats))
    if progress is not None:
      progress.update()
  return out


def export(entries, params: dict, n_layers: int):
  """(public name, NumPy array) pairs, one layer (and expert) at a time, from our params."""
  plain, experts = _split(entries)
  yield from tensor_map.export(plain, params, n_layers)
  for e in experts:
    value = get_path(params, e.ours)
    for i in range(n_layers):
      for j in range(e.count):
        array = np.asarray(jax.device_get(value[i, j]))
        yield e.theirs.format(i=i, j=j), np.ascontiguousarray(e.to_theirs(array))


def check_exportable(llm, moe) -> None:
  """Refuses (naming the field) an MoE decoder the Mixtral layout cannot express."""
  if moe["interval"] != 1:
    raise ValueError(f"config.model.moe.interval={moe['interval']}: the Mixtral layout has routed experts in every "
                     "layer, so an MoE decoder with dense layers between them (interval > 1, as MM1.5's MoE "
                     "models) has no public layout to export to")
  if moe["top_k"] < 2:
    raise ValueError(f"config.model.moe.top_k={moe['top_k']}: Mixtral renormalises the chosen weights (a single "
                     "expert gets weight 1) where our top-1 keeps the router probability; it would not match")
  if llm["qkv_bias"]:
    raise ValueError("config.model.llm.qkv_bias=True: the Mixtral layout has no q/k/v biases")


def public_config(llm, moe, *, dtype: str = "bfloat16", bos_id=None, eos_id=None) -> dict:
  """Our `config.model.llm` and `config.model.moe` (moe_settings) -> a Mixtral config.json."""
  check_exportable(llm, moe)
  config = public_decoder.public_config(llm, dtype=dtype, bos_id=bos_id, eos_id=eos_id)
  for key in ("attention_bias", "mlp_bias"):  # not Mixtral fields
    config.pop(key)
  config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=moe["expert_mlp_dim"],
                num_local_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"], sliding_window=None,
                router_jitter_noise=0.0, output_router_logits=False)
  return config
