"""Ahead-of-time pod planner: does a config fit a TPU topology (or N GPUs), and how fast could it go?

  python -m mm15_jax.plan --config=experiments/mm15_30b.py                  # on its c.topology
  python -m mm15_jax.plan --config=experiments/mm15_7b.py --topology=v5p:4x4x8 --json
  python -m mm15_jax.plan --config=experiments/mm15_7b.py --devices=64 --device_memory_gib=80 --device_peak_tflops=989
  python -m mm15_jax.plan --sweep --config=experiments/mm15_1b.py --sizes=1b,3b,7b,30b \
      --topologies=v5p:2x4x4,v5p:4x4x4,v5p:4x4x8 --remat=full,dots [--noprobe]

The real train step (train/step.py) is lowered with the abstract state and one global batch,
both carrying their shardings, and compiled ahead of time; nothing is allocated. The config's
hardware rules apply as in the trainer (matched against the device kind and the Cloud TPU slice
name, e.g. "v5p-128"). TPU chips come from `jax.experimental.topologies` (libtpu; no TPU and no
TPU backend needed, so this runs with JAX_PLATFORMS=cpu; libtpu warns that TPU_ACCELERATOR_TYPE
is unset, which is harmless). GPU clusters are planned on N simulated CPU devices: XLA:CPU's
memory analysis only approximates what XLA:GPU would allocate.

What the report counts:
  memory per chip  XLA's memory analysis of the compiled step: arguments (state and batch shards)
                   + outputs - outputs aliased to donated arguments (the state is updated in place)
                   + temporaries + generated code, against the chip's HBM (TPU_GENERATIONS).
                   XLA:TPU refuses to compile a step above its own limit (libtpu 0.0.52: v5p 95.73,
                   v5e 15.75, v4 30.75, v6e 31.24 GiB): that is reported as not fitting, with what
                   the compiler says it needed.
  FLOPs            XLA's cost analysis is per chip, and it counts the body of a loop once whatever its
                   trip count: our decoder and encoder are `scan`s over stacked layers, so the step as
                   compiled counts one layer of each (and one chunk of the fused loss's loop, added
                   by formula: `head_chunks_left_out`). A probe compiled with `scan_unroll=2` counts two:
                   the difference, one decoder and one encoder layer, is added for every layer left out,
                   split between the stacks by their model FLOPs (`probe_flops`). With remat the
                   compiled count includes the recomputation; the model count (train/flops.py, 6N +
                   attention) does not. `--noprobe` saves that compile and reports memory only.
  step time        XLA's TPU cost model (`optimal_seconds`) of the step as compiled, scaled by
                   compiled FLOPs / the FLOPs it counted: its seconds per FLOP, applied to the layers
                   it left out (the fused loss's left-out chunks, dense matmuls, at the chip's
                   peak). That model adds -1 s for each op it cannot model: a total faster than
                   the peak (or no model: GPU plans on CPU) falls back to compiled FLOPs / peak. A
                   model of the chip, not a measurement: the MFU it implies, model FLOPs / (step time
                   x chips x peak), is an upper bound.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags

from data_pipelines.progress import Progress
from mm15_jax import cli


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str  # the device_kind libtpu reports (or a label for simulated devices)
  hbm_bytes: float
  peak_flops: float  # bf16 dense, per chip
  simulated: bool = False  # memory from an XLA:CPU compile: an approximation


GiB = 2**30

# TPU generations as topology names spell them -> (device_kind libtpu reports, chip config, HBM GiB,
# bf16 peak TFLOP/s from the data sheets). v4 and v5p chips have two TensorCores that JAX drives as
# one device ("megacore"); without it libtpu would list one device per core.
TPU_GENERATIONS = {
    "v4": ("TPU v4", "megacore", 32, 275),
    "v5e": ("TPU v5 lite", "default", 16, 197),
    "v5p": ("TPU v5", "megacore", 95, 459),
    "v6e": ("TPU v6 lite", "default", 32, 918),
}
TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e):\d+x\d+(x\d+)?$")
# Cloud TPU accelerator types ($TPU_ACCELERATOR_TYPE, which the trainer's hardware rules also match):
# v4 and v5p count TensorCores, two per chip; v5e and v6e count chips.
ACCELERATOR_TYPES = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5e": ("v5litepod", 1), "v6e": ("v6e", 1)}


def tpu_generation(topology: str) -> str:
  """'v5p:4x4x8' -> 'v5p'; a clear error for anything that is not a topology name."""
  match = TOPOLOGY_RE.match(topology or "")
  if not match:
    raise ValueError(
        f"--topology={topology!r}: expected GENERATION:AxB (v5e, v6e) or GENERATION:AxBxC (v4, v5p) with "
        f"GENERATION one of {sorted(TPU_GENERATIONS)}, e.g. --topology=v5p:4x4x8")
  return match.group(1)


def tpu_chip(topology: str, memory_gib: float = 0.0, peak_tflops: float = 0.0) -> Chip:
  kind, _, hbm_gib, tflops = TPU_GENERATIONS[tpu_generation(topology)]
  return Chip(kind, (memory_gib or hbm_gib) * GiB, (peak_tflops or tflops) * 1e12)


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """The chips of a TPU topology as compile-only devices (libtpu; no TPU backend needed);
  `num_slices` > 1: that many such slices (multi-slice), each device carrying its slice_index."""
  generation = tpu_generation(topology)
  # Compile-only use: let plans run beside each other (and beside a job) without libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name=TPU_GENERATIONS[generation][1],
        num_slices=num_slices)
  except Exception as e:  # no libtpu, or a shape libtpu does not build
    text = str(e).lower()
    if isinstance(e, ImportError) or "not found" in text or "no module" in text:
      hint = "install libtpu (pip install -e '.[tpu]')"
    elif "lockfile" in text:
      hint = "another process holds libtpu: set ALLOW_MULTIPLE_LIBTPU_LOAD=1"
    else:
      hint = "use a shape of whole hosts, e.g. v5p:2x2x1, v5p:2x2x2, v5p:4x4x8, v5e:2x2, v5e:16x16"
    raise ValueError(f"--topology={topology!r}: libtpu could not build it ({e}); {hint}") from e
  kind = TPU_GENERATIONS[generation][0]
  if desc.devices[0].device_kind != kind:
    raise ValueError(f"--topology={topology!r}: libtpu reports device kind {desc.devices[0].device_kind!r}, "
                     f"expected {kind!r}; update TPU_GENERATIONS in mm15_jax/plan.py")
  return list(desc.devices)


def simulated_devices(n: int) -> list:
  import jax
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise ValueError(
        f"--devices={n}: this process has {len(devices)} CPU devices; the CLI re-runs itself with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} JAX_PLATFORMS=cpu, or set that yourself")
  return devices[:n]


def lower_step(config, mesh):
  """(setup, lowered): the real jitted train step, lowered for abstract state and one global batch."""
  import jax

  from mm15_jax import batch as batch_lib
  from mm15_jax.train import state as state_lib
  from mm15_jax.train import step as step_lib
  from mm15_jax.train.config_checks import check_config

  check_config(config, mesh, paths=False)  # a plan reads no checkpoint
  setup = state_lib.make_setup(config, mesh)
  batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=setup.batch_sharding(len(shape)))
           for name, (shape, dtype) in batch_lib.shapes_for_config(config).items()}
  return setup, step_lib.jit_train_step(setup).lower(setup.abstract_state, batch)


def compile_lowered(lowered, mesh):
  import jax

  # Compile-only TPU executables cannot be loaded back from JAX's persistent cache: skip it.
  previous = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", previous and mesh.devices.flat[0].platform != "tpu")
  try:
    return lowered.compile()
  finally:
    jax.config.update("jax_enable_compilation_cache", previous)


def compile_step(config, mesh):
  """(setup, compiled): the real train step compiled ahead of time for `mesh`."""
  setup, lowered = lower_step(config, mesh)
  return setup, compile_lowered(lowered, mesh)


def out_of_memory_bytes(message: str) -> float | None:
  """XLA:TPU refuses to compile a step that does not fit: what it says it needed, in bytes."""
  match = re.search(r"required for [^(]*\(([\d.]+)G\)|Used ([\d.]+)G of", message)
  return float(match.group(1) or match.group(2)) * GiB if match else None


def _costs(compiled) -> dict:
  costs = compiled.cost_analysis()
  costs = costs[0] if isinstance(costs, (list, tuple)) else costs  # older jax: one dict per program
  return {"flops": float(costs.get("flops", 0.0)), "seconds": float(costs.get("optimal_seconds", 0.0))}


def memory_per_chip(compiled) -> dict:
  m = compiled.memory_analysis()
  out = dict(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
             alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
             code_bytes=m.generated_code_size_in_bytes)
  out["bytes_per_chip"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                           + out["temp_bytes"] + out["code_bytes"])
  return out


def layer_units(config) -> tuple[int, int]:
  """(scanned decoder units, encoder layers): an MoE decoder scans groups of `interval` layers."""
  moe = config.model.moe
  group = moe.interval if moe.num_experts else 1
  return config.model.llm.n_layers // group, config.model.vit.depth


def layer_model_flops(config, setup) -> tuple[float, float]:
  """Model FLOPs (6N + attention, as train/flops.py) of one scanned decoder unit and one encoder layer."""
  from mm15_jax.train.flops import param_counts

  m, b, seq = config.model, config.train.batch_size, config.data.seq_len
  units, depth = layer_units(config)
  llm_layers = {"layers": setup.abstract_params["llm"]["layers"]}
  active = param_counts(llm_layers, {"layers": setup.logical["llm"]["layers"]}, m.moe.top_k, m.moe.num_experts)
  per_token = 6 * active["active"] / units + 12 * (m.llm.n_layers // units) * m.llm.n_heads * m.llm.head_dim * seq
  vit_params = param_counts({"layers": setup.abstract_params["vit"]["layers"]})["total"] / depth
  patches = (m.vit.image_size // m.vit.patch_size) ** 2
  per_tile = 6 * vit_params * patches + 12 * m.vit.width * patches**2
  return b * seq * per_token, b * config.data.max_tiles * per_tile


def probe_flops(config, mesh, setup, scanned_flops: float) -> float:
  """Per-chip FLOPs of the whole step with every layer counted.

  `scanned_flops` is XLA's count for the step as compiled: each layer stack's loop body once. A
  probe with `scan_unroll=2` (and 4 layers per stack, so both stay loops and remat is not undone
  by CSE) counts each body twice: the difference is one decoder unit plus one encoder layer. The
  layers left out are added in that unit, split between the stacks as their model FLOPs are.
  With grad_accum > 1 the accumulation loop is counted once too: the result is scaled by it
  (which counts the optimizer update grad_accum times, a small overcount).
  """
  moe = config.model.moe
  probe = config.copy_and_resolve_references()
  probe.model.llm.n_layers = 4 * (moe.interval if moe.num_experts else 1)
  probe.model.vit.depth = 4
  probe.model.scan_unroll = 2
  doubled = _costs(compile_step(probe, mesh)[1])["flops"]
  llm_unit, vit_layer = layer_model_flops(config, setup)
  units, depth = layer_units(config)
  left_out = ((units - 1) * llm_unit + (depth - 1) * vit_layer) / (llm_unit + vit_layer)
  return config.train.grad_accum * (scanned_flops + left_out * (doubled - scanned_flops)) + head_chunks_left_out(
      config, mesh.size)


def head_chunks_left_out(config, chips: int) -> float:
  """Per-chip FLOPs of the LM-head chunks XLA's count leaves out: the fused loss (train/loss.py)
  loops over seq_len / loss_chunk chunks and is counted once, like a layer stack. Each chunk is
  three matmuls of 2·tokens·d·vocab FLOPs (logits, and the gradients to the hidden state and
  the head), spread evenly over the chips."""
  from mm15_jax.train import step as step_lib

  seq = config.data.seq_len
  chunk = step_lib.loss_chunk(config, seq)
  if not chunk:
    return 0.0
  llm = config.model.llm
  head = 6 * config.train.batch_size * seq * llm.d_model * llm.vocab_size
  return head * (1 - chunk / seq) / chips


def accelerator_type(topology: str, chips: int) -> str:
  """'v5p:4x4x4' on 64 chips -> 'v5p-128', as Cloud TPU names that slice."""
  prefix, per_chip = ACCELERATOR_TYPES[tpu_generation(topology)]
  return f"{prefix}-{per_chip * chips}"


def plan(config, devices, chip: Chip, label: str, probe: bool = True, name: str = "", keep=()) -> dict:
  """Compiles the config's train step for `devices` and reports memory, FLOPs and step time per chip.

  `label` names the devices (a TPU topology or "N GPUs"), `name` the config (its experiment file).
  The config's hardware rules are applied as the trainer applies them, except to the fields in
  `keep` (those set on the command line).
  """
  from mm15_jax import sharding as shd
  from mm15_jax.hardware_rules import apply_hardware_rules
  from mm15_jax.train import flops as flops_lib

  chips = len(devices)
  notes = []
  # Rules see one slice's type, as each host of a multi-slice job does ("2x v5p:2x2x1" -> "v5p-8").
  slices, _, topology = label.rpartition("x ")
  slice_type = accelerator_type(topology, chips // int(slices or 1)) if TOPOLOGY_RE.match(topology) else ""
  config = apply_hardware_rules(config, chip.kind, slice_type, keep=set(keep), report=notes.append)
  try:  # a mesh or a batch that does not fit these chips: before any compile
    mesh = shd.mesh_for_config(config, devices)  # config.mesh_dcn > 1: a multi-slice (hybrid) mesh
    setup, lowered = lower_step(config, mesh)
  except ValueError as e:
    raise ValueError(f"{label} ({chips} chips): {e}") from e
  moe = config.model.moe
  counts = flops_lib.param_counts(setup.abstract_params, setup.logical, moe.top_k, moe.num_experts)
  model_flops = flops_lib.flops_per_step(config, counts)
  report = dict(
      config=name or f"llm {config.model.llm.d_model}x{config.model.llm.n_layers}", topology=label,
      device_kind=chip.kind, chips=chips, mesh=dict(mesh.shape), remat=config.model.remat,
      batch_size=config.train.batch_size, grad_accum=config.train.grad_accum, seq_len=config.data.seq_len,
      params=counts["total"], active_params=counts["active"], hbm_bytes_per_chip=chip.hbm_bytes,
      peak_flops_per_chip=chip.peak_flops, model_flops_per_step=model_flops, notes=notes)
  start = time.perf_counter()
  try:
    compiled = compile_lowered(lowered, mesh)
  except Exception as e:  # XLA:TPU does not compile a step that does not fit in the chip's memory
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    notes.append(str(e).splitlines()[0])
    return dict(report, fits=False, bytes_per_chip=out_of_memory_bytes(str(e)), flops_per_step=None,
                estimated_step_s=None, estimated_mfu=None, compile_s=round(time.perf_counter() - start, 1))
  memory = memory_per_chip(compiled)
  raw = _costs(compiled)
  report.update(fits=memory["bytes_per_chip"] <= chip.hbm_bytes, **memory,
                xla_as_reported=dict(flops_per_chip=raw["flops"], optimal_seconds=raw["seconds"]),
                compile_s=round(time.perf_counter() - start, 1))
  if chip.simulated:
    notes.append("memory from an XLA:CPU compile: an approximation of what XLA:GPU allocates")
  if not probe:
    notes.append("no probe: XLA counted each scanned layer stack once, so no FLOPs or step time")
    return dict(report, flops_per_step=None, estimated_step_s=None, estimated_mfu=None)
  if moe.num_experts and moe.interval > 2:
    notes.append("MoE interval > 2 nests a scan in each scanned group: the probe's FLOPs are approximate")
  flops = probe_flops(config, mesh, setup, raw["flops"])
  if raw["seconds"] >= raw["flops"] / chip.peak_flops:  # the cost model's seconds per FLOP, for every FLOP
    # ... except the fused loss's left-out chunks: dense matmuls, at the chip's peak (an average
    # rate that counts norms and softmaxes would make them, and so the loss chunking, look slow).
    head = head_chunks_left_out(config, chips)
    seconds = raw["seconds"] * (flops - head) / raw["flops"] + head / chip.peak_flops
    source = "xla_cost_model"
  else:  # XLA:CPU has no model of the chip; the TPU one adds -1 s per op it cannot model
    seconds, source = flops / chip.peak_flops, "flops/peak"
  return dict(report, flops_per_step=flops * chips, estimated_step_s=seconds, step_time_source=source,
              estimated_mfu=model_flops / (seconds * chips * chip.peak_flops))


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
  lines = [f"{'config':<28}{'remat':<7}{'topology':<14}{'chips':>6}{'GiB/chip':>10}{'HBM':>6}  fits"
           f"{'step s':>9}{'MFU<=':>8}"]
  for r in reports:
    head = f"{r['config']:<28}{r['remat']:<7}{r['topology']:<14}"
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


def num_slices(config) -> int:
  """Slices the config's mesh spans: the product of config.mesh_dcn (1 without it)."""
  return math.prod(int(v) for v in dict(config.get("mesh_dcn") or {}).values()) or 1


def _target(flag_values):
  """(devices, chip, label) for --topology (default: the config's `topology`) or --devices."""
  f = flag_values
  if f.topology and f.devices:
    raise ValueError("give --topology (a TPU slice) or --devices (N simulated GPUs), not both")
  topology = f.topology or ("" if f.devices else f.config.topology)
  if topology:
    chip = tpu_chip(topology, f.device_memory_gib, f.device_peak_tflops)
    slices = num_slices(f.config)
    return tpu_devices(topology, slices), chip, topology if slices == 1 else f"{slices}x {topology}"
  if not f.devices:
    raise ValueError("give --topology=GENERATION:SHAPE (e.g. v5p:4x4x8) or --devices=N; the config sets no topology")
  if not f.device_memory_gib or not f.device_peak_tflops:
    raise ValueError("--devices=N needs --device_memory_gib and --device_peak_tflops (H100: 80 and 989)")
  chip = Chip(f.device_kind, f.device_memory_gib * GiB, f.device_peak_tflops * 1e12, simulated=True)
  return simulated_devices(f.devices), chip, f"{f.devices} GPUs"


def _sweep_configs(flag_values) -> list:
  """The --config experiment, or its siblings mm15_{size}.py for --sizes, with the same overrides."""
  from mm15_jax import configs

  config_flag = flag_values["config"]
  spec = config_flags.get_config_filename(config_flag)
  if not flag_values.sizes:
    return [(spec, flag_values.config)]
  path, _, arg = spec.partition(":")
  overrides = config_flags.get_override_values(config_flag)
  out = []
  for size in flag_values.sizes:
    sibling = os.path.join(os.path.dirname(path), f"mm15_{size}.py") + (f":{arg}" if arg else "")
    config = configs.load_experiment(sibling)
    for dotted, value in overrides.items():
      *parents, leaf = dotted.split(".")
      node = config
      for key in parents:
        node = node[key]
      node[leaf] = value
    out.append((sibling, config))
  return out


def _reexec_with_devices(n: int, argv: list) -> int:
  """XLA fixes the CPU device count when the backend starts: plan N devices in a fresh process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", MM15_PLAN_CHILD="1")
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count={n}".strip()
  return subprocess.run([sys.executable, "-m", "mm15_jax.plan", *argv[1:]], env=env).returncode


def define_flags(flag_values=flags.FLAGS, argv=None):
  """Flags are defined when the tool runs, not at import, so tests may import several tools.

  `argv` (default: sys.argv) is where `--config.FIELD=value` overrides are looked for.
  """
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file("config", None, cli.CONFIG_HELP, lock_config=True,
                                  sys_argv=argv, **fv)
  flags.DEFINE_string("topology", "", "TPU topology, e.g. v5p:4x4x8, v5e:16x16 (default: config.topology).", **fv)
  flags.DEFINE_integer("devices", 0, "Plan N simulated devices (a GPU cluster) instead of a TPU topology.", **fv)
  flags.DEFINE_float("device_memory_gib", 0.0, "Memory per device, GiB (TPU default: the chip's HBM).", **fv)
  flags.DEFINE_float("device_peak_tflops", 0.0, "bf16 peak per device (TPU default: the data sheet).", **fv)
  flags.DEFINE_string("device_kind", "GPU", "--devices: the device kind hardware rules match, e.g. 'NVIDIA H100'.",
                      **fv)
  flags.DEFINE_bool("probe", True, "Compile a probe so that FLOPs and step time count every layer.", **fv)
  flags.DEFINE_bool("json", False, "Print one JSON object per planned case.", **fv)
  flags.DEFINE_bool("sweep", False, "Plan --sizes x --topologies x --remat; report the smallest that fits.", **fv)
  flags.DEFINE_list("sizes", [], "Sweep: experiment files mm15_{size}.py beside --config (e.g. 1b,3b,1b_moe).", **fv)
  flags.DEFINE_list("topologies", [], "Sweep: TPU topologies, e.g. v5p:2x2x1,v5p:2x2x2,v5p:2x2x4.", **fv)
  flags.DEFINE_list("remat", [], "Sweep: remat policies (default: the config's).", **fv)


def execute(f, argv=None) -> list[dict]:
  """The CLI behind parsed flags `f`: prints the plans and returns their reports.

  `argv` is re-run in a fresh process when --devices asks for more CPU devices than this one has.
  """
  import jax

  child = os.environ.get("MM15_PLAN_CHILD") == "1"  # already re-run once: never again
  if f.devices and not f.topology and not child and len(jax.devices("cpu")) < f.devices:
    code = _reexec_with_devices(f.devices, argv or sys.argv)
    if code:
      raise ValueError(f"the plan for --devices={f.devices} failed in its subprocess (exit code {code})")
    return []
  if not f.sweep:
    devices, chip, label = _target(f)
    keep = config_flags.get_override_values(f["config"])
    report = plan(f.config, devices, chip, label, f.probe, config_flags.get_config_filename(f["config"]), keep)
    print(json.dumps(report) if f.json else format_report(report))
    return [report]
  reports = []
  keep = set(config_flags.get_override_values(f["config"])) | ({"model.remat"} if f.remat else set())
  cases = _sweep_configs(f)
  for spec, config in cases:
    if not (f.topologies or f.topology or config.topology):
      raise ValueError(f"{spec} sets no topology: give --topologies (e.g. --topologies=v5p:2x2x1,v5p:2x2x2)")
  total = sum(len(f.topologies or [1]) * len(f.remat or [1]) for _ in cases)
  bar = Progress(total, "plan --sweep", "cases", every_s=0)  # each case compiles for minutes: a line each
  for spec, config in cases:
    topologies = f.topologies or [f.topology or config.topology]
    for topology in topologies:
      for remat in f.remat or [config.model.remat]:
        config.model.remat = remat
        try:
          chip = tpu_chip(topology, f.device_memory_gib, f.device_peak_tflops)
          slices = num_slices(config)
          label = topology if slices == 1 else f"{slices}x {topology}"
          report = plan(config, tpu_devices(topology, slices), chip, label, f.probe, spec, keep)
        except ValueError as e:  # the mesh or the batch does not fit these chips: a row, not the end
          report = dict(config=spec, topology=topology, remat=remat, fits=False, error=str(e))
        reports.append(report)
        print(json.dumps(report) if f.json else f"planned {spec} on {topology}, remat={remat}", flush=True)
        bar.update()
  bar.close()
  if not f.json:
    print(format_sweep(reports))
  return reports


def main(argv):
  del argv
  from mm15_jax import distributed

  distributed.initialize()
  # Several processes (a pod's job running the planner): each plans the same, process 0 prints.
  quiet = contextlib.nullcontext() if distributed.is_main() else contextlib.redirect_stdout(io.StringIO())
  try:
    with quiet:
      execute(flags.FLAGS)
  except ValueError as e:
    sys.exit(f"error: {e}")


def run():
  from mm15_jax import distributed

  # Plans compile for TPU topologies or simulated devices: never probe for local accelerators.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  distributed.define_flags()
  define_flags()
  cli.run(main, __doc__, required=["config"])


if __name__ == "__main__":
  run()
