"""`--help` of every command-line tool lists its flags (absl shows only the running module's key
flags, and ours are defined in library modules: mm15_jax/cli.py)."""

import os
import subprocess
import sys
from concurrent import futures
from importlib import metadata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each tool's own flags, a few of them; every tool taking an experiment also shows --config.
TOOLS = {
    "mm15-train": ["--workdir", "--no_progress", "--coordinator_address", "--config"],
    "mm15-recipe": ["--workdir", "--stages", "--processes", "--dry_run", "--config"],
    "mm15-generate": ["--prompt", "--image", "--max_new_tokens", "--render", "--config"],
    "mm15-video": ["--video", "--frames", "--prompt", "--config"],
    "mm15-eval": ["--benchmark", "--builtin", "--checkpoint", "--metric", "--config"],
    "mm15-convert": ["--hf", "--kind", "--dtype", "--checkpoint"],
    "mm15-convert-data": ["--jsonl", "--parquet", "--shards", "--out"],
    "mm15-inspect": ["--num", "--zoom", "--out", "--config"],
    "mm15-sweep": ["--report", "--launcher", "--workdir", "--config"],
    "mm15-plan": ["--topology", "--sweep", "--devices", "--config"],
    "mm15-summary": ["--json", "--devices", "--config"],
}
EXPERIMENT_TOOLS = {"mm15-train", "mm15-generate", "mm15-eval", "mm15-inspect", "mm15-plan", "mm15-summary"}


def _help(command):
  out = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  return out.returncode, out.stdout + out.stderr


@pytest.fixture(scope="module")
def helps():
  bindir = os.path.dirname(sys.executable)
  commands = {name: [os.path.join(bindir, name)] for name in TOOLS}
  commands["python -m mm15_jax.train"] = [sys.executable, "-m", "mm15_jax.train"]
  commands["python -m mm15_jax.evaluation"] = [sys.executable, "-m", "mm15_jax.evaluation"]
  with futures.ThreadPoolExecutor(4) as pool:
    return dict(zip(commands, pool.map(_help, commands.values())))


def test_every_tool_has_a_console_script():
  scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts") if e.name.startswith("mm15-")}
  assert set(scripts) == set(TOOLS), scripts


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_lists_the_tools_flags(helps, tool):
  code, text = helps[tool]
  assert code in (0, 1), text[-2000:]  # absl exits 1 after --help
  missing = [flag for flag in TOOLS[tool] if f"  {flag}:" not in text and f"  --[no]{flag[2:]}:" not in text]
  assert not missing, (missing, text[-3000:])
  assert "Try --helpfull" in text and "USAGE" not in text.split("flags:")[0]  # the tool's docstring as usage
  if tool in EXPERIMENT_TOOLS:
    assert "experiments/" in text and "--config.FIELD=VALUE" in text


@pytest.mark.parametrize("module,flag", [("python -m mm15_jax.train", "--workdir"),
                                         ("python -m mm15_jax.evaluation", "--benchmark")])
def test_help_of_the_module_form(helps, module, flag):
  code, text = helps[module]
  assert code in (0, 1) and f"  {flag}:" in text, text[-2000:]


def test_log_lines_of_other_processes_name_their_process():
  import logging

  from absl import logging as absl_logging

  from mm15_jax import distributed

  handler = absl_logging.get_absl_handler()
  before = handler.python_handler.formatter
  try:
    distributed.prefix_log_lines(3)
    record = logging.LogRecord("absl", logging.WARNING, "packing.py", 90, "data: dropped a record", None, None)
    line = handler.python_handler.formatter.format(record)
  finally:
    handler.setFormatter(before)
  assert line.startswith("[process 3] W") and line.endswith("packing.py:90] data: dropped a record"), line


def test_tools_that_load_a_run_take_its_config_or_say_what_is_missing(tmp_path):
  from absl import app

  from mm15_jax import cli, configs, run_record

  cli.check_config_source("experiments/tiny.py", None)  # --config given: nothing to check
  run_record.write_config(configs.base(), str(tmp_path / "run"))
  (tmp_path / "run" / "checkpoints" / "10").mkdir(parents=True)
  cli.check_config_source(None, str(tmp_path / "run" / "checkpoints" / "10"))  # found two levels up
  with pytest.raises(app.UsageError, match=r"has no config.json of a run .*--config=FILE.py"):
    cli.check_config_source(None, str(tmp_path / "elsewhere"))
  with pytest.raises(app.UsageError, match=r"no --checkpoint: give --config="):
    cli.check_config_source(None, None)
