"""A plan's report as text: one case in full, a sweep as a table with the smallest topology that fits."""

from mm15_jax.plan.chips import GiB


def format_report(r: dict) -> str:
  gib = lambda b: f"{b / GiB:8.2f} GiB"
  mesh = " ".join(f"{a}={s}" for a, s in r["mesh"].items())
  lines = [
      f"config    {r['config']}  (remat {r['remat']}, batch {r['batch_size']} x {r['seq_len']}, "
      f"grad_accum {r['grad_accum']}, {r['params']:.3g} params, {r['active_params']:.3g} active per token)",
      f"topology  {r['topology']}: {r['chips']} x {r['device_kind']} ({r['hbm_bytes_per_chip'] / GiB:g} GiB, "
      f"{r['peak_flops_per_chip'] / 1e12:g} TFLOP/s bf16 each); mesh {mesh}",
  ]
  if "temp_bytes" not in r:  # XLA refused to compile it: out of memory
    needed = f"needs {r['bytes_per_chip'] / GiB:.2f} GiB" if r["bytes_per_chip"] else "needs more"
    lines.append(f"memory per chip: DOES NOT FIT, the compiler {needed} of {r['hbm_bytes_per_chip'] / GiB:g} GiB")
    return "\n".join(lines + [f"note: {n}" for n in r["notes"]])
  lines += [
      "memory per chip (XLA memory analysis)",
      f"  arguments       {gib(r['argument_bytes'])}  state and batch shards",
      f"  outputs         {gib(r['output_bytes'])}",
      f"  aliased        -{gib(r['alias_bytes'])}  outputs written into the donated state",
      f"  temporaries     {gib(r['temp_bytes'])}",
      f"  generated code  {gib(r['code_bytes'])}",
      f"  total           {gib(r['bytes_per_chip'])}  of {r['hbm_bytes_per_chip'] / GiB:g} GiB: "
      + ("FITS" if r["fits"] else "DOES NOT FIT") + f" ({r['bytes_per_chip'] / r['hbm_bytes_per_chip']:.0%})",
      f"compiled in {r['compile_s']} s",
  ]
  if r["flops_per_step"] is not None:
    lines += [
        "FLOPs per step",
        f"  compiled (XLA cost analysis, all chips)  {r['flops_per_step']:.3e}",
        f"  model (6N + attention, train/flops.py)   {r['model_flops_per_step']:.3e}"
        f"  (compiled / model = {r['flops_per_step'] / r['model_flops_per_step']:.2f})",
        f"step time ({r['step_time_source']})  {r['estimated_step_s']:.3g} s -> MFU at most {r['estimated_mfu']:.1%}",
    ]
  return "\n".join(lines + [f"note: {n}" for n in r["notes"]])


def smallest_fitting(reports: list[dict]) -> dict:
  """(config, remat) -> the topology with the fewest chips that fits (None if none does)."""
  best: dict = {}
  for r in reports:
    key = (r["config"], r["remat"])
    best.setdefault(key, None)
    if r.get("fits") and (best[key] is None or r["chips"] < best[key]["chips"]):
      best[key] = r
  return {key: (r["topology"] if r else None) for key, r in best.items()}


def format_sweep(reports: list[dict]) -> str:
  lines = [f"{'config':<28}{'remat':<14}{'topology':<14}{'chips':>6}{'GiB/chip':>10}{'HBM':>6}  fits"
           f"{'step s':>9}{'MFU<=':>8}"]
  for r in reports:
    head = f"{r['config']:<28}{r['remat']:<14}{r['topology']:<14}"
    if "error" in r:
      lines.append(f"{head}{'':>6}  error: {r['error'].splitlines()[0][:200]}")
      continue
    used = f"{r['bytes_per_chip'] / GiB:.1f}" if r["bytes_per_chip"] else "?"
    used = f"{used if 'temp_bytes' in r else '>' + used:>10}"  # refused: what the compiler said, at least
    speed = (f"{r['estimated_step_s']:>9.2f}{r['estimated_mfu']:>8.1%}" if r["estimated_step_s"]
             else f"{'-':>9}{'-':>8}")
    lines.append(f"{head}{r['chips']:>6}{used}{r['hbm_bytes_per_chip'] / GiB:>6.0f}"
                 f"  {'yes' if r['fits'] else 'no ':<4}{speed}")
  lines.append("smallest topology that fits:")
  for (config, remat), topology in smallest_fitting(reports).items():
    lines.append(f"  {config} remat={remat}: {topology or 'none of those planned'}")
  return "\n".join(lines)
