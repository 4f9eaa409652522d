"""What a config's train step needs per chip, from an ahead-of-time compile: memory (XLA's memory
analysis), FLOPs (XLA's cost analysis, with the layers its count leaves out added back) and an
estimated step time. Why each is counted as it is: the tool's --help (mm15_jax/plan/main.py)."""

import re
import time

from mm15_jax.plan.chips import TOPOLOGY_RE, Chip, GiB, accelerator_type


def lower_step(config, mesh):
  """(setup, lowered): the real jitted train step, lowered for abstract state and one global batch."""
  import jax

  from mm15_jax import batch as batch_lib
  from mm15_jax.train import state as state_lib
  from mm15_jax.train import step as step_lib
  from mm15_jax.train.config_checks import check_config

  check_config(config, mesh, paths=False)  # a plan reads no checkpoint
  if not config.model.scan_unroll:
    # The FLOP count needs each stack to stay one loop (probe_flops), and auto would unroll
    # on the simulated CPU devices a GPU plan compiles for.
    config = config.copy_and_resolve_references()
    config.model.scan_unroll = 1
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


# A step's compiled FLOPs against the model's: at least ~1 (0.98-0.99 measured without remat, more
# with its recompute); below this the cost analysis missed part of the step.
UNDERCOUNT = 0.95


# The lowered module's functions, the calls in each, and the cost estimates Pallas TPU kernels
# carry in their backend config (which XLA's cost analysis adds up as they say).
_FUNCTION = re.compile(r"^  func\.func (?:public |private )?@([\w.$-]+)\(", re.M)
_CALL = re.compile(r"\bcall @([\w.$-]+)\(")
_KERNEL_FLOPS = re.compile(r"\\22cost_estimate\\22: \{[^}]*?\\22flops\\22:\s*(\d+)")
# megablox's entry points (jitted, so each is one function of the module, gmm_N for variants).
_GROUPED_MATMUL = re.compile(r"t?gmm(_\d+)?")


def grouped_matmul_flops(lowered_text: str) -> float:
  """FLOPs the grouped-matmul kernels' own estimates give XLA for one run of the lowered module.

  The module is a call graph (a function called from three places runs three times); a loop's
  body is counted once, as XLA's cost analysis counts it.
  """
  starts = [(m.group(1), m.start()) for m in _FUNCTION.finditer(lowered_text)]
  bodies = {name: lowered_text[start:end] for (name, start), (_, end) in
            zip(starts, starts[1:] + [("", len(lowered_text))])}
  memo = {}

  def total(name: str, inside: bool) -> float:
    inside = inside or bool(_GROUPED_MATMUL.fullmatch(name))
    if (name, inside) not in memo:
      body = bodies.get(name, "")
      own = sum(float(f) for f in _KERNEL_FLOPS.findall(body)) if inside else 0.0
      memo[name, inside] = own + sum(total(callee, inside) for callee in _CALL.findall(body))
    return memo[name, inside]

  return total("main", False)


def routed_rows_overcount(lowered, config, mesh) -> float:
  """FLOPs XLA counts for rows the dropless MoE's grouped matmul never computes.

  With expert parallelism each shard's receive buffer holds the worst case, every shard's rows
  (models/moe.py `_ragged_path`), and the kernel's cost estimate is sized by the buffer, while
  its grid only visits the rows routed there: ep x the work under balanced routing. Counted
  here as (1 - 1/ep) of the kernels' FLOPs (README, "Planning a pod").
  """
  from mm15_jax import sharding as shd
  from mm15_jax.models.moe import expert_mesh_axes

  if not config.model.moe.num_experts:
    return 0.0
  ep = shd.axis_size(expert_mesh_axes(mesh, config.sharding_rules), mesh)
  if ep == 1:
    return 0.0
  return grouped_matmul_flops(lowered.as_text()) * (1 - 1 / ep)  # the text only where it counts


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

  `scanned_flops` is XLA's count for the step as compiled: each layer stack's loop body once
  (less the grouped-matmul rows never computed: `routed_rows_overcount`, for the probe too). A
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
  probe_lowered = lower_step(probe, mesh)[1]
  doubled = _costs(compile_lowered(probe_lowered, mesh))["flops"] - routed_rows_overcount(
      probe_lowered, config, mesh)
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
  # XLA counts the dropless MoE kernels' worst-case rows; the step computes the routed ones. The
  # cost model's seconds per FLOP below then apply to the FLOPs computed.
  overcount = routed_rows_overcount(lowered, config, mesh)
  if overcount:
    notes.append(f"grouped-matmul rows never computed, not counted: {overcount:.3g} FLOPs per chip as compiled")
  flops = probe_flops(config, mesh, setup, raw["flops"] - overcount)
  if flops * chips < UNDERCOUNT * model_flops:
    # A step computes at least the model's FLOPs; fewer counted means the cost analysis missed part
    # of it (seen with remat "proj_offload" on TPU), so neither its FLOPs nor its seconds are usable.
    notes.append(f"XLA's cost analysis counts {flops * chips / model_flops:.2f}x the model FLOPs, less than the "
                 f"step must compute: no step time or MFU estimate")
    return dict(report, flops_per_step=None, estimated_step_s=None, estimated_mfu=None)
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
