#!/usr/bin/env bash
# The GPU benchmark suite recorded in benchmarks/RESULTS.md; writes JSON lines under $OUT.
#   OUT=/tmp/results bash benchmarks/gpu_suite.sh
#   PARTS=moe OUT=/tmp/results bash benchmarks/gpu_suite.sh        # one part (dense, moe, generation)
# The MoE part's tokamax path needs tokamax (the gpu extra). On a machine without a network,
# download it beforehand and point WHEELS at the folder:
#   pip download --no-deps -d wheels tokamax qwix einshape jaxtyping typeguard==2.13.3 wadler_lindig
#   WHEELS=wheels PARTS=moe bash benchmarks/gpu_suite.sh
set -u
parts=" ${PARTS:-dense moe generation} "
out=${OUT:-.}/train_step.jsonl
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "${OUT:-.}/gpu.txt"
run() { timeout 240 python3 benchmarks/train_step.py --steps=10 "$@" 2>&1 | grep '^{' | tee -a "$out"; }
if [[ $parts == *" dense "* ]]; then
  run --preset=llm_1b --attention=cudnn --remat=full
  run --preset=llm_1b --attention=cudnn --remat=dots
  run --preset=llm_1b --attention=cudnn --remat=dots --loss_chunk=0   # whole logits, for the fused loss's gain
  run --preset=llm_1b --attention=xla --remat=full
  run --preset=mm15_1b --attention=cudnn --remat=full
fi
if [[ $parts == *" moe "* ]]; then
  if [[ -n ${WHEELS:-} ]]; then python3 -m pip install -q --no-index --find-links "$WHEELS" tokamax; fi
  # Dropless MoE: the layer's paths against a same-run matmul at the paper shape, then the
  # 1B-MoE decoder's train step per path.
  timeout 300 python3 benchmarks/moe_layer.py --d=2048 --f=8192 --experts=64 --top_k=2 --tokens=16384 \
    --dtype=bfloat16 --steps=10 --impls=ragged,blocked,tokamax,capacity 2>&1 | grep '^{' | tee "${OUT:-.}/moe_layer.jsonl"
  run --preset=llm_1b_moe_2l --attention=cudnn --moe_impl=tokamax
  run --preset=llm_1b_moe_2l --attention=cudnn --moe_impl=blocked
  run --preset=llm_1b_moe_2l --attention=cudnn --moe_impl=capacity
fi
if [[ $parts == *" generation "* ]]; then
  timeout 240 python3 benchmarks/generation.py --experiment=experiments/mm15_1b.py --steps_per_call=1,8 2>&1 \
    | grep '^{' | tee "${OUT:-.}/generation.jsonl"
fi
