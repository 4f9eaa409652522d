"""Device mesh, logical-axis rules, and the shardings of params, state and batches.

Modules name the axes of their data (`batch`, `embed`, `heads`, ...); the experiment
file maps those logical names to mesh axes (`data`, `fsdp`, `tensor`, `expert`).
No module names a mesh axis.
"""

import collections
import contextlib
import math
import threading
import warnings

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

_context = threading.local()


def mesh_sizes(mesh_config, n_devices: int, dcn=None) -> dict:
  """Axis sizes of the whole mesh: `config.mesh` within a slice (one -1 fills) times `config.mesh_dcn`.

  Pure arithmetic, so tools can size a mesh for devices they do not have.
  """
  dcn = dcn_sizes(dcn)
  n_slices = math.prod(dcn.values())
  if n_devices % n_slices:
    raise ValueError(
        f"config.mesh_dcn: {n_devices} devices do not split into {n_slices} slices ({dcn}); "
        f"set config.mesh_dcn to the number of slices")
  ici = ici_sizes(mesh_config, n_devices // n_slices, multi_slice=n_slices > 1)
  return {a: ici[a] * dcn[a] for a in MESH_AXES}


def ici_sizes(mesh_config, n_devices: int, multi_slice: bool = False) -> dict:
  """`config.mesh` with its -1 axis filled, checked against the devices of one slice."""
  where = "devices per slice" if multi_slice else "devices are visible"
  sizes = dict(mesh_config)
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}")
  sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {fill}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if known <= 0 or n_devices % known:
      raise ValueError(
          f"config.mesh: {n_devices} {where}, which the fixed axes (product {known}) do not divide; "
          f"e.g. --config.mesh.{fill[0]}={n_devices}")
    sizes[fill[0]] = n_devices // known
  total = math.prod(sizes.values())
  if total != n_devices:
    product = "*".join(MESH_AXES)
    raise ValueError(
        f"config.mesh: {product} = {total} ({sizes}), but {n_devices} {where}; "
        f"e.g. --config.mesh.data={n_devices} with the other axes 1, or one axis -1")
  return sizes


def dcn_sizes(dcn) -> dict:
  """`config.mesh_dcn` checked: slices per axis, only over axes whose traffic DCN can carry.

  tensor over DCN is an error: it all-reduces activations in every layer. expert over DCN
  is allowed with a warning: one all-to-all per MoE layer, as GPU clusters do over InfiniBand.
  """
  sizes = dict(dcn or {})
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh_dcn has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}")
  sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
  for a, s in sizes.items():
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
      raise ValueError(f"config.mesh_dcn.{a}={s!r}: give the number of slices along {a}, a positive integer")
  if sizes["tensor"] > 1:
    raise ValueError(
        f"config.mesh_dcn.tensor={sizes['tensor']}: tensor parallelism all-reduces activations in every "
        f"layer and must stay within a slice; span slices with mesh_dcn.data or mesh_dcn.fsdp instead")
  if sizes["expert"] > 1:
    warnings.warn(
        f"config.mesh_dcn.expert={sizes['expert']}: every MoE layer's all-to-all crosses the data-centre "
        f"network; mesh_dcn.data is cheaper where the experts fit in one slice", stacklevel=2)
  return sizes


class _SimulatedSliceDevice:
  """A CPU device seen as part of slice `slice_index`: CPUs have no slices, so tests and
  debug runs fake them and go through the same hybrid-mesh code as TPU multi-slice."""

  def __init__(self, device, slice_index: int):
    self.device, self.slice_index = device, slice_index

  def __getattr__(self, name):
    return getattr(self.device, name)


def _slice_view(devices: list, n_slices: int) -> tuple[list, bool]:
  """(devices as the hybrid mesh groups them, whether a process is a slice), per platform.

  TPU and recent GPU jaxlibs give each device a `slice_index` (the ICI or NVLink domain:
  a TPU slice, a GPU host, an NVL72 rack): used as is. GPU without it: one process is one
  slice (one host, when a process drives all its GPUs). CPU: the devices in the given order
  (default: by id) split into `n_slices` equal contiguous groups.
  """
  if hasattr(devices[0], "slice_index"):
    return devices, False
  if devices[0].platform != "cpu":
    return devices, True
  if len(devices) % n_slices:
    raise ValueError(
        f"config.mesh_dcn: {len(devices)} CPU devices do not split into {n_slices} simulated slices; "
        f"use a number of slices that divides {len(devices)}")
  per = len(devices) // n_slices
  return [_SimulatedSliceDevice(d, i // per) for i, d in enumerate(devices)], False


def _hybrid_device_array(mesh_config, dcn: dict, devices: list) -> np.ndarray:
  """Devices shaped ici x dcn per axis; the DCN (slice) index is the outer part of each axis."""
  n_slices = math.prod(dcn.values())
  view, by_process = _slice_view(devices, n_slices)
  key = "process_index" if by_process else "slice_index"
  per_slice = collections.Counter(getattr(d, key) for d in view)
  if len(per_slice) != n_slices:
    raise ValueError(
        f"config.mesh_dcn: {'*'.join(MESH_AXES)} = {n_slices} slices ({dcn}), but the {len(devices)} devices "
        f"form {len(per_slice)} (by {key}); e.g. --config.mesh_dcn.data={len(per_slice)} with the other axes 1")
  if len(set(per_slice.values())) > 1:
    raise ValueError(f"config.mesh_dcn: slices of unequal sizes {dict(per_slice)} (devices per {key})")
  ici = ici_sizes(mesh_config, len(devices) // n_slices, multi_slice=True)
  dev_array = mesh_utils.create_hybrid_device_mesh(
      [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], view, process_is_granule=by_process)
  unwrap = lambda d: d.device if isinstance(d, _SimulatedSliceDevice) else d
  return np.vectorize(unwrap, otypes=[object])(dev_array)


def mesh_devices(mesh_config, devices=None, *, dcn=None) -> np.ndarray:
  """The device array of `make_mesh`, one dimension per axis of MESH_AXES (no Mesh built)."""
  devices = list(jax.devices() if devices is None else devices)
  dcn = dcn_sizes(dcn)
  if math.prod(dcn.values()) > 1:
    return _hybrid_device_array(mesh_config, dcn, devices)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  if devices[0].platform == "tpu" and len(slices) > 1:
    raise ValueError(
        f"config.mesh_dcn: the devices form {len(slices)} TPU slices but config.mesh_dcn is all 1; "
        f"e.g. --config.mesh_dcn.data={len(slices)}")
  shape = tuple(ici_sizes(mesh_config, len(devices)).values())
  try:
    return mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # CPU or unusual topologies: keep device order
    return np.asarray(devices).reshape(shape)


def make_mesh(mesh_config, devices=None, *, dcn=None) -> Mesh:
  """Mesh from `config.mesh` (axis -> size within a slice, one -1 fills the rest) and
  `config.mesh_dcn` (slices per axis; None or all ones: one slice), checked against the devices.

  Each axis has size mesh x mesh_dcn; its outer part steps across slices, so the devices of
  one slice are contiguous along it and only the axes with mesh_dcn > 1 talk over DCN.
  """
  dev_array = mesh_devices(mesh_config, devices, dcn=dcn)
  return Mesh(dev_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_for_config(config, devices=None) -> Mesh:
  """The mesh of `config.mesh` and `config.mesh_dcn` over `devices` (default: all)."""
  return make_mesh(config.mesh, devices, dcn=config.mesh_dcn)


def logical_to_mesh(logical: tuple, rules, mesh: Mesh | None = None) -> P:
  """Maps a tuple of logical axis names to a PartitionSpec.

  Each logical name takes, in rule order, the mesh axes it maps to that no earlier
  dimension of the same array already took. Mesh axes of size 1 are left out.
  """
  table = {}
  for name, axes in rules:
    if axes is None:
      axes = ()
    table.setdefault(name, ())
    table[name] = table[name] + ((axes,) if isinstance(axes, str) else tuple(axes))
  used = set()
  spec = []
  for name in logical:
    chosen = []
    for axis in table.get(name, ()) if name is not None else ():
      if axis in used or (mesh is not None and mesh.shape[axis] == 1):
        continue
      chosen.append(axis)
      used.add(axis)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return P(*spec)


def axis_size(spec_entry, mesh: Mesh) -> int:
  if spec_entry is None:
    return 1
  axes = (spec_entry,) if isinstance(spec_entry, str) else spec_entry
  return math.prod(mesh.shape[a] for a in axes)


def check_divisible(shape, spec: P, mesh: Mesh, what: str, fix: str = "") -> None:
  for dim, entry in zip(shape, spec):
    n = axis_size(entry, mesh)
    if dim % n:
      raise ValueError(
          f"{what}: dimension {dim} of shape {tuple(shape)} is sharded over mesh axes {entry} "
          f"of size {n} and does not divide; {fix or 'change config.mesh or config.sharding_rules'}")


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules, *, lenient: bool = False):
  """Activates logical-axis rules for `constrain` (and MoE's expert parallelism) inside model code.

  Strict by default (training, its evaluation): an activation whose dimension does not divide
  over its mesh axes is an error, since silently dropping its constraint would change the
  sharding plan. `lenient=True` (inference: a batch of one, a prompt of any length) leaves such
  an activation unconstrained for the compiler to place, and lets MoE layers run unsharded.
  """
  previous = getattr(_context, "value", None)
  _context.value = (mesh, tuple(rules), bool(lenient))
  try:
    yield
  finally:
    _context.value = previous


def active_mesh() -> Mesh | None:
  """The mesh of the active `use_rules` context (None outside one): for shard_map in layers."""
  active = getattr(_context, "value", None)
  return None if active is None else active[0]


def compile_platform() -> str:
  """The backend the traced program is for: the active mesh's (a CPU host planning a TPU pod
  traces for TPU devices), else the default backend."""
  mesh = active_mesh()
  return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def active_rules() -> tuple:
  active = getattr(_context, "value", None)
  return () if active is None else active[1]


def lenient() -> bool:
  """Whether the active `use_rules` context lets indivisible activations go unsharded (inference)."""
  active = getattr(_context, "value", None)
  return active is not None and active[2]


def indivisible(shape, logical: tuple, spec: P, mesh: Mesh) -> str | None:
  """None if every dimension of `shape` divides over its mesh axes in `spec`, else why not: the
  array's logical axes, the dimension, its size, and the mesh axes with their size."""
  for i, entry in enumerate(spec):
    n = axis_size(entry, mesh)
    if shape[i] % n:
      axes = (entry,) if isinstance(entry, str) else tuple(entry)
      sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
      return (f"an activation with logical axes {tuple(logical)} and shape {tuple(shape)}: dimension {i} "
              f"({logical[i]!r}) of size {shape[i]} does not divide over mesh axes {axes} ({sizes}; {n} shards)")
  return None


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op without active rules.

  A dimension that does not divide over its mesh axes raises a ValueError, unless the rules
  are `lenient` (inference), where the activation is left to the compiler.
  """
  active = getattr(_context, "value", None)
  if active is None:
    return x
  mesh, rules, is_lenient = active
  spec = logical_to_mesh(logical, rules, mesh)
  problem = indivisible(x.shape, logical, spec, mesh)
  if problem is not None:
    if is_lenient:
      return x  # e.g. a batch of one at inference: leave it to the compiler
    raise ValueError(f"sharding: {problem}; its constraint cannot apply. Change config.train.batch_size, "
                     f"config.mesh or config.sharding_rules so it divides (inference code enters "
                     f"sharding.use_rules(..., lenient=True) to leave such arrays to the compiler)")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
