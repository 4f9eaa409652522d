"""Orbax checkpoints of params, optimizer state, step, RNG and the data iterator.

Items in each step directory:
  params  the model params (a later stage loads only this item: `config.init.from_checkpoint`)
  train   step, optimizer state, RNG
  data    the grain iterator state, so a resume sees exactly the batches an unbroken run would

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save resumes from the previous complete step. Restores take abstract targets
carrying the *current* shardings, so a run can resume on a different mesh.
"""

import contextlib
import os
import threading

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from data_pipelines import storage
from mm15_jax import checkpoint_integrity as integrity
from mm15_jax.models.vit import resize_pos_embedding


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, compress: bool = False):
    self.directory = epath.Path(storage.absolute(directory))  # epath's absolute() breaks gs:// paths
    self._unsummed = []  # steps saved whose checksums are not written yet
    self._checksummer = None  # the thread writing them (process 0), joined before orbax is used again
    self.manager = self._manager(keep, async_save, compress)
    self._keep, self._async = keep, async_save

  def _manager(self, keep, async_save, compress):
    # The PyTree handler is what StandardSave wraps, with the compression switch exposed; the
    # on-disk format is the same, and each array's metadata names its codec, so a restore
    # reads compressed and uncompressed steps alike.
    arrays = lambda: ocp.PyTreeCheckpointHandler(use_compression=compress)
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a killed save
        ),
        item_names=("params", "train", "data"),
        item_handlers={"params": arrays(), "train": arrays()},
    )

  def _write_checksums(self, background: bool = False) -> None:
    """Checksums for the steps whose saves are final: called once orbax is idle (before the next
    save, on wait and close). Not from orbax's finalization callback: in a bucket orbax rewrites the
    step's _CHECKPOINT_METADATA after it. With `background` the read-back runs beside training
    (a multi-GB step takes seconds) and is joined the next time orbax is used."""
    self._join_checksums()
    steps, self._unsummed = self._unsummed, []
    if not steps or jax.process_index() != 0:
      return
    if background and self._keep > 1:  # keep=1: the next save deletes the step being read
      self._checksummer = threading.Thread(target=self._checksum_steps, args=(steps, True),
                                           name="mm15-checkpoint-checksums")
      self._checksummer.start()
    else:
      self._checksum_steps(steps)

  def _checksum_steps(self, steps, in_thread: bool = False) -> None:
    for step in steps:
      step_dir = os.fspath(self.directory / str(step))
      try:
        if storage.isdir(step_dir) and not storage.exists(storage.join(step_dir, integrity.CHECKSUMS)):
          integrity.write_checksums(step_dir)  # absent: a save orbax skipped or removed
      except OSError as e:
        if not in_thread:
          raise
        # The step stays usable, as unverified (checkpoint_integrity.step_problem).
        logging.warning("checkpoint step %d: checksums not written (%s)", step, e)

  def _join_checksums(self) -> None:
    if self._checksummer is not None:
      self._checksummer.join()
      self._checksummer = None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def latest_good_step(self, report=None) -> int | None:
    """The newest step that verifies; damaged newer ones are reported and set aside (training)."""
    self.manager.wait_until_finished()
    self._write_checksums()
    steps = integrity.good_steps(os.fspath(self.directory), report, quarantine=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mm15_checkpoint_quarantine")
    self.manager.reload()
    return steps[0] if steps else None

  def save(self, state: dict, data_iterator=None, *, force: bool = False) -> None:
    step = int(jax.device_get(state["step"]))
    items = dict(
        params=ocp.args.PyTreeSave(state["params"]),
        train=ocp.args.PyTreeSave({k: state[k] for k in ("step", "opt_state", "rng")}),
    )
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.wait_until_finished()  # orbax would wait for the previous save here anyway
    self._write_checksums(background=True)
    if self.manager.save(step, args=ocp.args.Composite(**items), force=force):
      self._unsummed.append(step)
      if not self._async:
        self._write_checksums()

  def restore(self, abstract_state: dict, data_iterator=None, step: int | None = None) -> dict:
    """Restores onto the shardings carried by `abstract_state` (any mesh)."""
    step = self.latest_step() if step is None else step
    items = dict(
        params=_restore_args(abstract_state["params"]),
        train=_restore_args({k: abstract_state[k] for k in ("step", "opt_state", "rng")}),
    )
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return dict(params=restored["params"], **restored["train"])

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._write_checksums()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self._write_checksums()
    self.manager.close()


def _restore_args(abstract, partial: bool = False):
  """Read `abstract`'s tree onto the shardings its ShapeDtypeStructs carry (with `partial`, a
  subtree of what is stored)."""
  return ocp.args.PyTreeRestore(item=abstract, partial_restore=partial,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def latest_step(directory: str) -> int | None:
  """The last complete step under `directory`, read without touching anything."""
  with _read_only(directory) as manager:
    return manager.latest_step()


def find_checkpoint_dir(path: str) -> tuple[epath.Path, int]:
  """Accepts a run's workdir, its checkpoints/ directory, or one step directory."""
  p = epath.Path(path)
  if (p / "checkpoints").exists():
    p = p / "checkpoints"
  if (p / "params").exists() and p.name.isdigit():
    problem = integrity.step_problem(os.fspath(p))
    if problem:
      raise ValueError(f"checkpoint {path!r} is damaged: {problem}; give the run's workdir to use its newest good step")
    return p.parent, int(p.name)
  steps = integrity.good_steps(os.fspath(p), report=logging.warning) if p.exists() else []
  if not steps:
    raise FileNotFoundError(
        f"{path!r}: no complete checkpoint found; give a run's workdir, its checkpoints/ directory or a step "
        "directory")
  return p, steps[0]


@contextlib.contextmanager
def _read_only(directory, **kwargs):
  """A read-only CheckpointManager. Orbax warns about the options a read-only manager ignores and
  about every item a params-only read leaves out: noise in a run's log, so only errors show."""
  with _only_errors_logged():
    manager = ocp.CheckpointManager(epath.Path(storage.absolute(directory)),
                                    options=ocp.CheckpointManagerOptions(read_only=True), **kwargs)
    try:
      yield manager
    finally:
      manager.close()


def _params_reader(directory):
  # The PyTree handler (what Checkpointer writes with) can restore a subset of the tree.
  return _read_only(directory, item_handlers={"params": ocp.PyTreeCheckpointHandler()})


def _shapes_by_path(tree) -> dict:
  """{"llm/layers/q": shape}: comparable across our abstract tree and orbax's metadata tree
  (whose keys are strings where ours may be list indices)."""
  return {_path_key(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _path_key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _restore_parts(path: str, abstract_params: dict, parts, grids: dict | None = None, report=None) -> dict:
  """The top-level `parts` (e.g. "llm") of the params stored at `path`, in `abstract_params'`
  shardings; shapes are checked first, so a mismatch names the param and both shapes.

  grids: {"vit/pos_embedding": "bicubic", ...}, the learned position grids a new stage may
  legitimately change (a new image size): those stored at another [h, w] are read as stored
  and resized to the config's grid with that interpolation, each reported through `report`.
  """
  directory, step = find_checkpoint_dir(path)
  grids = grids or {}
  with _params_reader(directory) as manager:
    stored = manager.item_metadata(step)["params"]
    absent = [p for p in parts if p not in stored]
    if absent:
      raise ValueError(f"checkpoint {directory / str(step)} has no params for {absent} (it has {sorted(stored)})")
    target = {p: abstract_params[p] for p in parts}
    want, have = _shapes_by_path(target), _shapes_by_path({p: stored[p] for p in parts})
    resized = {k: have[k] for k, v in want.items()
               if k in grids and k in have and have[k] != v and _same_but_grid(have[k], v)}
    wrong = [f"{k}: stored {have.get(k, 'nothing')}, config {v}" for k, v in want.items()
             if have.get(k) != v and k not in resized]
    wrong += [f"{k}: stored {v}, config nothing" for k, v in have.items() if k not in want]
    if wrong:
      raise ValueError(f"checkpoint {directory / str(step)} does not match config.model:\n  " + "\n  ".join(wrong[:12])
                       + (f"\n  ... and {len(wrong) - 12} more" if len(wrong) > 12 else "")
                       + "\n  (a new stage may change model.vit.image_size, whose position grids are resized; "
                       "anything else must match: use the experiment file written with the checkpoint, e.g. an "
                       "import's config.py)")
    # Read each resized grid at its stored shape (same sharding: only [h, w] differ), then resize.
    read_target = _with_shapes(target, resized)
    params = manager.restore(step, args=ocp.args.Composite(params=_restore_args(read_target, partial=True)))["params"]
  params = _resize_grids(params, target, resized, grids)
  for key, shape in resized.items() if report is not None else ():
    report(f"{key}: position grid resized {shape[0]}x{shape[1]} -> {want[key][0]}x{want[key][1]} "
           f"({grids[key]}) from {directory / str(step)}")
  return params


@contextlib.contextmanager
def _only_errors_logged():
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _same_but_grid(stored: tuple, want: tuple) -> bool:
  """[h, w, width] tables that differ only in their grid."""
  return len(stored) == len(want) == 3 and stored[2] == want[2]


def _with_shapes(tree, shapes: dict):
  """`tree` (ShapeDtypeStructs) with the leaves named in `shapes` at those shapes."""
  def one(path, leaf):
    key = _path_key(path)
    return jax.ShapeDtypeStruct(shapes[key], leaf.dtype, sharding=leaf.sharding) if key in shapes else leaf
  return jax.tree_util.tree_map_with_path(one, tree)


def _resize_grids(params: dict, target: dict, resized: dict, grids: dict) -> dict:
  """params with each table named in `resized` brought to its `target` shape and sharding, as the
  model resizes it at call time (grids[key] names the interpolation)."""
  def one(path, value, want):
    key = _path_key(path)
    if key not in resized:
      return value
    resize = lambda t: resize_pos_embedding(t, want.shape[0], want.shape[1], grids[key])  # noqa: E731
    return jax.jit(resize, out_shardings=want.sharding)(value)
  return jax.tree_util.tree_map_with_path(one, params, target)


def stored_parts(path: str) -> list[str]:
  """The top-level params (vit, connector, llm) a checkpoint holds: an import holds one."""
  directory, step = find_checkpoint_dir(path)
  with _params_reader(directory) as manager:
    return sorted(manager.item_metadata(step)["params"])


def load_params(path: str, abstract_params: dict, init=None, grids: dict | None = None, report=None) -> dict:
  """Params only, from a previous stage's checkpoint, in the current shardings. A checkpoint
  holding only some parts (an import of the decoder or the encoder) gets the others from
  `init()` (fresh params in the same shardings); without `init` that is an error."""
  have = stored_parts(path)
  missing = [p for p in abstract_params if p not in have]
  if missing and init is None:
    raise ValueError(f"checkpoint {path!r} holds only {have}, not {missing}; start from it with "
                     f"config.init.llm_from / vit_from instead of config.init.from_checkpoint")
  params = dict(init()) if missing else {}
  params.update(_restore_parts(path, abstract_params, [p for p in abstract_params if p in have], grids, report))
  return params


def load_param_parts(params: dict, abstract_params: dict, parts: dict, grids: dict | None = None,
                     report=None) -> dict:
  """`params` with the parts named in `parts` ({"llm": path, "vit": path}) replaced by those
  stored at each path (an import, or any run's checkpoint: only that part is read)."""
  params = dict(params)
  for part, path in parts.items():
    params.update(_restore_parts(path, abstract_params, [part], grids, report))
  return params


def save_params(directory: str, step: int, params: dict) -> None:
  """Params alone (e.g. {"vit": ...}: an import, an encoder stage) as step `step` of a checkpoint
  directory that `load_params` / `load_param_parts` and `latest_step` read; orbax writes it
  under a temporary name and renames it when complete, so a kill leaves no step behind."""
  manager = ocp.CheckpointManager(epath.Path(directory), options=ocp.CheckpointManagerOptions(create=True),
                                  item_names=("params",))
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
  manager.wait_until_finished()
  manager.close()


def path_exists(path: str) -> bool:
  """Whether a local or cloud (gs://) path exists."""
  return epath.Path(path).exists()


def workdir_checkpoints(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")
