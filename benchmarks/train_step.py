"""Throughput and MFU of the jitted train step on synthetic tokens.

  python benchmarks/train_step.py --preset=maxtext_cpu          # the CPU peer comparison
  python benchmarks/train_step.py --preset=cpu_100m --steps=3    # ~100M parameters on a CPU
  python benchmarks/train_step.py --preset=llm_1b --attention=cudnn   # on a GPU

MFU = model FLOPs per step (mm15_jax/train/flops.py) / (step time x peak), with the peak
both from the data sheet and from a large matmul measured in the same run. The model FLOPs
are cross-checked against XLA's count of the compiled step (`xla_step_flops`).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mm15_jax import configs, modes
from mm15_jax import sharding as shd
from mm15_jax.plan import estimate as plan_estimate
from mm15_jax.train import flops as flops_lib
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    # MaxText's CPU reference point: llama-style, 4 layers, d 256, 4 heads, MLP 1024,
    # vocab 32000, sequence 512, batch 8, fp32, text only.
    "maxtext_cpu": dict(layers=4, d=256, heads=4, kv=4, mlp=1024, vocab=32000, seq=512, batch=8,
                        dtype="float32", remat="none", tiles=0),
    # experiments/tiny.py as it trains: batch 16 x 256 tokens, 16 tiles of 32 px per row, fp32.
    "tiny": dict(experiment="experiments/tiny.py"),
    # experiments/tiny_moe.py as it trains (the MoE impl is --moe_impl's).
    "tiny_moe": dict(experiment="experiments/tiny_moe.py"),
    # ~100M parameters on a CPU: llama-style, 12 layers, d 768, 12 heads, MLP 2048, vocab 32000
    # (134M in all, 110M in matmuls), sequence 512, batch 1, fp32, text only.
    "cpu_100m": dict(layers=12, d=768, heads=12, kv=12, mlp=2048, vocab=32000, seq=512, batch=1,
                     dtype="float32", remat="none", tiles=0),
    # The MM1.5-1B decoder, bf16, text only.
    "llm_1b": dict(size="1b", vocab=32768, seq=4096, batch=8, dtype="bfloat16", remat="full", tiles=0),
    # The MM1.5-1B multimodal model: 4096 tokens with 4 x 144 image tokens (378 px tiles).
    "mm15_1b": dict(size="1b", vit="H/14", vocab=32768, seq=4096, batch=4, dtype="bfloat16",
                    remat="full", tiles=4),
    # MM1.5-1B-MoE's decoder (64 experts of the dense FFN's size, top-2, every other layer) cut to
    # 2 layers, the second MoE, so that its 3.4B parameters and their fp32 AdamW state (54 GB) fit
    # one 80 GB GPU; bf16, text only. The MoE impl is --moe_impl's.
    "llm_1b_moe_2l": dict(size="1b", moe="1b", layers=2, vocab=32768, seq=4096, batch=4, dtype="bfloat16",
                          remat="full", tiles=0),
}


def make_config(preset: dict, attention: str, remat: str | None):
  if "experiment" in preset:  # the experiment's own model, batch and data shapes
    c = configs.load_experiment(os.path.join(ROOT, preset["experiment"]))
    c.model.remat = remat or c.model.remat
  else:
    c = preset_config(preset, remat)
  c.model.attention_impl = attention
  c.train.steps = 1000
  c.mesh = dict(data=1, fsdp=-1, tensor=1, expert=1)
  return c


def preset_config(preset: dict, remat: str | None):
  c = configs.base()
  if "size" in preset:
    c.model = configs.model_config(preset["size"], preset.get("vit", "tiny"), 378 if "vit" in preset else 32,
                                   preset["vocab"])
    if "moe" in preset:
      c.model.moe.update(configs.MOE_SIZES[preset["moe"]])
      c.model.llm.n_layers = preset["layers"]
  else:
    llm = c.model.llm
    llm.n_layers, llm.d_model = preset["layers"], preset["d"]
    llm.n_heads, llm.n_kv_heads = preset["heads"], preset["kv"]
    llm.head_dim, llm.mlp_dim, llm.vocab_size = preset["d"] // preset["heads"], preset["mlp"], preset["vocab"]
  c.model.dtype = preset["dtype"]
  c.model.remat = remat or preset["remat"]
  c.data.seq_len = preset["seq"]
  c.data.max_tiles = preset["tiles"]
  c.train.batch_size = preset["batch"]
  return c


def xla_step_flops(config, host_batch: dict, devices=None) -> float:
  """FLOPs of one train step as XLA counts them: remat recompute, optimizer and elementwise
  work included.

  XLA's cost analysis counts a loop body once, not once per iteration, so the count is taken
  from a second compile with the layer scans unrolled (same math), plus the LM-head chunks of
  the fused loss that its loop leaves out (`plan.estimate.head_chunks_left_out`). Custom calls (cuDNN or
  splash attention) count zero. The count is per device; times the device count it is global
  (exact on one device).
  """
  c = config.copy_and_resolve_references()
  c.model.scan_unroll = max(c.model.llm.n_layers, c.model.vit.depth)
  setup = state_lib.make_setup(c, shd.make_mesh(c.mesh, devices=devices))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding(v.ndim))
           for k, v in host_batch.items()}
  compiled = step_lib.jit_train_step(setup).lower(setup.abstract_state, batch).compile()
  # The fused loss's chunk loop is counted once too: its other chunks by formula, as the planner does.
  left_out = plan_estimate.head_chunks_left_out(c, setup.mesh.size)
  return (float(compiled.cost_analysis()["flops"]) + left_out) * setup.mesh.size


def synthetic_batch(config, rng):
  b, l = config.train.batch_size, config.data.seq_len
  t, s, k = config.data.max_tiles, config.model.vit.image_size, config.model.connector.tokens_per_tile
  tokens = rng.integers(4, config.model.llm.vocab_size, size=(b, l), dtype=np.int32)
  positions = np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy()
  image_pos = np.broadcast_to(1 + np.arange(t * k, dtype=np.int32), (b, t * k)).copy()
  return dict(
      tokens=tokens, targets=np.roll(tokens, -1, axis=1), loss_mask=np.ones((b, l), np.float32),
      segment_ids=np.ones((b, l), np.int32), positions=positions,
      images=rng.integers(0, 256, size=(b, t, s, s, 3), dtype=np.uint8), image_token_positions=image_pos)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="maxtext_cpu", choices=sorted(PRESETS))
  parser.add_argument("--attention", default="xla", choices=modes.values(modes.AttentionImpl))
  parser.add_argument("--remat", default=None, choices=(None,) + modes.values(modes.Remat))
  parser.add_argument("--scan_unroll", type=int, default=None,
                      help="config.model.scan_unroll (default: the config's, 0: auto, every layer on CPU)")
  parser.add_argument("--moe_impl", default=None, choices=(None,) + modes.values(modes.MoeImpl),
                      help="config.model.moe.impl (default: the config's, auto)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--loss_chunk", type=int, default=None,
                      help="config.train.loss_chunk (default: the config's): LM head + cross-entropy this many "
                           "positions at a time with a fused backward; 0: whole logits")
  parser.add_argument("--xla_flops", default="auto", choices=["auto", "on", "off"],
                      help="cross-check the FLOP formula against XLA's count (a second, unrolled compile); "
                           "auto: on CPU only")
  args = parser.parse_args()

  config = make_config(PRESETS[args.preset], args.attention, args.remat)
  if args.batch:
    config.train.batch_size = args.batch
  if args.moe_impl is not None:
    config.model.moe.impl = args.moe_impl
  if args.scan_unroll is not None:
    config.model.scan_unroll = args.scan_unroll
  if args.loss_chunk is not None:
    config.train.loss_chunk = args.loss_chunk
  mesh = shd.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  state = state_lib.init_state(setup)
  host = synthetic_batch(config, np.random.default_rng(0))
  batch = {k: jax.device_put(v, setup.batch_sharding(v.ndim)) for k, v in host.items()}
  step = step_lib.jit_train_step(setup)

  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(2):  # warm-up
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / args.steps

  moe = config.model.moe
  counts = flops_lib.param_counts(setup.abstract_params, setup.logical, moe.top_k, moe.num_experts)
  step_flops = flops_lib.flops_per_step(config, counts)
  n_dev = jax.device_count()
  on_cpu = jax.default_backend() == "cpu"
  big = 2048 if on_cpu else 8192
  mm_dtype = jnp.float32 if config.model.dtype == "float32" else jnp.bfloat16
  measured_peak = flops_lib.measured_matmul_flops(big, mm_dtype, repeats=3 if on_cpu else 20)
  sheet_peak = 0.0 if on_cpu else flops_lib.peak_flops_per_device()
  tokens = config.train.batch_size * config.data.seq_len
  xla_flops = xla_step_flops(config, host) if args.xla_flops == "on" or (args.xla_flops == "auto" and on_cpu) else 0
  peak = measured_peak * (1 if on_cpu else n_dev)
  result = dict(
      preset=args.preset, device=jax.devices()[0].device_kind, devices=n_dev, backend=jax.default_backend(),
      attention=args.attention, remat=config.model.remat, scan_unroll=config.model.scan_unroll,
      loss_chunk=config.train.loss_chunk, dtype=config.model.dtype,
      params=counts["total"], batch=config.train.batch_size, seq=config.data.seq_len,
      step_s=seconds, tokens_per_s=tokens / seconds, compile_s=compile_s,
      model_tflops_per_s=step_flops / seconds / 1e12,
      matmul_peak_tflops=measured_peak / 1e12,
      mfu_vs_measured_matmul=step_flops / seconds / peak,
      mfu_vs_datasheet=(step_flops / seconds / (sheet_peak * n_dev)) if sheet_peak else None,
      # The same with XLA's count (recompute and optimizer included): hardware FLOPs utilisation.
      formula_tflops=step_flops / 1e12, xla_tflops=(xla_flops / 1e12) or None,
      formula_over_xla=(step_flops / xla_flops) if xla_flops else None,
      hfu_vs_measured_matmul=(xla_flops / seconds / peak) if xla_flops else None,
      loss=float(metrics["loss"]),
  )
  print(json.dumps(result))


if __name__ == "__main__":
  main()
