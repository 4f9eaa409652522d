"""Batched generation speed: new tokens per second through `Model.generate_tokens`.

  JAX_PLATFORMS=cpu python benchmarks/generation.py --steps_per_call=1,8

Decoding runs `steps_per_call` tokens per device call (mm15_jax/inference/decode.py); 1 is
one host round trip per token. The model is experiments/tiny.py's shape with random weights
and a stop id that never occurs, so every row generates exactly --new_tokens; the first
call (compiles) is not timed.
"""

import argparse
import json
import os
import time

import jax

from mm15_jax import configs
from mm15_jax.inference import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--experiment", default=os.path.join(ROOT, "experiments", "tiny.py"))
  parser.add_argument("--steps_per_call", default="1,8")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  config = configs.load_experiment(args.experiment)
  prompts = [f"Question {i}: what colour is the circle?" for i in range(args.batch)]
  for count in (int(c) for c in args.steps_per_call.split(",")):
    model = load_model(config, steps_per_call=count)
    model.tokenizer.eos_id = model.tokenizer.vocab_size  # no token has this id: no row stops early
    kw = dict(max_new_tokens=args.new_tokens)
    model.generate_tokens(prompts, **kw)  # compile
    t0 = time.perf_counter()
    for _ in range(args.repeats):
      ids = model.generate_tokens(prompts, **kw)
    seconds = (time.perf_counter() - t0) / args.repeats
    new = sum(len(row) for row in ids)
    print(json.dumps(dict(steps_per_call=count, device=jax.devices()[0].device_kind, batch=args.batch,
                          new_tokens=new, seconds=seconds, tokens_per_s=new / seconds,
                          ms_per_step=1e3 * seconds / args.new_tokens)))


if __name__ == "__main__":
  main()
