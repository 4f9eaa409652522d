"""Orbax checkpoints of params, optimizer state, step, RNG and the data iterator.

Items in each step directory:
  params  the model params (a later stage loads only this item: `config.init.from_checkpoint`)
  train   step, optimizer state, RNG
  data    the grain iterator state, so a resume sees exactly the batches an unbroken run would

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save resumes from the previous complete step. Restores take abstract targets
carrying the *current* shardings, so a run can resume on a different mesh.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory)
    self.manager = ocp.CheckpointManager(
        self.directory.absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a killed save
        ),
        item_names=("params", "train", "data"),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: dict, data_iterator=None, *, force: bool = False) -> None:
    step = int(jax.device_get(state["step"]))
    items = dict(
        params=ocp.args.StandardSave(state["params"]),
        train=ocp.args.StandardSave({k: state[k] for k in ("step", "opt_state", "rng")}),
    )
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: dict, data_iterator=None, step: int | None = None) -> dict:
    """Restores onto the shardings carried by `abstract_state` (any mesh)."""
    step = self.latest_step() if step is None else step
    items = dict(
        params=ocp.args.StandardRestore(abstract_state["params"]),
        train=ocp.args.StandardRestore({k: abstract_state[k] for k in ("step", "opt_state", "rng")}),
    )
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return dict(params=restored["params"], **restored["train"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def latest_step(directory: str) -> int | None:
  """The last complete step under `directory`, read without touching anything."""
  manager = ocp.CheckpointManager(
      epath.Path(directory).absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return manager.latest_step()
  finally:
    manager.close()


def find_checkpoint_dir(path: str) -> tuple[epath.Path, int]:
  """Accepts a run's workdir, its checkpoints/ directory, or one step directory."""
  p = epath.Path(path)
  if (p / "checkpoints").exists():
    p = p / "checkpoints"
  if (p / "params").exists() and p.name.isdigit():
    return p.parent, int(p.name)
  steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit()) if p.exists() else []
  if not steps:
    raise FileNotFoundError(
        f"config.init.from_checkpoint={path!r}: no complete checkpoint found; give a run's workdir, "
        "its checkpoints/ directory or a step directory")
  return p, steps[-1]


def _params_reader(directory):
  # The PyTree handler (the on-disk format StandardSave writes) can restore a subset of the tree.
  return ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={"params": ocp.PyTreeCheckpointHandler()})


def _shapes_by_path(tree) -> dict:
  """{"llm/layers/q": shape}: comparable across our abstract tree and orbax's metadata tree
  (whose keys are strings where ours may be list indices)."""
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _restore_parts(path: str, abstract_params: dict, parts) -> dict:
  """The top-level `parts` (e.g. "llm") of the params stored at `path`, in `abstract_params`'
  shardings; shapes are checked first, so a mismatch names the param and both shapes."""
  directory, step = find_checkpoint_dir(path)
  manager = _params_reader(directory)
  try:
    stored = manager.item_metadata(step)["params"]
    absent = [p for p in parts if p not in stored]
    if absent:
      raise ValueError(f"checkpoint {directory / str(step)} has no params for {absent} (it has {sorted(stored)})")
    target = {p: abstract_params[p] for p in parts}
    want, have = _shapes_by_path(target), _shapes_by_path({p: stored[p] for p in parts})
    wrong = [f"{k}: stored {have.get(k, 'nothing')}, config {v}" for k, v in want.items() if have.get(k) != v]
    wrong += [f"{k}: stored {v}, config nothing" for k, v in have.items() if k not in want]
    if wrong:
      raise ValueError(f"checkpoint {directory / str(step)} does not match config.model:\n  " + "\n  ".join(wrong[:8])
                       + "\n  (use the experiment file written with the checkpoint, e.g. an import's config.py)")
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    return manager.restore(step, args=ocp.args.Composite(params=args))["params"]
  finally:
    manager.close()


def stored_parts(path: str) -> list[str]:
  """The top-level params (vit, connector, llm) a checkpoint holds: an import holds one."""
  directory, step = find_checkpoint_dir(path)
  manager = _params_reader(directory)
  try:
    return sorted(manager.item_metadata(step)["params"])
  finally:
    manager.close()


def load_params(path: str, abstract_params: dict, init=None) -> dict:
  """Params only, from a previous stage's checkpoint, in the current shardings. A checkpoint
  holding only some parts (an import of the decoder or the encoder) gets the others from
  `init()` (fresh params in the same shardings); without `init` that is an error."""
  have = stored_parts(path)
  missing = [p for p in abstract_params if p not in have]
  if missing and init is None:
    raise ValueError(f"checkpoint {path!r} holds only {have}, not {missing}; start from it with "
                     f"config.init.llm_from / vit_from instead of config.init.from_checkpoint")
  params = dict(init()) if missing else {}
  params.update(_restore_parts(path, abstract_params, [p for p in abstract_params if p in have]))
  return params


def load_param_parts(params: dict, abstract_params: dict, parts: dict) -> dict:
  """`params` with the parts named in `parts` ({"llm": path, "vit": path}) replaced by those
  stored at each path (an import, or any run's checkpoint: only that part is read)."""
  params = dict(params)
  for part, path in parts.items():
    params.update(_restore_parts(path, abstract_params, [part]))
  return params


def workdir_checkpoints(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")
