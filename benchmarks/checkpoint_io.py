"""Checkpoint save and restore speed (orbax through mm15_jax/checkpoint.py) against the raw
speed of the same disk, measured in the same run in the same directory.

  python benchmarks/checkpoint_io.py                          # 25M params: a 300 MB train state
  python benchmarks/checkpoint_io.py --preset=cpu_100m        # a real train state (1.6 GB)
  python benchmarks/checkpoint_io.py --preset=cpu_100m --compress   # with zstd on the arrays
  python benchmarks/checkpoint_io.py --dir=/mnt/ckpt --params=200000000

Raw disk: a file of the state's size written with fsync, dropped from the page cache
(posix_fadvise DONTNEED), read back. The checkpoint's files are dropped the same way before
the restore, so both reads come from the disk; `*_cached_after_drop` (mincore: the fraction
of pages still cached) says whether the drop worked. A second restore, from the page cache,
shows how much of the restore time is the disk's. Float leaves are filled with random
values, as in a trained state: orbax compresses with zstd, and a fresh state's zero Adam
moments would flatter it. Async save: `async_blocked_s` is the time the save call holds the
training loop, `async_save_s` the time until the checkpoint is complete.
"""

import argparse
import ctypes
import json
import mmap
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mm15_jax import sharding as shd
from mm15_jax.checkpoint import Checkpointer
from mm15_jax.train import state as state_lib

CHUNK = 64 << 20  # bytes per raw read/write call

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def synthetic_state(n_params: int) -> dict:
  """A train state like ours (params, AdamW moments, step, rng) of about `n_params` fp32 params."""
  rows = max(1, n_params // 4096)
  shapes = [(min(4096, rows - i), 4096) for i in range(0, rows, 4096)]  # 64 MB leaves
  params = {f"w{i}": jnp.zeros(s, jnp.float32) for i, s in enumerate(shapes)}
  return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optax.adamw(1e-3).init(params),
              rng=jax.random.key_data(jax.random.key(0)))


def preset_state(name: str) -> dict:
  import train_step  # the sibling script, on sys.path when this one runs as a script

  config = train_step.make_config(train_step.PRESETS[name], "xla", None)
  return state_lib.init_state(state_lib.make_setup(config, shd.make_mesh(config.mesh)))


def randomize(state: dict) -> dict:
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [jax.device_put(jax.random.normal(k, x.shape, x.dtype), x.sharding)
            if jnp.issubdtype(x.dtype, jnp.floating) else x for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(tree, leaves)


def files_under(directory: str) -> list[str]:
  return [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]


def drop_from_cache(paths: list[str]) -> None:
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)  # only clean pages can be dropped
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def cached_fraction(paths: list[str]) -> float:
  """Fraction of the files' pages that are in the page cache (mincore on a mapping)."""
  page = mmap.PAGESIZE
  cached = total = 0
  for path in paths:
    size = os.path.getsize(path)
    if not size:
      continue
    fd = os.open(path, os.O_RDONLY)
    try:
      addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
      if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
      try:
        vec = np.zeros((size + page - 1) // page, np.uint8)
        if _libc.mincore(addr, size, vec.ctypes.data):
          raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
      finally:
        _libc.munmap(addr, size)
    finally:
      os.close(fd)
    cached += int(np.sum(vec & 1))
    total += vec.size
  return cached / max(total, 1)


def raw_disk(directory: str, size: int) -> dict:
  """Seconds to write `size` incompressible bytes with fsync, and to read them from the disk."""
  path = os.path.join(directory, "raw.bin")
  block = memoryview(np.random.default_rng(0).bytes(CHUNK))
  start = time.perf_counter()
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  written = 0
  while written < size:
    written += os.write(fd, block[:min(CHUNK, size - written)])
  os.fsync(fd)
  os.close(fd)
  write_s = time.perf_counter() - start
  drop_from_cache([path])
  cached = cached_fraction([path])
  buf = bytearray(CHUNK)
  start = time.perf_counter()
  with open(path, "rb", buffering=0) as f:
    while f.readinto(buf):
      pass
  read_s = time.perf_counter() - start
  os.remove(path)
  return dict(disk_write_s=write_s, disk_read_s=read_s, disk_cached_after_drop=cached)


def checkpoint_io(state: dict, directory: str, compress: bool = False) -> dict:
  """Sync save, restore from the disk, async save; seconds, and whether the restore is exact."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  out = {}
  ckpt = Checkpointer(os.path.join(directory, "sync"), async_save=False, compress=compress)
  start = time.perf_counter()
  ckpt.save(state)
  ckpt.wait()
  out["sync_save_s"] = time.perf_counter() - start
  files = files_under(os.path.join(directory, "sync"))
  out["checkpoint_disk_bytes"] = sum(os.path.getsize(f) for f in files)
  start = time.perf_counter()
  drop_from_cache(files)  # fsyncs first: anything orbax left unflushed shows up here
  out["fsync_after_save_s"] = time.perf_counter() - start
  out["checkpoint_cached_after_drop"] = cached_fraction(files)
  start = time.perf_counter()
  restored = jax.block_until_ready(ckpt.restore(abstract))
  out["restore_s"] = time.perf_counter() - start
  out["restore_exact"] = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
  del restored
  start = time.perf_counter()  # again, now from the page cache: what the disk costs the restore
  jax.block_until_ready(ckpt.restore(abstract))
  out["restore_cached_s"] = time.perf_counter() - start
  ckpt.close()

  ckpt = Checkpointer(os.path.join(directory, "async"), async_save=True, compress=compress)
  start = time.perf_counter()
  ckpt.save(state)
  out["async_blocked_s"] = time.perf_counter() - start
  ckpt.wait()
  out["async_save_s"] = time.perf_counter() - start
  ckpt.close()
  for name in ("sync", "async"):
    shutil.rmtree(os.path.join(directory, name))
  return out


def rates(size: int, t: dict) -> dict:
  """Bytes/s of the state, and each as a fraction of the same run's raw disk speed."""
  write, read = size / t["disk_write_s"], size / t["disk_read_s"]
  save, restore = size / t["sync_save_s"], size / t["restore_s"]
  return dict(disk_write_MBps=write / 1e6, disk_read_MBps=read / 1e6,
              sync_save_MBps=save / 1e6, sync_save_vs_disk_write=save / write,
              async_save_MBps=size / t["async_save_s"] / 1e6,
              restore_MBps=restore / 1e6, restore_vs_disk_read=restore / read,
              restore_from_cache_MBps=size / t["restore_cached_s"] / 1e6,
              async_blocked_fraction=t["async_blocked_s"] / t["async_save_s"])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--params", type=int, default=25_000_000, help="fp32 params of a synthetic state (x12 bytes)")
  parser.add_argument("--preset", default="", help="a train_step.py preset's real train state instead")
  parser.add_argument("--dir", default=tempfile.gettempdir(), help="the disk to measure (a scratch folder is made)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--compress", action="store_true", help="zstd on the arrays (config.checkpoint.compress)")
  args = parser.parse_args()

  state = randomize(preset_state(args.preset) if args.preset else synthetic_state(args.params))
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  directory = tempfile.mkdtemp(prefix="mm15_checkpoint_io_", dir=args.dir)
  try:
    checkpoint_io(synthetic_state(4096), directory)  # orbax's first-call setup, not timed
    runs = []
    for _ in range(args.repeats):
      runs.append(dict(raw_disk(directory, size), **checkpoint_io(state, directory, args.compress)))
      print(json.dumps(dict(run=len(runs), **runs[-1], **rates(size, runs[-1]))), flush=True)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "restore_exact"}
  print(json.dumps(dict(
      summary="median", preset=args.preset or "synthetic", compress=args.compress, params=n_params, state_bytes=size,
      backend=jax.default_backend(), dir=args.dir, repeats=args.repeats,
      restore_exact=all(r["restore_exact"] for r in runs),
      cache_drop_worked=all(max(r["disk_cached_after_drop"], r["checkpoint_cached_after_drop"]) < 0.01 for r in runs),
      **median, **rates(size, median))))


if __name__ == "__main__":
  main()
