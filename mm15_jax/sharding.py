"""Device mesh, logical-axis rules, and the shardings of params, state and batches.

Modules name the axes of their data (`batch`, `embed`, `heads`, ...); the experiment
file maps those logical names to mesh axes (`data`, `fsdp`, `tensor`, `expert`).
No module names a mesh axis.
"""

import contextlib
import math
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

_context = threading.local()


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh from `config.mesh` (axis -> size, one -1 fills the rest), checked against the devices."""
  devices = list(jax.devices() if devices is None else devices)
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
    if known == 0 or len(devices) % known:
      raise ValueError(
          f"config.mesh: {len(devices)} devices do not divide by the fixed axes (product {known}); "
          f"e.g. --config.mesh.{fill[0]}={len(devices)}")
    sizes[fill[0]] = len(devices) // known
  total = math.prod(sizes.values())
  if total != len(devices):
    product = "*".join(MESH_AXES)
    raise ValueError(
        f"config.mesh: {product} = {total} ({sizes}), but {len(devices)} devices are visible; "
        f"e.g. --config.mesh.data={len(devices)} with the other axes 1, or one axis -1")
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # CPU or unusual topologies: keep device order
    dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


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
def use_rules(mesh: Mesh, rules):
  """Activates logical-axis rules for `constrain` inside model code."""
  previous = getattr(_context, "value", None)
  _context.value = (mesh, tuple(rules))
  try:
    yield
  finally:
    _context.value = previous


def active_mesh() -> Mesh | None:
  """The mesh of the active `use_rules` context (None outside one): for shard_map in layers."""
  active = getattr(_context, "value", None)
  return None if active is None else active[0]


def active_rules() -> tuple:
  active = getattr(_context, "value", None)
  return () if active is None else active[1]


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op without active rules."""
  active = getattr(_context, "value", None)
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_mesh(logical, rules, mesh)
  if any(x.shape[i] % axis_size(e, mesh) for i, e in enumerate(spec)):
    return x  # e.g. a batch of one at inference: leave it to the compiler
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
