"""Stage handoffs: the tiny recipe's pretrain (32 px) -> cpt (48 px, AnyRes) -> sft, run once by
`python -m mm15_jax.tools.recipe`; position grids resized, fresh optimizer per stage, exact resumes."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import configs
from mm15_jax import sharding as shd
from mm15_jax.models.mm15 import position_grids
from mm15_jax.models.vit import resize_pos_embedding
from mm15_jax.tools import recipe
from mm15_jax.train import optimizer as opt_lib
from mm15_jax.train import state as state_lib
from mm15_jax.train.loop import train_and_evaluate
from mm15_jax.train.preemption import PreemptionWatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/tiny.py"
# Every stage: 4 steps, checkpoints at 2 and 4; the last stage answers one question per task.
ARGS = ["--config.train.steps=4", "--config.checkpoint.every=2", "--config.train.batch_size=8",
        "--config.data.num_examples=256", "--config.eval.batches=1", "--config.eval.generate_per_task=1",
        "--config.log_every=1"]


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
  """(workdir, log) of the three-stage recipe, run as a user runs it."""
  workdir = tmp_path_factory.mktemp("recipe")
  out = subprocess.run([sys.executable, "-m", "mm15_jax.tools.recipe", f"--config={TINY}", f"--workdir={workdir}",
                        "--", *ARGS], cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return workdir, out.stdout + out.stderr


def stage_config(stage, *extra):
  return recipe.stage_config(os.path.join(ROOT, TINY), stage, [*ARGS, *extra])


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in rows(workdir) if "kind" not in r}


def stored_params(workdir, config):
  setup = state_lib.make_setup(config, shd.mesh_for_config(config))
  return jax.device_get(ckpt_lib.load_params(str(workdir), setup.abstract_state["params"]))


def bilinear_f64(table, out_h, out_w):
  """Half-pixel-centre bilinear resizing of a [h, w, d] grid, edges clamped, in float64."""
  def weights(n_in, n_out):
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
      src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
      lo = int(np.floor(src))
      hi = min(lo + 1, n_in - 1)
      m[i, lo] += 1 - (src - lo)
      m[i, hi] += src - lo
    return m
  t = np.asarray(table, np.float64)
  return np.einsum("ih,jw,hwd->ijd", weights(t.shape[0], out_h), weights(t.shape[1], out_w), t)


@pytest.mark.parametrize("shape", [(4, 4, 3), (3, 5, 2)])
@pytest.mark.parametrize("grid", [(6, 6), (8, 7), (2, 3)])
def test_bilinear_grid_resize_against_float64(shape, grid):
  table = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  got = resize_pos_embedding(jax.numpy.asarray(table), *grid, "bilinear")
  np.testing.assert_allclose(np.asarray(got), bilinear_f64(table, *grid), atol=1e-6)


@pytest.mark.parametrize("grid", [(6, 6), (9, 5), (2, 3)])
def test_bicubic_grid_resize_against_torch(grid):
  torch = pytest.importorskip("torch")
  table = np.random.default_rng(1).normal(size=(4, 5, 3))
  want = torch.nn.functional.interpolate(torch.as_tensor(table).permute(2, 0, 1)[None], size=grid, mode="bicubic",
                                         align_corners=False)[0].permute(1, 2, 0).numpy()
  got = resize_pos_embedding(jax.numpy.asarray(table, jax.numpy.float32), *grid, "bicubic")
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_cpt_starts_from_pretrain_with_resized_grids(staged):
  workdir, log = staged
  pretrain, cpt = stage_config("pretrain"), stage_config("cpt")
  assert (pretrain.model.vit.image_size, cpt.model.vit.image_size) == (32, 48)
  before = stored_params(workdir / "pretrain", pretrain)
  setup = state_lib.make_setup(cpt, shd.mesh_for_config(cpt))
  notes = []
  after = jax.device_get(ckpt_lib.load_params(str(workdir / "pretrain"), setup.abstract_state["params"],
                                              grids=position_grids(cpt.model), report=notes.append))
  for part in ("vit", "connector"):
    np.testing.assert_allclose(after[part]["pos_embedding"], bilinear_f64(before[part]["pos_embedding"], 6, 6),
                               atol=1e-6)
    assert f"{part}/pos_embedding: position grid resized 4x4 -> 6x6 (bilinear)" in log  # one line each, as run
  assert len(notes) == 2
  # Everything else is handed over as stored.
  flat_before = jax.tree_util.tree_leaves_with_path(before)
  flat_after = dict(jax.tree_util.tree_leaves_with_path(after))
  for path, value in flat_before:
    if "pos_embedding" not in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(flat_after[path], value)


def test_each_stage_has_its_own_step_count_schedule_and_images(staged):
  workdir, log = staged
  for stage in ("pretrain", "cpt", "sft"):
    config = stage_config(stage)
    train = [r for r in rows(workdir / stage) if "kind" not in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    schedule = opt_lib.learning_rate_schedule(config.train)  # a fresh schedule from the stage's step 0
    assert [r["lr"] for r in train] == pytest.approx([float(schedule(s - 1)) for s in (1, 2, 3, 4)], rel=1e-5)
    assert ckpt_lib.latest_step(str(workdir / stage / "checkpoints")) == 4
  assert f"params from {workdir / 'pretrain'}" in log and f"params from {workdir / 'cpt'}" in log
  # The last stage ends with the generation report.
  assert (workdir / "sft" / "eval_tasks" / "REPORT.md").exists()


def test_relaunched_recipe_skips_finished_stages_and_resumes_an_unfinished_one(staged, tmp_path):
  workdir, _ = staged
  entries = recipe.plan(os.path.join(ROOT, TINY), str(workdir), [], ARGS)
  assert [(e["stage"], e["finished"]) for e in entries] == [("pretrain", True), ("cpt", True), ("sft", True)]
  # An sft interrupted after its step-2 checkpoint is the one stage left to run.
  copy = tmp_path / "recipe"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "sft" / "checkpoints" / "4")
  entries = recipe.plan(os.path.join(ROOT, TINY), str(copy), [], ARGS)
  assert [e["finished"] for e in entries] == [True, True, False]
  assert entries[2]["done_steps"] == 2
  assert f"--config.init.from_checkpoint={copy / 'cpt'}" in entries[2]["args"]
  with pytest.raises(ValueError, match="checkpoint.every=0"):
    recipe.plan(os.path.join(ROOT, TINY), str(copy), [], [*ARGS, "--config.checkpoint.every=0"])
  with pytest.raises(ValueError, match="not stages of"):
    recipe.plan(os.path.join(ROOT, TINY), str(copy), ["finetune"], ARGS)


def test_interrupted_cpt_resumes_exactly(staged, tmp_path, monkeypatch):
  workdir, _ = staged
  config = stage_config("cpt", f"--config.init.from_checkpoint={workdir / 'pretrain'}",
                        "--config.eval.generate_per_task=0")
  # A preemption after step 2: the run saves there and stops, as on SIGTERM.
  monkeypatch.setattr(PreemptionWatch, "should_stop", lambda self, step: step == 2)
  assert train_and_evaluate(config, str(tmp_path), progress=False) == dict(preempted_at=2)
  monkeypatch.undo()
  train_and_evaluate(config, str(tmp_path), progress=False)  # the relaunch: a resume, not a handoff
  want, got = train_losses(workdir / "cpt"), train_losses(tmp_path)
  for step in (3, 4):
    assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)
  unbroken, resumed = stored_params(workdir / "cpt", config), stored_params(tmp_path, config)
  for a, b in zip(jax.tree.leaves(unbroken), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, named", [
    ("--config.model.llm.mlp_dim=128", "llm/layers"),
    # A changed encoder width is no grid resize: its position table is refused, by name.
    ("--config.model.vit.width=48", "connector/pos_embedding: stored (4, 4, 32), config (6, 6, 48)")])
def test_other_shape_changes_are_refused_by_name(staged, change, named):
  workdir, _ = staged
  config = stage_config("cpt", change)
  setup = state_lib.make_setup(config, shd.mesh_for_config(config))
  with pytest.raises(ValueError, match="does not match config.model") as err:
    ckpt_lib.load_params(str(workdir / "pretrain"), setup.abstract_state["params"], grids=position_grids(config.model))
  assert named in str(err.value)


def test_handoff_on_two_processes_places_the_same_params(staged, tmp_path):
  """A cpt started by launch/local.sh 2 hands over the same params as one process: its first
  update has learning rate 0 (warmup), so its step-1 checkpoint holds the handed-over params."""
  workdir, _ = staged
  env = {**os.environ, "PYTHON": sys.executable, "MM15_LOCAL_DEVICES": "8"}
  env.pop("XLA_FLAGS", None)  # local.sh gives each process its share
  out = subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "--", f"--config={TINY}:cpt", f"--workdir={tmp_path}",
       "--no_progress", *ARGS, "--config.train.steps=2", "--config.checkpoint.every=1",
       "--config.eval.generate_per_task=0", f"--config.init.from_checkpoint={workdir / 'pretrain'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log[-3000:]
  assert log.count("vit/pos_embedding: position grid resized 4x4 -> 6x6") == 1  # process 0 reports
  config = stage_config("cpt", "--config.train.steps=2")
  assert float(opt_lib.learning_rate_schedule(config.train)(0)) == 0.0
  setup = state_lib.make_setup(config, shd.mesh_for_config(config))
  want = jax.device_get(ckpt_lib.load_params(str(workdir / "pretrain"), setup.abstract_state["params"],
                                             grids=position_grids(config.model)))
  got = stored_params(tmp_path / "checkpoints" / "1", config)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(b, a)


def test_encoder_from_another_run_is_resized_too(staged):
  """init.vit_from (an import or any run) goes through the same resize as a whole-model handoff."""
  workdir, _ = staged
  before = stored_params(workdir / "pretrain", stage_config("pretrain"))
  cpt = stage_config("cpt")
  setup = state_lib.make_setup(cpt, shd.mesh_for_config(cpt))
  fresh = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype, device=s.sharding), setup.abstract_state["params"])
  notes = []
  parts = {"vit": str(workdir / "pretrain")}
  params = jax.device_get(ckpt_lib.load_param_parts(fresh, setup.abstract_state["params"], parts,
                                                    grids=position_grids(cpt.model), report=notes.append))
  np.testing.assert_allclose(params["vit"]["pos_embedding"], bilinear_f64(before["vit"]["pos_embedding"], 6, 6),
                             atol=1e-6)
  assert [n.split(":")[0] for n in notes] == ["vit/pos_embedding"]
  assert not np.any(params["connector"]["pos_embedding"])  # the other parts are left as they were


def test_paper_recipe_prints_each_stage_chained(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "mm15_jax.tools.recipe", "--config=experiments/mm15_3b.py", "--workdir=gs://bucket/3b",
       "--launcher=slurm", "--dry_run", "--", "--config.mesh.fsdp=8"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
  assert [line.split(":")[0] for line in lines] == ["[1/3] pretrain", "[2/3] cpt", "[3/3] sft"]
  assert "experiments/mm15_3b.py:cpt gs://bucket/3b/cpt" in lines[1]
  assert "--config.init.from_checkpoint=gs://bucket/3b/pretrain" in lines[1]
  assert "--dependency=afterok:<pretrain job id>" in lines[1] and "--config.mesh.fsdp=8" in lines[2]


def test_spatial_experiment_chains_its_stages(tmp_path):
  """experiments/tiny_spatial.py: an encoder, the spatial stage from it, then the quick start's
  mixture from that (the encoder's handoff: tests/test_encoder_stage.py)."""
  path = os.path.join(ROOT, "experiments", "tiny_spatial.py")
  entries = recipe.plan(path, str(tmp_path), [], [])
  assert [e["stage"] for e in entries] == ["encoder", "spatial", "sft"]
  assert f"--config.init.from_checkpoint={tmp_path / 'spatial'}" in entries[2]["args"]
  spatial, sft = (configs.load_experiment(f"{path}:{stage}") for stage in ("spatial", "sft"))
  quick = configs.load_experiment(os.path.join(ROOT, "experiments", "tiny.py"))
  assert not spatial.data.anyres.enabled and not sft.data.anyres.enabled  # the encoder's single tiles
  assert sft.data.sources.to_dict() == quick.data.sources.to_dict() and sft.train.lr < quick.train.lr
  assert spatial.model.to_dict() == sft.model.to_dict() == quick.model.to_dict()  # one model: nothing to resize
