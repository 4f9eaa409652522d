"""Model FLOPs and peak device FLOP/s, for the MFU estimate.

FLOPs per token (PaLM, appendix B): 6N + 12·L·H·Q·T with N the matmul params of the
decoder that a token uses (for MoE: the top-k experts' share, plus the router; the input
embedding lookup is not a matmul) and the attention term NOT halved
for the causal mask (MaxText halves it; our MFU is therefore comparable to PaLM's).
The encoder adds, per tile of P patches, 6·N_vit·P + 12·L_v·W·P² and the connector
6·N_conn·P. Every processed tile counts, empty ones included, as they cost compute.
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

# bf16 dense peak per chip, from vendor data sheets.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5": after "TPU v5 lite", as names match by substring
    ("TPU v6", 918e12),
    ("TPU v4", 275e12),
)


def is_expert_weight(logical: tuple) -> bool:
  """Stacked expert weights lead with the expert axis (after the layer axis, if stacked)."""
  names = [n for n in logical if n != "layers"]
  return bool(names) and names[0] == "expert"


def param_counts(params: dict, logical: dict | None = None, top_k: int = 0, num_experts: int = 0) -> dict:
  """Parameters per top-level component and in total, from (abstract) params.

  With `logical` axes and an MoE config, also `active`: the parameters one token uses
  (top_k of num_experts expert weights, everything else whole).
  """
  counts = {k: sum(math.prod(x.shape) for x in jax.tree.leaves(v)) for k, v in params.items()}
  counts["total"] = sum(counts.values())
  active = float(counts["total"])
  if logical is not None and num_experts:
    leaves = jax.tree.leaves(params)
    axes = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, tuple))
    expert = sum(math.prod(x.shape) for x, a in zip(leaves, axes) if is_expert_weight(a))
    active -= expert * (1 - top_k / num_experts)
  counts["active"] = int(active)
  return counts


def flops_per_step(config, counts: dict, batch_size: int | None = None) -> float:
  m, d = config.model, config.data
  b = batch_size or config.train.batch_size
  llm = m.llm
  seq = d.seq_len
  embedding = 0 if llm.tie_embeddings else llm.vocab_size * llm.d_model
  inactive = counts["total"] - counts.get("active", counts["total"])  # unused experts (MoE)
  n_llm = counts["llm"] - embedding - inactive
  per_token = 6 * n_llm + 12 * llm.n_layers * llm.n_heads * llm.head_dim * seq
  patches = (m.vit.image_size // m.vit.patch_size) ** 2
  per_tile = (6 * counts.get("vit", 0) * patches + 12 * m.vit.depth * m.vit.width * patches**2
              + 6 * counts.get("connector", 0) * patches)
  return float(b * seq * per_token + b * d.max_tiles * per_tile)


def measured_matmul_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of a square matmul on the first device (a same-run peak for CPUs)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_flops_per_device(override_tflops: float = 0.0) -> float:
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  # CPU (or unknown): measure. Simulated CPU devices share the same cores.
  return measured_matmul_flops() / (len(jax.devices()) if jax.default_backend() == "cpu" else 1)


def mfu(flops_per_step_: float, step_seconds: float, peak_per_device: float, num_devices: int) -> float:
  return float(np.float64(flops_per_step_) / (step_seconds * peak_per_device * num_devices))
