"""What a run writes about itself at start: its resolved config and a record of where it ran.

  WORKDIR/config.json   the resolved config (`load_config(WORKDIR)` gives it back as a ConfigDict),
                        so loading, exporting or continuing the run needs no experiment file
  WORKDIR/runs.jsonl    one line per launch: time, command line, process count, devices, mesh,
                        package versions, the source's git commit when there is one

Written by process 0 only, each file whole or not at all (a temporary file renamed), through
etils.epath so a `gs://` workdir works as a local one.
"""

import copy
import importlib.metadata
import json
import os
import subprocess
import sys
import time

import jax
import ml_collections
from etils import epath

from data_pipelines import storage
from mm15_jax import configs

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections", "numpy")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tuples(node):
  """JSON lists back to the tuples our configs use (sharding rules, profile steps, ...)."""
  if isinstance(node, dict):
    return {k: _tuples(v) for k, v in node.items()}
  if isinstance(node, list):
    return tuple(_tuples(v) for v in node)
  return node


def config_to_json(config) -> str:
  return json.dumps(config.to_dict(), indent=1, sort_keys=True)


# Sections whose keys are names the experiment chose (data sources), not fields of configs.base().
NAMED_ENTRIES = ("data.sources",)


def fill_missing_fields(config: ml_collections.ConfigDict, defaults=None, where: str = ""):
  """`config` (changed in place and returned) with every field of configs.base() it lacks, at
  base()'s value. A config.json written by an earlier version (before checkpoint.sigterm_grace_s or
  log.*, say) then has every field the code reads, which reads them directly: this is the one place
  an older saved config is completed, and base() the one place a default is written. Filled with
  the values the earlier version applied when the field was absent, so such a run behaves as it did."""
  defaults = configs.base() if defaults is None else defaults
  for key, default in defaults.items():
    field = f"{where}{key}"
    if key not in config:
      config[key] = copy.deepcopy(default)
    elif (isinstance(default, ml_collections.ConfigDict) and isinstance(config[key], ml_collections.ConfigDict)
          and field not in NAMED_ENTRIES):
      fill_missing_fields(config[key], default, field + ".")
  return config


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A saved config.json as a ConfigDict, completed by `fill_missing_fields`."""
  return fill_missing_fields(ml_collections.ConfigDict(_tuples(json.loads(text))))


def config_path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "config.json"


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run in `workdir` (or an import's output directory) wrote."""
  path = config_path(workdir)
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a run's workdir written by this version "
                            "(give the experiment file with --config)")
  return config_from_json(path.read_text())


def find_config(path: str) -> ml_collections.ConfigDict | None:
  """The config.json of the run holding `path` (its workdir, checkpoints/ or one step directory), or None."""
  p = epath.Path(path)
  for candidate in (p, p.parent, p.parent.parent):
    if config_path(candidate).exists():
      return load_config(str(candidate))
  return None


def write_config(config, directory: str) -> None:
  """DIRECTORY/config.json, whole or not at all."""
  _write(config_path(directory), config_to_json(config))


def _write(path: epath.Path, text: str) -> None:
  storage.write_text_atomic(os.fspath(path), text)  # overwrites: a relaunch rewrites config.json and runs.jsonl


def git_commit() -> str | None:
  """The commit of the source tree this package runs from, if it is a git checkout."""
  try:
    out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode != 0:
    return None
  return out.stdout.strip() or None


def versions() -> dict:
  found = {}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def run_entry(mesh) -> dict:
  devices = jax.devices()
  return dict(
      time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), argv=list(sys.argv), process_count=jax.process_count(),
      device_count=len(devices), device_kind=devices[0].device_kind, platform=devices[0].platform,
      mesh=dict(mesh.shape), python=sys.version.split()[0], packages=versions(), git_commit=git_commit())


def write_run_files(config, workdir: str, mesh) -> dict | None:
  """config.json (replaced) and one runs.jsonl line (appended), from process 0; returns that
  line's entry there (None on the other processes) for the metrics' trackers."""
  if jax.process_index() != 0:
    return None
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  write_config(config, workdir)
  runs = directory / "runs.jsonl"
  previous = runs.read_text() if runs.exists() else ""
  entry = run_entry(mesh)
  _write(runs, previous + json.dumps(entry, sort_keys=True) + "\n")
  return entry
