"""What each experiment file resolves to, field by field, kept in tests/resolved_configs/.

A change to a default or to an experiment file shows up in review as a diff of these JSON
files. After an intended change, rewrite them and read the diff:

  MM15_UPDATE_RESOLVED=1 python -m pytest tests/test_resolved_configs.py
"""

import difflib
import glob
import json
import os

import pytest

from mm15_jax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOTS = os.path.join(ROOT, "tests", "resolved_configs")


def cases() -> list[str]:
  """`FILE` or `FILE:arg` for every experiment file and each argument form it documents."""
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
    name = os.path.basename(path)
    if name == "mm15_ui.py":
      args = ["", "tiny"]
    elif name == "mm15_video.py":
      args = ["", "sft", "tiny", "tiny,sft"]
    elif name in ("tiny.py", "tiny_moe.py"):
      args = ["", *configs.STAGES]
    elif name == "tiny_spatial.py":
      args = ["", "encoder", "sft"]
    elif name.startswith("mm15_"):
      args = list(configs.STAGES)
    else:
      args = [""]
    out += [f"{name}:{arg}" if arg else name for arg in args]
  return out


def resolved(case: str) -> str:
  config = configs.load_experiment(os.path.join(ROOT, "experiments", case))
  return json.dumps(json.loads(config.to_json()), indent=1, sort_keys=True) + "\n"


def snapshot_path(case: str) -> str:
  return os.path.join(SNAPSHOTS, case.replace(".py", "").replace(":", "-").replace(",", "_") + ".json")


@pytest.mark.parametrize("case", cases())
def test_experiment_resolves_as_recorded(case):
  text, path = resolved(case), snapshot_path(case)
  if os.environ.get("MM15_UPDATE_RESOLVED"):
    os.makedirs(SNAPSHOTS, exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  assert os.path.exists(path), f"no snapshot for {case}: run MM15_UPDATE_RESOLVED=1 pytest {__file__}"
  recorded = open(path).read()
  diff = "".join(difflib.unified_diff(recorded.splitlines(True), text.splitlines(True), path, case))
  assert text == recorded, f"{case} resolves differently from {path} (if intended, MM15_UPDATE_RESOLVED=1):\n{diff}"


def test_every_snapshot_has_its_experiment():
  expected = {snapshot_path(case) for case in cases()}
  stale = sorted(set(glob.glob(os.path.join(SNAPSHOTS, "*.json"))) - expected)
  assert not stale, f"snapshots without an experiment (delete them): {stale}"
