"""Our params <-> public tensors: one `Tensor` entry per param, and the sharded load through it.

An entry names one of our params (a path in the part's param dict), the public tensor(s) it
comes from (`{i}` in the name for the layer index of a stacked param: our layers are one
array with a leading layer axis, public checkpoints store each layer separately) and the
reshape between the two layouts, written with array methods so it runs on NumPy arrays and,
for shape checks, abstractly under `jax.eval_shape`.

`load` builds each param directly in its target sharding: a stacked param layer by layer,
each public layer tensor read once per host and placed as one layer-sized sharded array, then
written into the param's (donated) device buffer; other params with
`jax.make_array_from_callback`, every device's shard cut from the one read. No host holds
more than a few public tensors (one layer's experts) and their shards (nor, on several hosts,
a shard another host owns).
"""

import collections
import dataclasses
import functools
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class Tensor:
  ours: tuple  # path in the part's param dict, e.g. ("layers", "q")
  theirs: str  # public name; "{i}" is the layer index when stacked
  to_ours: Callable  # public array -> our layout (one layer)
  to_theirs: Callable | None = None  # the inverse, for export (None: not exported)
  stacked: bool = False


def get_path(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def leaf_paths(tree: dict, prefix=()) -> list[tuple]:
  out = []
  for key, value in tree.items():
    out += leaf_paths(value, prefix + (key,)) if isinstance(value, dict) else [prefix + (key,)]
  return out


def public_names(entries, n_layers: int) -> list[str]:
  return [e.theirs.format(i=i) for e in entries for i in (range(n_layers) if e.stacked else [None])]


def check_names(entries, checkpoint, n_layers: int, *, ignore=(), what: str) -> None:
  """Missing or unexpected public tensors -> one error listing them (before anything is read)."""
  wanted = set(public_names(entries, n_layers))
  have = checkpoint.keys()
  missing = sorted(wanted - have)
  unexpected = sorted(k for k in have - wanted if not any(k.startswith(p) or p in k for p in ignore))
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[:4]}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:4]}")
  if problems:
    raise ValueError(f"{checkpoint.directory} does not match the {what} layout its config.json describes: "
                     + "; ".join(problems) + ". Check that --kind matches the checkpoint and that its config.json "
                     "is the one saved with these weights.")


def check_shapes(entries, checkpoint, abstract: dict) -> None:
  """Every public tensor, reshaped to our layout, has the shape our config gives (one error for all)."""
  errors = []
  for e in entries:
    name = e.theirs.format(i=0)
    dtype = checkpoint.dtype(name)
    if dtype not in ("F32", "F16", "BF16", "F64"):
      errors.append(f"{name}: dtype {dtype} is not a floating type")
      continue
    got = jax.eval_shape(e.to_ours, jax.ShapeDtypeStruct(checkpoint.shape(name), np.float32)).shape
    target = get_path(abstract, e.ours).shape
    want = target[1:] if e.stacked else target
    if tuple(got) != tuple(want):
      errors.append(f"{name} {checkpoint.shape(name)} -> {'/'.join(e.ours)} {tuple(got)}, but the config gives "
                    f"{tuple(want)}")
  if errors:
    raise ValueError("public tensors do not fit the model config:\n  " + "\n  ".join(errors))


class _Recent:
  """The last few public tensors in our layout: devices that share a tensor's rows (replicated or
  sharded along another axis) cut their shards from one read."""

  def __init__(self, checkpoint, size: int = 2):
    self.checkpoint, self.size, self.cache = checkpoint, size, collections.OrderedDict()

  def get(self, entry: Tensor, name: str, dtype):
    if name not in self.cache:
      self.cache[name] = np.asarray(entry.to_ours(self.checkpoint.read(name)), dtype)
      if len(self.cache) > self.size:
        self.cache.popitem(last=False)
    return self.cache[name]


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked, layer, i):
  return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), i, 0)


def _layer_sharding(sharding):
  """The sharding of one layer of a stacked param, or None if layers are split across devices
  (then each device's shard is cut layer by layer instead)."""
  if not isinstance(sharding, NamedSharding) or (len(sharding.spec) and sharding.spec[0] is not None):
    return None
  return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


def place_layers(target, sharding, layer_piece):
  """A stacked param [layers, ...] built one layer at a time: `layer_piece(i, index)` is the host
  piece of layer i at a device's `index` into that layer. Each layer becomes one sharded array,
  written into the param's donated device buffer, so a public tensor is read once per host
  however many local devices hold slices of it. None where layers are split across devices."""
  per_layer = _layer_sharding(sharding)
  if per_layer is None:
    return None
  # Zero shards from the host (calloc'd pages, no compile per param), then donated layer by layer.
  # (a fresh array per device: a buffer the donation below writes into must be its own).
  shard_shape = sharding.shard_shape(target.shape)
  value = jax.make_array_from_callback(target.shape, sharding, lambda index: np.zeros(shard_shape, target.dtype))
  for i in range(target.shape[0]):
    layer = jax.make_array_from_callback(target.shape[1:], per_layer, functools.partial(layer_piece, i))
    value = _write_layer(value, layer, np.int32(i))
  return value


def load(entries, checkpoint, abstract: dict, shardings: dict, stats: dict | None = None, progress=None) -> dict:
  """The params of `abstract` (ShapeDtypeStructs) from `checkpoint`, each a jax.Array placed with
  `shardings` (same structure). `stats`, if given, gets the largest host array built at once;
  `progress` (data_pipelines.progress.Progress), one update per entry."""
  out = {}

  cut = functools.partial(cut_piece, stats)
  for e in entries:
    target, sharding = get_path(abstract, e.ours), get_path(shardings, e.ours)
    dtype = np.dtype(target.dtype)
    recent = _Recent(checkpoint)
    if not e.stacked:
      value = jax.make_array_from_callback(target.shape, sharding,
                                           lambda index, e=e, r=recent, t=dtype: cut(r.get(e, e.theirs, t), index))
    else:
      layer = lambda i, e=e, r=recent, t=dtype: r.get(e, e.theirs.format(i=i), t)
      value = place_layers(target, sharding, lambda i, index, layer=layer: cut(layer(i), index))
      if value is None:
        def shard(index, target=target, layer=layer):
          return np.stack([cut(layer(i), index[1:]) for i in range(*index[0].indices(target.shape[0]))])

        value = jax.make_array_from_callback(target.shape, sharding, shard)
    set_path(out, e.ours, value)
    if progress is not None:
      progress.update()
  return out


def cut_piece(stats: dict | None, array, index):
  """array[index], noting in `stats` the largest host piece built."""
  piece = array[index]
  if stats is not None:
    stats["largest_host_array"] = max(stats.get("largest_host_array", 0), piece.nbytes)
  return piece


def export(entries, params: dict, n_layers: int):
  """(public name, NumPy array) pairs, one layer at a time, from our params (jax or NumPy arrays)."""
  for e in entries:
    if e.to_theirs is None:
      continue
    value = get_path(params, e.ours)
    for i in range(n_layers) if e.stacked else [None]:
      array = np.asarray(jax.device_get(value[i] if e.stacked else value))
      yield e.theirs.format(i=i), np.ascontiguousarray(e.to_theirs(array))
