"""Sharding constraints are strict in training and lenient only where inference asks
(mm15_jax/sharding.py `use_rules(..., lenient=True)`): an activation whose dimension does not
divide over its mesh axes is an error naming the array's logical axes, the dimension, its size
and the mesh axes, not a silently dropped constraint; likewise MoE's unsharded fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mm15_jax import configs
from mm15_jax import sharding as shd
from mm15_jax.batch import MODEL_INPUTS
from mm15_jax.inference import decode
from mm15_jax.models import moe as moe_lib
from mm15_jax.models.mm15 import MM15

RULES = configs.DEFAULT_RULES
AXES = ("batch", "length", "embed")


def data_mesh(n=8):
  return shd.make_mesh(dict(data=n, fsdp=8 // n, tensor=1, expert=1))


def test_training_constrain_on_an_indivisible_dimension_names_it():
  mesh = data_mesh()
  x = jnp.zeros((3, 4, 16))
  with shd.use_rules(mesh, RULES):
    assert not shd.lenient()
    with pytest.raises(ValueError) as e:
      shd.constrain(x, AXES)
    with pytest.raises(ValueError, match=r"logical axes \('batch', 'length', 'embed'\)"):
      jax.jit(lambda a: shd.constrain(a, AXES))(x)  # at trace time, as in a train step
  message = str(e.value)
  for part in ("('batch', 'length', 'embed')", "dimension 0 ('batch') of size 3", "('data',)", "data=8",
               "config.train.batch_size"):
    assert part in message, message


def test_training_constrain_names_the_tensor_axis_too():
  mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=8, expert=1))
  with shd.use_rules(mesh, RULES), pytest.raises(ValueError, match=r"dimension 2 \('heads'\) of size 4 .*tensor=8"):
    shd.constrain(jnp.zeros((2, 3, 4, 8)), ("batch", "length", "heads", "head_dim"))


def test_training_constrain_applies_when_it_divides():
  mesh = data_mesh()
  with shd.use_rules(mesh, RULES):
    out = jax.jit(lambda a: shd.constrain(a, AXES))(jnp.ones((8, 4, 16)))
  assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, shd.logical_to_mesh(AXES, RULES, mesh)), 3)
  assert out.sharding.spec[0] == "data"


def test_inference_constrain_passes_an_indivisible_array_through():
  mesh = data_mesh()
  x = jnp.arange(3 * 4 * 16, dtype=jnp.float32).reshape(3, 4, 16)
  with shd.use_rules(mesh, RULES, lenient=True):
    assert shd.lenient()
    assert shd.constrain(x, AXES) is x
    np.testing.assert_array_equal(jax.jit(lambda a: shd.constrain(a, AXES) * 2)(x), x * 2)
  assert not shd.lenient()  # outside any context: nothing active


def test_lenient_is_per_context_and_restored():
  mesh = data_mesh()
  with shd.use_rules(mesh, RULES, lenient=True):
    with shd.use_rules(mesh, RULES):
      assert not shd.lenient()
      with pytest.raises(ValueError):
        shd.constrain(jnp.zeros((1, 2, 16)), AXES)
    assert shd.lenient()
  assert shd.active_mesh() is None and not shd.lenient()


def moe_layer():
  settings = moe_lib.moe_settings(dict(configs.base().model.moe.to_dict(), num_experts=4), 24)
  return moe_lib.MoE(16, settings, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_moe_fallback_is_an_error_in_training_and_allowed_at_inference():
  layer = moe_layer()
  x = jnp.asarray(np.random.RandomState(0).randn(1, 5, 16), jnp.float32)  # 5 tokens, 8 batch shards
  want, _ = layer(x)  # no rules: one local call
  mesh = data_mesh()
  with shd.use_rules(mesh, RULES), pytest.raises(ValueError, match=r"MoE: 5 tokens .* do not split over the batch "
                                                                    r"mesh axes \('data',\) \(8 shards\)"):
    layer(x)
  with shd.use_rules(mesh, RULES, lenient=True):
    got, _ = layer(x)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_inference_forward_runs_a_batch_of_one_that_training_refuses():
  """decode.jit_forward (what load_model's logits use) enters lenient rules: a batch of one on 8
  data shards runs; the same forward under training's rules names the batch axis."""
  c = configs.base().model
  model = MM15(c, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  length, s = 8, c.vit.image_size
  batch = dict(tokens=np.zeros((1, length), np.int32), positions=np.arange(length, dtype=np.int32)[None],
               segment_ids=np.ones((1, length), np.int32), images=np.zeros((1, 0, s, s, 3), np.uint8),
               image_token_positions=np.zeros((1, 0), np.int32))
  mesh = data_mesh()
  logits = decode.jit_forward(graphdef, rest, mesh, RULES)(params, batch)
  assert logits.shape == (1, length, c.llm.vocab_size) and np.isfinite(np.asarray(logits)).all()

  def training_forward(p, b):
    with shd.use_rules(mesh, RULES):
      return nnx.merge(graphdef, p, rest)(*(b[k] for k in MODEL_INPUTS)).logits

  with pytest.raises(ValueError, match=r"dimension 0 \('batch'\) of size 1 does not divide"):
    jax.jit(training_forward)(params, batch)
