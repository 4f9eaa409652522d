"""Damaged checkpoints are found, reported in one line and set aside; the run resumes from the
newest step that verifies (mm15_jax/checkpoint_integrity.py: checksums.json per step)."""

import os
import random
import shutil

import jax
import numpy as np
import pytest
from tiny_setup import tiny_config

from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import checkpoint_integrity as integrity
from mm15_jax import inference
from mm15_jax.train.loop import train_and_evaluate


def _config(steps):
  c = tiny_config()
  c.train.steps, c.checkpoint.every, c.checkpoint.keep = steps, 2, 3
  c.eval.every, c.eval.generate_per_task = 0, 0
  return c


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """Steps 2 and 4 saved, each with its checksums."""
  workdir = tmp_path_factory.mktemp("base")
  train_and_evaluate(_config(4), str(workdir), progress=False)
  return workdir


def _files(step_dir):
  return sorted(os.path.join(folder, name) for folder, _, names in os.walk(step_dir) for name in names)


def _largest(step_dir, part):
  return max((f for f in _files(step_dir) if f"/{part}/" in f), key=os.path.getsize)


def _flip(path, offset, count=1):
  with open(path, "r+b") as f:
    f.seek(offset)
    data = bytearray(f.read(count))
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


def test_every_saved_step_has_checksums_and_verifies(base_run):
  for step in (2, 4):
    step_dir = base_run / "checkpoints" / str(step)
    assert (step_dir / integrity.CHECKSUMS).exists()
    assert integrity.step_problem(str(step_dir)) is None


def test_a_bit_flip_anywhere_in_a_step_is_detected(base_run, tmp_path):
  """Every file of the step, one random byte each time."""
  rng = random.Random(0)
  step_dir = tmp_path / "4"
  shutil.copytree(base_run / "checkpoints" / "4", step_dir)
  files = [f for f in _files(step_dir) if not f.endswith(integrity.CHECKSUMS)]
  assert len(files) >= 5
  for path in files:
    size = os.path.getsize(path)
    if not size:
      continue
    offset = rng.randrange(size)
    _flip(path, offset)
    problem = integrity.step_problem(str(step_dir))
    assert problem and os.path.relpath(path, step_dir) in problem and "checksum" in problem, (path, problem)
    _flip(path, offset)  # restored
  assert integrity.step_problem(str(step_dir)) is None


def _middle(path):
  return os.path.getsize(path) // 2


DAMAGE = {
    "bytes flipped in the params": lambda d: _flip(_largest(d, "params"), _middle(_largest(d, "params")), 64),
    "a truncated data file": lambda d: os.truncate(_largest(d, "train"), _middle(_largest(d, "train"))),
    "no _METADATA": lambda d: os.remove(os.path.join(d, "params", "_METADATA")),
    "no params/": lambda d: shutil.rmtree(os.path.join(d, "params")),
    "a damaged data-iterator file": lambda d: _flip(next(f for f in _files(d) if "/data/" in f), 0, 8),
    "an empty step folder": lambda d: (shutil.rmtree(d), os.makedirs(d)),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_step_is_set_aside_and_the_run_resumes_from_the_one_before(base_run, tmp_path, case,
                                                                                      capsys):
  workdir = tmp_path / "run"
  shutil.copytree(base_run, workdir)
  DAMAGE[case](str(workdir / "checkpoints" / "4"))
  capsys.readouterr()
  train_and_evaluate(_config(6), str(workdir), progress=False)
  out = capsys.readouterr().out
  assert "checkpoint step 4 is damaged:" in out and "set aside as 4.bad-0" in out, out[-2000:]
  assert "resumed from step 2" in out
  assert (workdir / "checkpoints" / "4.bad-0").is_dir()  # kept for a look, out of orbax's sight
  assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == [2, 4, 6]
  assert all(integrity.step_problem(str(workdir / "checkpoints" / s)) is None for s in ("2", "4", "6"))


def test_readers_use_the_newest_good_step(base_run, tmp_path):
  """load_model (and so generate, evaluation, export, init.*) skips a damaged newest step."""
  workdir = tmp_path / "run"
  shutil.copytree(base_run, workdir)
  good = inference.load_model(str(workdir)).params
  DAMAGE["bytes flipped in the params"](str(workdir / "checkpoints" / "4"))
  assert ckpt_lib.find_checkpoint_dir(str(workdir))[1] == 2
  older = inference.load_model(str(workdir)).params
  leaves = lambda params: [np.asarray(a) for a in jax.tree.leaves(params["llm"])]
  assert any(not np.array_equal(g, o) for g, o in zip(leaves(good), leaves(older)))  # step 2's, not 4's
  with pytest.raises(ValueError, match="checkpoint .*/4' is damaged: params/.* fails its checksum"):
    ckpt_lib.find_checkpoint_dir(str(workdir / "checkpoints" / "4"))
  assert (workdir / "checkpoints" / "4").is_dir()  # a reader renames nothing


def test_synchronous_saves_write_checksums_too(tmp_path):
  c = _config(2)
  c.checkpoint.async_save = False
  train_and_evaluate(c, str(tmp_path), progress=False)
  assert (tmp_path / "checkpoints" / "2" / integrity.CHECKSUMS).exists()
  assert integrity.step_problem(str(tmp_path / "checkpoints" / "2")) is None
