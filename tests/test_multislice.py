"""Multi-slice meshes: the DCN part of each axis is outer, slices are found per platform, errors.

CPU devices have no slices; `make_mesh` splits them into equal contiguous groups (by the given
order) and builds the mesh through the same `create_hybrid_device_mesh` call as TPU multi-slice.
Real TPU multi-slice devices come from libtpu's topology descriptions (no TPU needed).
"""

import itertools
import types

import jax
import numpy as np
import pytest
from tiny_setup import tiny_config, train_on_fixed_batch

from mm15_jax import sharding as shd
from mm15_jax.train import config_checks
from mm15_jax.train import state as state_lib

AXES = shd.MESH_AXES


def full(**sizes):
  return {a: sizes.get(a, 1) for a in AXES}


def check_slice_blocks(dev_array, ici, dcn, slice_of):
  """Each slice's devices fill exactly the block of mesh positions whose DCN-outer index is that slice's.

  Along every axis, position i has DCN index i // ici[axis] (the outer part); the slices are
  laid out in row-major order over the DCN shape (slice k at np.unravel_index(k, dcn shape)).
  """
  dcn_shape = tuple(dcn[a] for a in AXES)
  assert dev_array.shape == tuple(ici[a] * dcn[a] for a in AXES)
  slice_ids = sorted({slice_of(d) for d in dev_array.flat})
  assert len(slice_ids) == np.prod(dcn_shape)
  for pos in itertools.product(*map(range, dev_array.shape)):
    outer = tuple(i // ici[a] for i, a in zip(pos, AXES))
    assert slice_of(dev_array[pos]) == slice_ids[np.ravel_multi_index(outer, dcn_shape)], pos
  assert len({d.id for d in dev_array.flat}) == dev_array.size  # every device once


@pytest.mark.parametrize("ici, dcn", [
    (full(data=2, fsdp=2), full(data=2)),
    (full(data=4), full(fsdp=2)),
    (full(fsdp=2), full(data=2, fsdp=2)),
    (full(fsdp=2, tensor=2), full(data=2)),
])
def test_simulated_cpu_slices_are_contiguous_id_groups_on_the_outer_index(ici, dcn):
  devices = jax.devices()
  per_slice = len(devices) // np.prod(list(dcn.values()))
  dev_array = shd.mesh_devices(ici, devices, dcn=dcn)
  check_slice_blocks(dev_array, ici, dcn, slice_of=lambda d: d.id // per_slice)  # slice k: ids k*per..
  mesh = shd.make_mesh(ici, devices, dcn=dcn)
  assert dict(mesh.shape) == {a: ici[a] * dcn[a] for a in AXES}


def test_dcn_over_fsdp_layout_by_hand():
  # 2 slices of 4 CPU devices (ids 0-3, 4-7); fsdp = 2 slices outer x 1 inner, data = 4 within a slice.
  mesh = shd.make_mesh(full(data=4), dcn=full(fsdp=2))
  ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0, 0]
  np.testing.assert_array_equal(ids, [[0, 4], [1, 5], [2, 6], [3, 7]])
  # The given order decides the simulated slices: reversed devices put ids 7-4 in slice 0.
  mesh = shd.make_mesh(full(data=4), jax.devices()[::-1], dcn=full(fsdp=2))
  ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0, 0]
  np.testing.assert_array_equal(ids, [[7, 3], [6, 2], [5, 1], [4, 0]])


def test_minus_one_fills_within_a_slice():
  mesh = shd.make_mesh(dict(data=1, fsdp=-1, tensor=1, expert=1), dcn=dict(data=2, fsdp=1, tensor=1, expert=1))
  assert dict(mesh.shape) == dict(data=2, fsdp=4, tensor=1, expert=1)
  assert shd.mesh_sizes(dict(data=1, fsdp=-1), 512, dcn=dict(data=4)) == dict(data=4, fsdp=128, tensor=1, expert=1)


def test_all_ones_or_none_dcn_is_the_flat_mesh():
  flat = shd.make_mesh(full(data=4, fsdp=2))
  for dcn in (None, full()):
    assert (shd.make_mesh(full(data=4, fsdp=2), dcn=dcn).devices == flat.devices).all()


def test_mesh_for_config_reads_mesh_dcn():
  config = tiny_config(**{"mesh": full(data=2, fsdp=2), "mesh_dcn": full(data=2)})
  mesh = shd.mesh_for_config(config)
  assert dict(mesh.shape) == full(data=4, fsdp=2)
  check_slice_blocks(mesh.devices, config.mesh, config.mesh_dcn, slice_of=lambda d: d.id // 4)


@pytest.mark.parametrize("ici, dcn, message", [
    (full(data=-1), full(data=3), r"8 CPU devices do not split into 3 simulated slices"),
    (full(data=4, fsdp=2), full(data=2), r"config.mesh: .* = 8 .* but 4 devices per slice"),
    (full(data=3, fsdp=-1), full(data=2), r"config.mesh: 4 devices per slice.*product 3.*--config.mesh.fsdp=4"),
    (full(data=-1), full(tensor=2), r"config.mesh_dcn.tensor=2: .*within a slice"),
    (full(data=-1), full(data=0), r"config.mesh_dcn.data=0: .*positive integer"),
    (full(data=-1), dict(data=2, pipeline=2), r"config.mesh_dcn has unknown axes \['pipeline'\]"),
])
def test_bad_multislice_configs_name_the_field_and_fix(ici, dcn, message):
  with pytest.raises(ValueError, match=message):
    shd.make_mesh(ici, dcn=dcn)


def test_expert_over_dcn_is_allowed_with_a_warning():
  with pytest.warns(UserWarning, match=r"config.mesh_dcn.expert=2: .*all-to-all"):
    mesh = shd.make_mesh(full(expert=-1), dcn=full(expert=2))
  assert dict(mesh.shape) == full(expert=8)


def test_check_config_reports_a_bad_mesh_dcn():
  config = tiny_config(**{"mesh_dcn.tensor": 2})
  with pytest.raises(ValueError, match=r"config.mesh_dcn.tensor=2"):
    config_checks.check_config(config, paths=False)


def fake_gpus(n, process_of, slice_of=None):
  """Stand-ins for GPU devices: what the mesh code reads (id, platform, process and slice index)."""
  out = []
  for i in range(n):
    d = types.SimpleNamespace(id=i, platform="gpu", device_kind="NVIDIA H100 80GB HBM3", process_index=process_of(i))
    if slice_of is not None:
      d.slice_index = slice_of(i)
    out.append(d)
  return out


def test_gpu_without_slice_index_takes_one_process_per_slice():
  # 4 hosts x 2 GPUs, one process per host; given in a shuffled order.
  devices = fake_gpus(8, process_of=lambda i: i // 2)
  order = np.random.default_rng(0).permutation(8)
  dev_array = shd.mesh_devices(full(fsdp=2), [devices[i] for i in order], dcn=full(data=4))
  check_slice_blocks(dev_array, full(fsdp=2), full(data=4), slice_of=lambda d: d.process_index)
  with pytest.raises(ValueError, match=r"= 2 slices .* form 4 \(by process_index\)"):
    shd.mesh_devices(full(fsdp=4), devices, dcn=full(data=2))


def test_gpu_slice_index_wins_over_processes():
  # One process per GPU (launch/slurm.sbatch); jaxlib's slice_index names the host (NVLink domain).
  devices = fake_gpus(8, process_of=lambda i: i, slice_of=lambda i: i // 4)
  dev_array = shd.mesh_devices(full(fsdp=4), devices, dcn=full(data=2))
  check_slice_blocks(dev_array, full(fsdp=4), full(data=2), slice_of=lambda d: d.slice_index)


def tpu_topology(name, num_slices, monkeypatch):
  pytest.importorskip("libtpu")
  from jax.experimental import topologies
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes here may hold libtpu
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=num_slices).devices
  except Exception as e:  # noqa: BLE001  (no usable libtpu on this host)
    pytest.skip(f"no TPU topology description: {e}")


@pytest.mark.parametrize("ici, dcn", [(full(fsdp=-1), full(data=2)), (full(data=2, fsdp=2), full(fsdp=2))])
def test_tpu_multislice_devices_group_by_slice_index(ici, dcn, monkeypatch):
  devices = tpu_topology("v5p:2x2x1", 2, monkeypatch)
  assert {d.slice_index for d in devices} == {0, 1}
  mesh = shd.make_mesh(ici, devices[::-1], dcn=dcn)
  ici = shd.ici_sizes(ici, 4, multi_slice=True)
  check_slice_blocks(mesh.devices, ici, dcn, slice_of=lambda d: d.slice_index)


def test_tpu_multislice_errors(monkeypatch):
  devices = tpu_topology("v5p:2x2x1", 2, monkeypatch)
  with pytest.raises(ValueError, match=r"form 2 TPU slices but config.mesh_dcn is all 1.*mesh_dcn.data=2"):
    shd.make_mesh(full(data=-1), devices)
  with pytest.raises(ValueError, match=r"= 4 slices .* form 2 \(by slice_index\).*--config.mesh_dcn.data=2"):
    shd.make_mesh(full(data=-1), devices, dcn=full(data=4))
  with pytest.raises(ValueError, match=r"unequal sizes \{0: 4, 1: 2\}"):
    shd.make_mesh(full(data=-1), devices[:6], dcn=full(data=2))


def test_two_simulated_slices_train_like_the_flat_mesh():
  config = tiny_config(**{"train.steps": 3})

  def run(mesh_axes, dcn):
    c = config.copy_and_resolve_references()
    c.mesh, c.mesh_dcn = mesh_axes, dcn
    setup = state_lib.make_setup(c, shd.mesh_for_config(c))
    assert dict(setup.mesh.shape) == full(data=4, fsdp=2)
    return train_on_fixed_batch(setup, c)[0], np.vectorize(lambda d: d.id)(setup.mesh.devices)

  flat, flat_ids = run(full(data=4, fsdp=2), full())
  # 2 slices x (data=2, fsdp=2), data across slices: the same device order as the flat mesh.
  over_data, _ = run(full(data=2, fsdp=2), full(data=2))
  # 2 slices x (data=4), fsdp across slices: fsdp pairs devices of different slices (0 with 4, ...).
  over_fsdp, fsdp_ids = run(full(data=4), full(fsdp=2))
  assert (fsdp_ids != flat_ids).any()
  np.testing.assert_allclose(over_data, flat, rtol=1e-5)
  np.testing.assert_allclose(over_fsdp, flat, rtol=1e-5)
  assert flat[-1] < flat[0]  # it trained
