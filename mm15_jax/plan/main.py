"""Ahead-of-time pod planner: does a config fit a TPU topology (or N GPUs), and how fast could it go?

  python -m mm15_jax.plan --config=experiments/mm15_30b.py                  # on its c.topology
  python -m mm15_jax.plan --config=experiments/mm15_7b.py --topology=v5p:4x4x8 --json
  python -m mm15_jax.plan --config=experiments/mm15_7b.py --devices=64 --device_memory_gib=80 --device_peak_tflops=989
  python -m mm15_jax.plan --sweep --config=experiments/mm15_1b.py --sizes=1b,3b,7b,30b \
      --topologies=v5p:2x4x4,v5p:4x4x4,v5p:4x4x8 --remat=full,dots [--noprobe]
  python -m mm15_jax.plan --sweep --config=experiments/mm15_3b.py --remat=full,qkv,proj  # remat to use

A sweep ends with the smallest topology that fits each (config, remat) and, where several remat
policies were planned, the one to use on each slice (the highest estimated MFU that fits; within
half a point, the least memory) with the `hardware_rules` entry that sets it there.

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
                   Dropless MoE with expert parallelism: the megablox kernel's own estimate, which
                   XLA adds up, is sized by the worst-case receive buffer (every chip's rows); its
                   grid visits only the rows routed there, so (1 - 1/ep) of it is taken out
                   (`routed_rows_overcount`: balanced routing).
  step time        XLA's TPU cost model (`optimal_seconds`) of the step as compiled, scaled by
                   compiled FLOPs / the FLOPs it counted: its seconds per FLOP, applied to the layers
                   it left out (the fused loss's left-out chunks, dense matmuls, at the chip's
                   peak). That model adds -1 s for each op it cannot model: a total faster than
                   the peak (or no model: GPU plans on CPU) falls back to compiled FLOPs / peak. A
                   model of the chip, not a measurement: the MFU it implies, model FLOPs / (step time
                   x chips x peak), is an upper bound.
"""

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

from data_pipelines.progress import Progress
from mm15_jax import cli
from mm15_jax.plan.chips import Chip, GiB, simulated_devices, tpu_chip, tpu_devices
from mm15_jax.plan.estimate import plan
from mm15_jax.plan.report import format_report, format_sweep


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
      configs.set_field(config, dotted, value)
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
  flags.DEFINE_bool("sweep", False, "Plan --sizes x --topologies x --remat; report the smallest that fits and "
                    "the remat to use.", **fv)
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
