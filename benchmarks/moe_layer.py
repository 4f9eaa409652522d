"""MoE layer vs the dense SwiGLU MLP with the same active parameters, measured in one run.

  python benchmarks/moe_layer.py                         # CPU-sized defaults
  python benchmarks/moe_layer.py --d=2048 --f=8192 --experts=64 --tokens=16384 --dtype=bfloat16   # GPU

Paths (--impls, model.moe.impl's values): by default every one that runs natively on this
backend: ragged, blocked and capacity everywhere, tokamax where installed, megablox on TPU only (elsewhere
it is Pallas' interpreter).

The dense MLP has hidden size top_k * f, so a token touches as many weights in both. Each
forward+backward is timed after compile and warm-up; MFU counts 6 * active matmul params per
token (router included for MoE) against a large matmul measured in the same run.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm15_jax.models import grouped_matmul
from mm15_jax.models.moe import MoE
from mm15_jax.train import flops as flops_lib


def swiglu_params(key, d, f, dtype):
  k1, k2, k3 = jax.random.split(key, 3)
  scale = lambda n: 1.0 / np.sqrt(n)
  return dict(gate=jax.random.normal(k1, (d, f), dtype) * scale(d), up=jax.random.normal(k2, (d, f), dtype) * scale(d),
              down=jax.random.normal(k3, (f, d), dtype) * scale(f))


def dense_loss(p, x):
  h = jax.nn.silu(x @ p["gate"]) * (x @ p["up"])
  return jnp.mean(jnp.square((h @ p["down"]).astype(jnp.float32)))


def native_impls(backend: str) -> list[str]:
  impls = ["ragged", "blocked", "capacity"]
  if grouped_matmul.tokamax_installed():
    impls.insert(1, "tokamax")
  if backend == "tpu":
    impls.insert(1, "megablox")
  return impls


def timed(fn, *args, steps):
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--d", type=int, default=256)
  parser.add_argument("--f", type=int, default=512)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--impls", default="", help="comma-separated model.moe.impl values (default: this backend's)")
  args = parser.parse_args()
  impls = args.impls.split(",") if args.impls else native_impls(jax.default_backend())
  dtype = jnp.dtype(args.dtype)
  d, f, e, k, t = args.d, args.f, args.experts, args.top_k, args.tokens
  x = jax.random.normal(jax.random.key(0), (1, t, d), dtype)
  valid = jnp.ones((1, t), bool)

  results = dict(device=jax.devices()[0].device_kind, d=d, f=f, experts=e, top_k=k, tokens=t, dtype=args.dtype)
  active = 3 * d * k * f
  dense = swiglu_params(jax.random.key(1), d, k * f, dtype)
  grad_dense = jax.jit(jax.grad(dense_loss))
  seconds = timed(grad_dense, dense, x[0], steps=args.steps)
  results["dense"] = dict(step_s=seconds, tokens_per_s=t / seconds, tflops=6 * active * t / seconds / 1e12)

  for impl in impls:
    settings = dict(num_experts=e, top_k=k, interval=1, expert_mlp_dim=f, impl=impl, capacity_factor=1.25)
    layer = MoE(d, settings, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)

    def moe_loss(p, x, graphdef=graphdef):
      y, stats = nnx.merge(graphdef, p)(x, valid)
      return jnp.mean(jnp.square(y.astype(jnp.float32))) + 0.01 * stats["lb_loss"]

    seconds = timed(jax.jit(jax.grad(moe_loss)), params, x, steps=args.steps)
    moe_active = active + d * e  # the router
    results[impl] = dict(step_s=seconds, tokens_per_s=t / seconds, tflops=6 * moe_active * t / seconds / 1e12)

  on_cpu = jax.default_backend() == "cpu"
  peak = flops_lib.measured_matmul_flops(2048 if on_cpu else 8192, dtype, repeats=3 if on_cpu else 20)
  results["matmul_peak_tflops"] = peak / 1e12
  for name in ["dense"] + impls:
    results[name]["mfu_vs_measured_matmul"] = results[name]["tflops"] * 1e12 / peak
    results[name]["speed_vs_dense"] = results["dense"]["step_s"] / results[name]["step_s"]
  print(json.dumps(results))


if __name__ == "__main__":
  main()
