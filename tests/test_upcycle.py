"""MoE upcycling (config.init.upcycle_from): an MoE run that starts as the dense run it came from."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_setup import host_batch, place, setup_on, tiny_config

from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import sharding as shd
from mm15_jax.batch import MODEL_INPUTS
from mm15_jax.convert import importer
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib
from mm15_jax.train import upcycle
from mm15_jax.train.config_checks import check_config
from mm15_jax.train.loop import train_and_evaluate

DATA = dict(data=8, fsdp=1, tensor=1, expert=1)
EXPERTS = dict(data=1, fsdp=2, tensor=1, expert=4)  # 4 experts, one per expert shard; params fsdp-sharded


def moe_config(**overrides):
  # experiments/tiny_moe.py has experts half the dense FFN; upcycling copies the FFN, so its size.
  # "auto" (ragged_dot here) is dropless; a "capacity" run equals the dense model only where nothing is dropped.
  return tiny_config("tiny_moe.py", **{"model.moe.expert_mlp_dim": 0, "model.moe.impl": "auto", **overrides})


def few_steps(config, steps):
  config.train.steps, config.train.warmup_steps = steps, 1
  config.eval.generate_per_task = 0
  return config


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  """A dense tiny run's workdir, trained a few steps so its params are no longer anyone's init."""
  workdir = tmp_path_factory.mktemp("dense")
  config = few_steps(tiny_config(), 2)
  setup = setup_on(config, DATA)
  state, step = state_lib.init_state(setup), step_lib.jit_train_step(setup)
  for i in range(config.train.steps):
    state, _ = step(state, place(setup, host_batch(config, i + 1)))
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.workdir_checkpoints(str(workdir)), async_save=False)
  checkpointer.save(state)
  checkpointer.close()
  return workdir


def logits_fn(setup):
  def fn(params, batch):
    with shd.use_rules(setup.mesh, setup.config.sharding_rules):
      model = nnx.merge(setup.graphdef, params, setup.rest)
      return model(*(batch[k] for k in MODEL_INPUTS)).logits
  return jax.jit(fn)


def cross_entropy(logits, batch):
  """Mean masked next-token cross-entropy in float64 numpy: what the train step logs as `loss`."""
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  picked = np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  mask = np.asarray(batch["loss_mask"], np.float64)
  return float(np.sum((logz - picked) * mask) / np.sum(mask))


@pytest.fixture(scope="module")
def dense(dense_run):
  """The dense model's params (host), a real batch, and its logits and loss on it, by the dense model."""
  config = tiny_config()
  setup = setup_on(config, DATA)
  params = ckpt_lib.load_params(str(dense_run), setup.abstract_state["params"])
  batch = host_batch(config)
  logits = np.asarray(logits_fn(setup)(params, place(setup, batch)))
  return dict(params=jax.device_get(params), batch=batch, logits=logits, loss=cross_entropy(logits, batch))


@pytest.fixture(scope="module")
def upcycled_ep(dense_run):
  """(setup, upcycled params, the fresh init they started from on the host) under expert parallelism."""
  setup = setup_on(moe_config(), EXPERTS)
  init = state_lib.init_state(setup)["params"]
  fresh = jax.device_get(init)
  return setup, upcycle.load_upcycled(str(dense_run), setup, init), fresh


def upcycle_on(setup, dense_run, fresh):
  # The init as init_state makes it (same seed), placed rather than compiled again.
  return upcycle.load_upcycled(str(dense_run), setup, jax.device_put(fresh, setup.param_shardings))


def test_experts_copy_the_dense_ffn_and_routers_start_fresh(upcycled_ep, dense):
  setup, params, fresh = upcycled_ep
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(setup.param_shardings)):
    assert x.sharding == s  # built in the training shardings
  got, want = jax.device_get(params), dense["params"]
  interval, n_layers = setup.config.model.moe.interval, setup.config.model.llm.n_layers
  dense_layers, moe_layers = want["llm"]["layers"], got["llm"]["layers"]
  at = lambda tree, *idx: jax.tree.map(lambda a: np.asarray(a)[idx], tree)
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  for layer in range(n_layers):
    group, pos = divmod(layer, interval)
    block = at(dense_layers, layer)
    if pos < interval - 1:  # a dense block of the group
      same(at(moe_layers["dense"], group, pos), block)
      continue
    ffn = {k: block.pop(k) for k in ("gate", "up", "down")}
    same({k: v for k, v in at(moe_layers["sparse"], group).items() if k != "moe"}, block)
    for name, w in ffn.items():
      experts = moe_layers["sparse"]["moe"][name][group]
      assert experts.shape == (4,) + w.shape
      for e in range(4):
        np.testing.assert_array_equal(experts[e], w, err_msg=f"layer {layer} expert {e} {name}")
  # The router is the MoE model's own init.
  router = lambda p: p["llm"]["layers"]["sparse"]["moe"]["router"]
  np.testing.assert_array_equal(router(got), router(fresh))
  # Everything outside the layers is the dense run's (which trained away from the init).
  outside = lambda p: dict(vit=p["vit"], connector=p["connector"],
                           llm={k: v for k, v in p["llm"].items() if k != "layers"})
  same(outside(got), outside(want))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(outside(want)), jax.tree.leaves(outside(fresh))))


def test_an_imported_decoder_alone_is_upcycled_the_rest_keeps_its_init(dense, upcycled_ep, tmp_path):
  importer.save_part(str(tmp_path), "llm", dense["params"]["llm"])  # as `convert import --kind=llm` writes
  setup, want, fresh = upcycled_ep
  got = jax.device_get(upcycle_on(setup, tmp_path, fresh))
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  same(got["llm"], jax.device_get(want["llm"]))
  same({k: got[k] for k in ("vit", "connector")}, {k: fresh[k] for k in ("vit", "connector")})


@pytest.mark.parametrize("mesh", ["data", "expert_parallel"])
def test_upcycled_model_computes_the_dense_logits(dense_run, upcycled_ep, dense, mesh):
  setup, params, fresh = upcycled_ep
  if mesh == "data":
    setup = setup_on(moe_config(), DATA)
    params = upcycle_on(setup, dense_run, fresh)
  logits = np.asarray(logits_fn(setup)(params, place(setup, dense["batch"])))
  valid = np.asarray(dense["batch"]["segment_ids"]) != 0  # padding takes no expert: its output differs
  assert valid.sum() > 100
  np.testing.assert_allclose(logits[valid], dense["logits"][valid], rtol=1e-5, atol=1e-5)
  assert cross_entropy(logits, dense["batch"]) == pytest.approx(dense["loss"], rel=1e-6)


def test_training_run_with_upcycle_from_starts_at_the_dense_loss(dense_run, dense, tmp_path, capsys):
  config = few_steps(moe_config(**{"init.upcycle_from": str(dense_run)}), 2)
  config.mesh = EXPERTS
  config.checkpoint.every = 0
  assert host_batch(config)["tokens"].tolist() == dense["batch"]["tokens"].tolist()  # the run's first batch
  result = train_and_evaluate(config, str(tmp_path), progress=False)
  assert f"upcycled from {dense_run}" in capsys.readouterr().out
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if '"kind"' not in line]
  assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(dense["loss"], rel=1e-5)
  assert np.isfinite(rows[1]["loss"]) and np.isfinite(result["loss"])
  assert rows[0]["dropped_tokens"] == 0 and len(rows[0]["expert_load"]) == 4


def test_bad_upcycling_configs_are_refused(dense_run):
  with pytest.raises(ValueError, match=r"init.upcycle_from='/d'.*model.moe.num_experts=0"):
    check_config(tiny_config(**{"init.upcycle_from": "/d"}), paths=False)
  with pytest.raises(ValueError, match=r"model.moe.expert_mlp_dim=96 differs from model.llm.mlp_dim=192"):
    check_config(tiny_config("tiny_moe.py", **{"init.upcycle_from": "/d"}), paths=False)
  for field in ("from_checkpoint", "llm_from"):
    with pytest.raises(ValueError, match=rf"init.upcycle_from='/d' and init.{field}='/e' are both set"):
      check_config(moe_config(**{"init.upcycle_from": "/d", f"init.{field}": "/e"}), paths=False)
  check_config(moe_config(**{"init.upcycle_from": "/d"}), paths=False)  # fine until it is read
  setup = setup_on(moe_config(), DATA)  # abstract: nothing is allocated
  with pytest.raises(FileNotFoundError, match="config.init.upcycle_from="):
    upcycle.load_upcycled(str(dense_run / "nowhere"), setup, None)
  deeper = setup_on(moe_config(**{"model.llm.n_layers": 4}), DATA)
  with pytest.raises(ValueError, match=r"upcycle_from=.*not this experiment's dense model(.|\n)*llm/layers"):
    upcycle.load_upcycled(str(dense_run), deeper, None)
