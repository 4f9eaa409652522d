"""A plan's report as text: one case in full, a sweep as a table with the smallest topology that fits
and the remat policy to use on each."""

import re

from mm15_jax.plan.chips import TOPOLOGY_RE, GiB, accelerator_type

# Estimated MFUs this close count as equal when choosing a remat policy: XLA's cost model is a
# model, and a fraction of a point does not pay for gigabytes of HBM.
MFU_TIE = 0.005


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
  width = max([28, *(len(r["config"]) + 2 for r in reports)])  # a long FILE:stage keeps its column
  lines = [f"{'config':<{width}}{'remat':<14}{'topology':<14}{'chips':>6}{'GiB/chip':>10}{'HBM':>6}  fits"
           f"{'step s':>9}{'MFU<=':>8}"]
  for r in reports:
    head = f"{r['config']:<{width}}{r['remat']:<14}{r['topology']:<14}"
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
  choices = best_remat(reports)
  if any(len({r["remat"] for r in reports if (r["config"], r["topology"]) == key}) > 1 for key in choices):
    lines.append("remat to use (highest estimated MFU that fits; within "
                 f"{100 * MFU_TIE:g} points of it, the least memory):")
    for (config, topology), r in choices.items():
      lines.append(f"  {config} on {topology}: " + (f"{r['remat']}  {hardware_rule(r)}" if r else "none fits"))
  return "\n".join(lines)


def best_remat(reports: list[dict]) -> dict:
  """(config, topology) -> the report of the remat policy to use there, None if none fits.

  The highest estimated MFU among the cases that fit; any within MFU_TIE of it with less memory
  per chip wins. Cases planned without a step-time estimate (--noprobe) are ranked by memory.
  """
  groups: dict = {}
  for r in reports:
    groups.setdefault((r["config"], r["topology"]), []).append(r)
  out = {}
  for key, rows in groups.items():
    fitting = [r for r in rows if r.get("fits")]
    if not fitting:
      out[key] = None
      continue
    top = max(r.get("estimated_mfu") or 0.0 for r in fitting)
    near = [r for r in fitting if (r.get("estimated_mfu") or 0.0) >= top - MFU_TIE]
    out[key] = min(near, key=lambda r: r["bytes_per_chip"])
  return out


def hardware_rule(r: dict) -> str:
  """The experiment file's line that applies r's remat on r's slice (TPU topologies only)."""
  label = r["topology"]
  slices = re.match(r"^(\d+)x (.*)$", label)
  topology, count = (slices.group(2), int(slices.group(1))) if slices else (label, 1)
  if not TOPOLOGY_RE.match(topology):
    return ""
  slice_type = accelerator_type(topology, r["chips"] // count)
  return f'hardware_rules: (r"^{slice_type}$", {{"model.remat": "{r["remat"]}"}})'
