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


def load_params(path: str, abstract_params: dict) -> dict:
  """Params only, from a previous stage's checkpoint, in the current shardings."""
  directory, step = find_checkpoint_dir(path)
  manager = ocp.CheckpointManager(
      directory.absolute(), options=ocp.CheckpointManagerOptions(read_only=True), item_names=("params",))
  restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
  manager.close()
  return restored["params"]


def workdir_checkpoints(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")
