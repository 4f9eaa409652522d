"""Modes (mm15_jax/modes.py): one enum per config field that names a mode, used alike by the config
checks and the constructors; configs.base() as the one place a default is written."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from tiny_setup import set_fields, tiny_config

from data_pipelines import sequence
from data_pipelines import tokenizer as tokenizer_lib
from mm15_jax import configs, modes, run_record
from mm15_jax.models import attention, llm, moe
from mm15_jax.models.connector import make_connector
from mm15_jax.models.mm15 import MM15
from mm15_jax.models.vit import VisionTransformer, resize_pos_embedding
from mm15_jax.train import config_checks
from mm15_jax.train import optimizer as opt_lib
from mm15_jax.train import step as step_lib
from mm15_jax.train.best_checkpoint import BestCheckpoint

CASES = [(mode, value) for mode in modes.FIELDS for value in modes.values(mode)]


def case_id(case):
  return f"{case.__name__}" if isinstance(case, type) else str(case)


def typo(value: str) -> str:
  return value[:-1] if len(value) > 3 else value + "x"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer_lib.load_tokenizer(512, cache_dir=str(tmp_path_factory.mktemp("tok")))


def test_every_mode_field_is_in_base_with_an_allowed_value():
  c = configs.base()
  assert set(modes.FIELDS.values()) >= {"model.remat", "model.attention_impl", "model.moe.impl", "train.nan_policy",
                                        "data.anyres.indicators", "data.overlong"}
  for mode, field in modes.FIELDS.items():
    value = c[field]
    assert type(value) is str and modes.parse(mode, value) == value, (field, value)  # configs keep plain strings
  assert all(isinstance(m, str) and m == m.value for mode in modes.FIELDS for m in mode)


@pytest.mark.parametrize("mode,value", CASES, ids=case_id)
def test_config_checks_accept_every_value(mode, value):
  config = tiny_config(**{modes.FIELDS[mode]: value})
  assert config_checks.mode_errors(config) == []
  config_checks.check_config(config, paths=False)


@pytest.mark.parametrize("mode,value", CASES, ids=case_id)
def test_a_bad_value_names_the_field_the_values_and_the_closest(mode, value):
  field, bad = modes.FIELDS[mode], typo(value)
  if bad in modes.values(mode):
    return
  with pytest.raises(ValueError) as e:
    modes.parse(mode, bad)
  message = str(e.value)
  assert message.startswith(f"config.{field}={bad!r}: expected one of {modes.values(mode)}"), message
  assert f"did you mean {value!r}?" in message and f"--config.{field}={value}" in message, message
  # The config checks say the same, among the rest of the config's errors.
  with pytest.raises(ValueError, match="invalid config") as e:
    config_checks.check_config(tiny_config(**{field: bad}), paths=False)
  assert f"{field}={bad!r}" in str(e.value)
  assert mode is modes.WandbMode or message in str(e.value)


def test_trainable_parts_are_the_component_enum():
  parts = opt_lib.trainable_components(ml_collections.ConfigDict(dict(trainable="all")))
  assert parts == tuple(modes.Component) == ("vit", "connector", "llm")
  assert opt_lib.trainable_components(ml_collections.ConfigDict(dict(trainable="llm, vit"))) == ("llm", "vit")
  with pytest.raises(ValueError, match="invalid config") as e:
    config_checks.check_config(tiny_config(**{"train.trainable": "llm,decoder"}), paths=False)
  assert "config.train.trainable='llm,decoder': unknown parts ['decoder']" in str(e.value)


# ---------------------------------------------------------------- constructors

def tiny_model_config(**fields):
  return set_fields(configs.base().model, fields)


@pytest.mark.parametrize("value", modes.values(modes.Remat))
def test_decoder_takes_every_remat(value):
  c = configs.base().model
  llm.remat_policy(value)
  llm.Decoder(c.llm, remat=value, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("value", modes.values(modes.AttentionImpl))
def test_every_attention_impl_is_known(value):
  assert attention.check_impl(value, platform=False) == value  # the platform is checked when it runs
  llm.Decoder(configs.base().model.llm, attention_impl=value, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("value", modes.values(modes.MoeImpl))
def test_moe_takes_every_impl(value):
  c = tiny_model_config(**{"moe.num_experts": 4, "moe.impl": value})
  settings = moe.moe_settings(c.moe, c.llm.mlp_dim)
  assert settings["impl"] is modes.MoeImpl(value)
  layer = moe.MoE(16, settings, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  y, _ = layer(jnp.ones((2, 4, 16)))
  assert y.shape == (2, 4, 16)


@pytest.mark.parametrize("value", modes.values(modes.ConnectorKind))
def test_every_connector_kind_builds(value):
  c = tiny_model_config(**{"connector.kind": value})
  out = make_connector(c, nnx.Rngs(0))(jnp.ones((1, 16, c.vit.width)))
  assert out.shape == (1, c.connector.tokens_per_tile, c.llm.d_model)


@pytest.mark.parametrize("mode,field", [(modes.PosResize, "pos_resize"), (modes.VitAct, "act")])
def test_vit_takes_every_pos_resize_and_act(mode, field):
  for value in modes.values(mode):
    c = tiny_model_config(**{f"vit.{field}": value})
    feats = VisionTransformer(c.vit, rngs=nnx.Rngs(0))(jnp.ones((1, 48, 48, 3)))  # a 6x6 grid, resized
    assert feats.shape == (1, 36, c.vit.width)
  for value in modes.values(modes.PosResize):
    assert resize_pos_embedding(jnp.ones((2, 2, 3)), 3, 3, value).shape == (3, 3, 3)


@pytest.mark.parametrize("value", modes.values(modes.RopeScaling))
def test_decoder_takes_every_rope_scaling(value):
  c = tiny_model_config(**{"llm.rope_scaling.kind": value, "llm.rope_scaling.factor": 2.0})
  decoder = llm.Decoder(c.llm, rngs=nnx.Rngs(0))
  scaled = llm.rope_frequencies(8, 10_000.0, dict(c.llm.rope_scaling))
  assert (decoder.layers.rope_scaling is None) == (value == "none")
  assert np.allclose(scaled, llm.rope_frequencies(8, 10_000.0)) == (value == "none")


@pytest.mark.parametrize("indicators", modes.values(modes.Indicators))
@pytest.mark.parametrize("overlong", modes.values(modes.Overlong))
def test_example_builder_takes_every_indicators_and_overlong(tok, indicators, overlong):
  config = tiny_config(**{"data.anyres.indicators": indicators, "data.overlong": overlong})
  builder = sequence.ExampleBuilder.from_config(config, tok)
  assert (builder.indicators, builder.overlong) == (indicators, overlong)
  assert isinstance(builder.indicators, modes.Indicators) and isinstance(builder.overlong, modes.Overlong)


def test_example_builder_refuses_a_bad_value_by_field(tok):
  with pytest.raises(ValueError, match=r"config.data.anyres.indicators='indx': .*did you mean 'index'\?"):
    sequence.ExampleBuilder(tok, seq_len=64, tile=8, tokens_per_tile=4, indicators="indx")
  with pytest.raises(ValueError, match=r"config.data.overlong='truncat': .*did you mean 'truncate'\?"):
    sequence.ExampleBuilder(tok, seq_len=64, tile=8, tokens_per_tile=4, overlong="truncat")


@pytest.mark.parametrize("value", modes.values(modes.BestMode))
def test_best_checkpoint_takes_every_mode(tmp_path, value):
  assert BestCheckpoint(str(tmp_path), "loss", value).mode == value
  with pytest.raises(ValueError, match=r"config.eval.best_mode='mn': .*did you mean 'min'\?"):
    BestCheckpoint(str(tmp_path), "loss", "mn")


def test_constructors_name_the_field_of_a_bad_value():
  c = configs.base().model
  with pytest.raises(ValueError, match=r"config.model.remat='ful': .*did you mean 'full'\?"):
    llm.Decoder(c.llm, remat="ful", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"config.model.moe.impl='ragd': .*did you mean 'ragged'\?"):
    MM15(tiny_model_config(**{"moe.num_experts": 4, "moe.impl": "ragd"}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"config.model.connector.kind='c_abstracter'"):
    MM15(tiny_model_config(**{"connector.kind": "c_abstracter"}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"config.model.vit.pos_resize='bicubc'"):
    VisionTransformer(tiny_model_config(**{"vit.pos_resize": "bicubc"}).vit, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"config.model.llm.rope_scaling.kind='llama'"):
    llm.Decoder(tiny_model_config(**{"llm.rope_scaling.kind": "llama"}).llm, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- base() is the one place a default is written

def without(config, field):
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  del node[leaf]
  return config


def test_a_field_missing_from_the_config_is_an_error_not_a_second_default(tok):
  with pytest.raises((KeyError, AttributeError)):
    step_lib.loss_chunk(without(configs.base(), "train.loss_chunk"), 256)
  with pytest.raises((KeyError, AttributeError)):
    config_checks.check_config(without(tiny_config(), "train.loss_chunk"), paths=False)
  with pytest.raises((KeyError, AttributeError)):
    sequence.ExampleBuilder.from_config(without(tiny_config(), "data.overlong"), tok)
  with pytest.raises((KeyError, AttributeError)):
    MM15(without(configs.base(), "model.vit.pos_resize").model, rngs=nnx.Rngs(0))
  with pytest.raises((KeyError, AttributeError)):
    llm.Decoder(without(configs.base(), "model.llm.qkv_bias").model.llm, rngs=nnx.Rngs(0))
  # The same fields, present: base()'s values.
  assert step_lib.loss_chunk(configs.base(), 256) == 256 and configs.base().train.loss_chunk == 512


def test_a_saved_config_from_an_earlier_version_is_completed_from_base_when_loaded():
  """run_record.fill_missing_fields: the one place an older config.json gets the fields it lacks."""
  saved = tiny_config()
  saved.data.sources = {"mine": dict(kind="jsonl", weight=1.0, paths="a.jsonl")}
  old = saved.to_dict()
  del old["checkpoint"]["sigterm_grace_s"], old["log"], old["train"]["loss_chunk"]
  del old["model"]["llm"]["rope_scaling"]["low_freq_factor"]
  loaded = run_record.config_from_json(json.dumps(old))
  base = configs.base()
  assert loaded.checkpoint.sigterm_grace_s == base.checkpoint.sigterm_grace_s
  assert loaded.log == base.log and loaded.train.loss_chunk == base.train.loss_chunk
  assert loaded.model.llm.rope_scaling.low_freq_factor == base.model.llm.rope_scaling.low_freq_factor
  assert list(loaded.data.sources) == ["mine"]  # names the experiment chose are not merged with base()'s
  # What the run set is kept; a complete config comes back unchanged.
  assert loaded.train.steps == saved.train.steps and loaded.model.vit.image_size == saved.model.vit.image_size
  assert run_record.config_from_json(run_record.config_to_json(saved)).to_dict() == saved.to_dict()
