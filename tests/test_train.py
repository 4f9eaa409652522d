"""The train step: sharding invariance, accumulation, the optimizer, overfitting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_setup import host_batch, place, setup_on, tiny_config, train_on_fixed_batch

from mm15_jax.train import optimizer as opt_lib
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib
from mm15_jax.train.loss import masked_cross_entropy


def loss_and_grads_on(config, mesh_axes, batch, devices=None):
  setup = setup_on(config, mesh_axes, devices)
  state = state_lib.init_state(setup)
  loss, _, grads = step_lib.jit_loss_and_grads(setup)(state["params"], place(setup, batch))
  return float(loss), jax.device_get(grads), setup, state


def test_same_loss_and_grads_on_one_device_and_on_a_3d_mesh():
  config = tiny_config()
  batch = host_batch(config)
  loss1, grads1, _, _ = loss_and_grads_on(config, dict(data=1, fsdp=1, tensor=1, expert=1), batch, jax.devices()[:1])
  loss8, grads8, setup8, state8 = loss_and_grads_on(config, dict(data=2, fsdp=2, tensor=2, expert=1), batch)
  # The 3-D mesh really shards: an MLP kernel is split over fsdp and tensor.
  assert any(len(x.sharding.device_set) == 8 and x.addressable_shards[0].data.size < x.size
             for x in jax.tree.leaves(state8["params"]))
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for g1, g8 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)):
    np.testing.assert_allclose(g8, g1, rtol=2e-4, atol=2e-6)


def test_gradient_accumulation_equals_full_batch():
  config = tiny_config()
  batch = host_batch(config)
  mesh = dict(data=2, fsdp=1, tensor=1, expert=1)
  loss1, grads1, _, _ = loss_and_grads_on(config, mesh, batch, jax.devices()[:2])
  config.train.grad_accum = 2
  loss2, grads2, _, _ = loss_and_grads_on(config, mesh, batch, jax.devices()[:2])
  np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads2)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)


def test_masked_cross_entropy_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7))
  targets = rng.integers(0, 7, size=(2, 5))
  mask = (rng.random((2, 5)) > 0.4).astype(np.float32)
  log_z = np.log(np.exp(logits).sum(-1))
  nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  loss, z, correct = masked_cross_entropy(jnp.asarray(logits, jnp.float32), targets, mask, z_loss=1e-3)
  np.testing.assert_allclose(loss, (nll * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(z, 1e-3 * (log_z**2 * mask).sum(), rtol=1e-5)
  assert correct == ((logits.argmax(-1) == targets) * mask).sum()


def test_schedule_warmup_then_cosine():
  t = tiny_config().train
  t.steps, t.warmup_steps, t.lr, t.lr_min_ratio = 100, 10, 1.0, 0.1
  s = opt_lib.learning_rate_schedule(t)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  # Cosine from 1 to 0.1 over the 90 remaining steps: halfway is 0.55.
  assert float(s(55)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 45 / 90)), rel=1e-4)
  assert float(s(100)) == pytest.approx(0.1)


def test_weight_decay_mask_spares_norms_and_biases():
  logical = {"a": {"kernel": ("embed", "mlp"), "scale": ("embed",)},
             "b": {"stacked": ("layers", "embed", "mlp"), "norm": ("layers", "embed")}}
  assert opt_lib.decay_mask(logical) == {"a": {"kernel": True, "scale": False},
                                         "b": {"stacked": True, "norm": False}}


def test_frozen_components_do_not_change():
  config = tiny_config()
  config.train.trainable = "connector,llm"
  setup = setup_on(config, dict(data=2, fsdp=1, tensor=1, expert=1), jax.devices()[:2])
  state = state_lib.init_state(setup)
  before = jax.device_get(state["params"])
  step = step_lib.jit_train_step(setup)
  for _ in range(2):  # the first step's learning rate is 0 (warmup)
    state, _ = step(state, place(setup, host_batch(config)))
  after = jax.device_get(state["params"])
  for a, b in zip(jax.tree.leaves(before["vit"]), jax.tree.leaves(after["vit"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["llm"]), jax.tree.leaves(after["llm"])))


def test_non_finite_step_never_reaches_the_weights():
  config = tiny_config()
  setup = setup_on(config, dict(data=2, fsdp=1, tensor=1, expert=1), jax.devices()[:2])
  state = state_lib.init_state(setup)
  before = jax.device_get(state["params"])
  batch = host_batch(config)
  batch["images"] = np.full(batch["images"].shape, np.nan, np.float32)  # float: taken as normalised
  state, metrics = step_lib.jit_train_step(setup)(state, place(setup, batch))
  assert not bool(metrics["finite"])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state["params"]))):
    np.testing.assert_array_equal(a, b)


def test_tiny_model_overfits_a_fixed_batch():
  config = tiny_config()
  config.train.steps, config.train.warmup_steps, config.train.lr = 60, 5, 1e-2
  losses, _ = train_on_fixed_batch(setup_on(config, dict(data=2, fsdp=2, tensor=2, expert=1)), config)
  assert losses[-1] < losses[0] / 10, losses[::10]


def test_no_recompiles_after_the_first_step():
  """Batches of the schema never retrigger compilation: one compile serves the whole run."""
  compiles = []  # every trace, lowering or compile jax reports

  def listen(event, seconds, **kwargs):
    if event.startswith("/jax/core/compile"):
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  config = tiny_config()
  setup = setup_on(config, dict(data=2, fsdp=1, tensor=1, expert=1), jax.devices()[:2])
  state = state_lib.init_state(setup)
  step = step_lib.jit_train_step(setup)
  state, _ = step(state, place(setup, host_batch(config, 0)))
  before = len(compiles)
  for i in range(1, 4):  # new data, same shapes
    state, metrics = step(state, place(setup, host_batch(config, i)))
  jax.block_until_ready(metrics)
  assert before > 0 and compiles[before:] == []
  # The listener does see a retrace: a batch of another length compiles again.
  config.train.batch_size = 4
  step(state, place(setup, host_batch(config, 0)))
  assert len(compiles) > before
