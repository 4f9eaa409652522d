"""Our train step against MaxText's on the same decoder, run alternately in one invocation.

  python benchmarks/maxtext_peer.py --maxtext_python=/path/to/venv/bin/python --rounds=3

The decoder is train_step.py's `maxtext_cpu` preset: llama-style, 4 layers, d 256, 4 heads
(head dim 64), MLP 1024, vocab 32000, sequence 512, batch 8, fp32 weights and activations,
synthetic tokens, AdamW in the step, no remat. MaxText (`pip install maxtext`, Python >= 3.12,
in its own environment: it pins a newer jax) runs `maxtext.trainers.pre_train.train` with the
same shapes. Each round runs ours, then MaxText, each in a fresh process; a side's speed is the
median over rounds of its tokens/s, and the ratio ours / MaxText is printed last.

Step times: ours is the mean of `--steps` steps after compile and two warm-up steps (wall
clock, results awaited). MaxText logs `completed step: i, seconds: s` as the time between step
launches: steps 0 and 1 only dispatch, from step 2 on each is one step's work, so its mean is
taken over steps 2 .. steps + 1. Without MaxText (no `--maxtext_python`), ours alone is measured.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = "maxtext_cpu"
# The preset's shapes as MaxText's config keys (maxtext/configs/base.yml).
MAXTEXT_MODEL = dict(decoder_block="llama2", base_num_decoder_layers=4, base_emb_dim=256, base_num_query_heads=4,
                     base_num_kv_heads=4, head_dim=64, base_mlp_dim=1024, vocab_size=32000, max_target_length=512,
                     per_device_batch_size=8, dtype="float32", weight_dtype="float32", attention="dot_product")
TOKENS_PER_STEP = 8 * 512
_MAXTEXT_STEP = re.compile(r"completed step: (\d+), seconds: ([\d.]+)")


def ours(steps: int, loss_chunk: int | None) -> float:
  """Tokens/s of our train step (benchmarks/train_step.py) in a fresh process."""
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), f"--preset={PRESET}",
         f"--steps={steps}", "--xla_flops=off"]
  if loss_chunk is not None:
    cmd.append(f"--loss_chunk={loss_chunk}")
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def maxtext_base_config(python: str) -> str:
  """The base.yml of the MaxText installed for `python`."""
  return subprocess.run([python, "-c", "import maxtext, os; print(os.path.join(os.path.dirname(maxtext.__file__), "
                         "'configs', 'base.yml'))"], check=True, capture_output=True, text=True).stdout.strip()


def maxtext_command(python: str, config: str, steps: int, remat: str, workdir: str) -> list[str]:
  """`config`: MaxText's base.yml (`maxtext_base_config`)."""
  settings = dict(MAXTEXT_MODEL, run_name="peer", base_output_directory=workdir, hardware="cpu",
                  skip_jax_distributed_system="true", dataset_type="synthetic", enable_checkpointing="false",
                  async_checkpointing="false", eval_interval=-1, enable_tensorboard="false", remat_policy=remat,
                  steps=steps + 2)
  return [python, "-m", "maxtext.trainers.pre_train.train", config] + [f"{k}={v}" for k, v in settings.items()]


def maxtext_step_seconds(log: str) -> list[float]:
  """Per-step seconds from MaxText's log, steps 2 on (0 and 1 only dispatch work)."""
  return [float(s) for i, s in _MAXTEXT_STEP.findall(log) if int(i) >= 2]


def maxtext(python: str, config: str, steps: int, remat: str, workdir: str) -> float:
  """Tokens/s of MaxText's train step on the same decoder in a fresh process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", DECOUPLE_GCLOUD="TRUE")
  env.pop("XLA_FLAGS", None)  # one CPU device, as ours
  out = subprocess.run(maxtext_command(python, config, steps, remat, workdir), capture_output=True, text=True,
                       env=env)
  seconds = maxtext_step_seconds(out.stdout + out.stderr)
  if out.returncode or not seconds:
    raise RuntimeError(f"MaxText run failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
  return TOKENS_PER_STEP / statistics.mean(seconds)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--maxtext_python", default=os.environ.get("MAXTEXT_PYTHON", ""),
                      help="Python of an environment with MaxText installed (default: $MAXTEXT_PYTHON)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
  parser.add_argument("--maxtext_remat", default="none", help="MaxText's remat_policy (ours: none)")
  parser.add_argument("--loss_chunk", type=int, default=None,
                      help="our config.train.loss_chunk (default: the config's)")
  parser.add_argument("--workdir", default="/tmp/maxtext_peer")
  args = parser.parse_args(argv)

  runs = {"ours": [], "maxtext": []}
  config = maxtext_base_config(args.maxtext_python) if args.maxtext_python else ""
  for r in range(args.rounds):
    runs["ours"].append(ours(args.steps, args.loss_chunk))
    print(json.dumps(dict(round=r, side="ours", tokens_per_s=runs["ours"][-1])), flush=True)
    if args.maxtext_python:
      runs["maxtext"].append(maxtext(args.maxtext_python, config, args.steps, args.maxtext_remat, args.workdir))
      print(json.dumps(dict(round=r, side="maxtext", tokens_per_s=runs["maxtext"][-1])), flush=True)
  summary = {f"{side}_median_tokens_per_s": statistics.median(v) for side, v in runs.items() if v}
  if runs["maxtext"]:
    summary["ratio"] = summary["ours_median_tokens_per_s"] / summary["maxtext_median_tokens_per_s"]
  print(json.dumps(dict(summary, rounds=args.rounds, steps=args.steps, maxtext_remat=args.maxtext_remat)))


if __name__ == "__main__":
  main()
