"""Experiment trackers behind one interface: TensorBoard (on by default) and Weights & Biases.

  config.log.tensorboard = True                              # WORKDIR/tensorboard
  config.log.wandb.project = "mm15"                          # "" = off (the default)
  config.log.wandb.entity, .name, .mode ("online" | "offline"), .dir

Each tracker gets the resolved config and the run record once (`start`), then every metrics
row as scalars tagged "<kind>/<name>" (`scalars`), e.g. "train/loss", "eval/qa/loss". Only
process 0 creates trackers (MetricsWriter).

W&B: the `wandb` extra. A relaunch of the same workdir continues the same W&B run (its id is
kept in WORKDIR/wandb_run_id). Rows are logged against their training step as the metric
"trainer/step", so a resume that logs again the steps after its checkpoint adds points at those
steps rather than being refused for going back in W&B's own step. Its local files go to
`log.wandb.dir`, else WORKDIR/wandb (a bucket workdir: ~/.cache/mm15_jax/wandb).
"""

import hashlib
import json
import os
import uuid

from data_pipelines import storage
from mm15_jax import modes


class Tracker:
  """What MetricsWriter calls; each method may be a no-op."""

  def start(self, config: dict, run_record: dict) -> None:
    del config, run_record

  def scalars(self, step: int, kind: str, values: dict) -> None:
    raise NotImplementedError

  def close(self) -> None:
    pass


class TensorBoard(Tracker):

  def __init__(self, workdir: str, purge_step: int | None):
    from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

    self._writer = SummaryWriter(storage.join(workdir, "tensorboard"), purge_step=purge_step)

  def start(self, config, run_record):
    self._writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")
    self._writer.add_text("run", "```\n" + json.dumps(run_record, indent=1, default=str) + "\n```")

  def scalars(self, step, kind, values):
    for name, value in values.items():
      self._writer.add_scalar(f"{kind}/{name}", value, step)

  def close(self):
    self._writer.close()


class WandB(Tracker):
  STEP = "trainer/step"

  def __init__(self, workdir: str, settings: dict):
    try:
      import wandb
    except ImportError as e:
      raise ImportError(f"config.log.wandb.project={settings['project']!r} needs wandb ({e}): "
                        "pip install 'mm15_jax[wandb]', or set --config.log.wandb.project= to turn it off") from e
    self._wandb = wandb
    self._workdir = workdir
    self._settings = settings
    self._run = None

  def _local_dir(self) -> str:
    if self._settings["dir"]:
      return self._settings["dir"]
    if not storage.is_remote(self._workdir):
      return os.path.join(self._workdir, "wandb")
    digest = hashlib.sha1(self._workdir.encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~/.cache/mm15_jax/wandb"), digest)

  def start(self, config, run_record):
    id_path = storage.join(self._workdir, "wandb_run_id")
    run_id = storage.read_text(id_path).strip() if storage.exists(id_path) else uuid.uuid4().hex[:12]
    directory = self._local_dir()
    os.makedirs(directory, exist_ok=True)
    s = self._settings
    self._run = self._wandb.init(
        project=s["project"], entity=s["entity"] or None, name=s["name"] or None,
        mode=modes.parse(modes.WandbMode, s["mode"]).value, dir=directory, id=run_id, resume="allow",
        config=dict(config, run=run_record))
    if not storage.exists(id_path):
      storage.write_text_atomic(id_path, run_id)
    self._run.define_metric(self.STEP)
    self._run.define_metric("*", step_metric=self.STEP)

  def scalars(self, step, kind, values):
    self._run.log({self.STEP: step, **{f"{kind}/{name}": value for name, value in values.items()}})

  def close(self):
    if self._run is not None:
      self._run.finish()
      self._run = None


def make_trackers(config, workdir: str, purge_step: int | None) -> list[Tracker]:
  """The trackers `config.log` asks for (process 0 only)."""
  log = config["log"]
  trackers = []
  if log["tensorboard"]:
    trackers.append(TensorBoard(workdir, purge_step))
  wandb_settings = dict(log["wandb"])
  if wandb_settings["project"]:
    trackers.append(WandB(workdir, wandb_settings))
  return trackers
