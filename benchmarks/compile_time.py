"""Compile time of the train step as the decoder deepens: scanned layers keep it flat.

  JAX_PLATFORMS=cpu python benchmarks/compile_time.py --layers=2,8,32
"""

import argparse
import json
import time

import jax

from mm15_jax import batch as batch_lib
from mm15_jax import configs
from mm15_jax import sharding as shd
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib


def compile_seconds(n_layers: int, scan_unroll: int) -> float:
  c = configs.base()
  c.model.llm.n_layers = n_layers
  c.model.connector.tokens_per_tile = 4
  c.model.scan_unroll = scan_unroll
  c.mesh = dict(data=1, fsdp=1, tensor=1, expert=1)
  setup = state_lib.make_setup(c, shd.make_mesh(c.mesh, devices=jax.devices()[:1]))
  abstract_batch = {
      k: jax.ShapeDtypeStruct(shape, dtype, sharding=setup.batch_sharding(len(shape)))
      for k, (shape, dtype) in batch_lib.shapes_for_config(c).items()}
  start = time.perf_counter()
  step_lib.jit_train_step(setup).lower(setup.abstract_state, abstract_batch).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", default="2,8,32")
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles
  rows = []
  for n in (int(x) for x in args.layers.split(",")):
    rows.append(dict(layers=n, scanned_s=compile_seconds(n, 1), unrolled_s=compile_seconds(n, n)))
    print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
  main()
