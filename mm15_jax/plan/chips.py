"""The chips a plan compiles for: TPU generations and topologies (libtpu's compile-only devices),
Cloud TPU slice names, and N simulated CPU devices standing in for a GPU cluster."""

import dataclasses
import os
import re


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
                     f"expected {kind!r}; update TPU_GENERATIONS in mm15_jax/plan/chips.py")
  return list(desc.devices)


def simulated_devices(n: int) -> list:
  import jax
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise ValueError(
        f"--devices={n}: this process has {len(devices)} CPU devices; the CLI re-runs itself with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} JAX_PLATFORMS=cpu, or set that yourself")
  return devices[:n]


def accelerator_type(topology: str, chips: int) -> str:
  """'v5p:4x4x4' on 64 chips -> 'v5p-128', as Cloud TPU names that slice."""
  prefix, per_chip = ACCELERATOR_TYPES[tpu_generation(topology)]
  return f"{prefix}-{per_chip * chips}"
