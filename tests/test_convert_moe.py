"""Mixtral (mixture-of-experts) decoders: import, export and `check` against transformers.

A tiny MixtralForCausalLM with every parameter randomised (the router too, so tokens spread over
the experts), saved by transformers (the published per-expert layout) and, for the fused layout
transformers >= 5 holds in memory, as its raw state dict; compared in float32 (see test_convert.py).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mm15_jax import checkpoint as ckpt_lib  # noqa: E402
from mm15_jax import configs  # noqa: E402
from mm15_jax import sharding as shd  # noqa: E402
from mm15_jax.convert import exporter, importer, parity  # noqa: E402
from mm15_jax.convert.safetensors_dir import PublicCheckpoint  # noqa: E402
from mm15_jax.models.llm import Decoder  # noqa: E402
from tests.test_convert import TOL, hf_logits, randomise  # noqa: E402

EXPERTS, TOP_K, LAYERS, VOCAB = 4, 2, 2, 128
SETTINGS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                max_position_embeddings=256, rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default",
                                                                                       rope_theta=10_000.0))
# 8 rows: one per batch shard of the expert-parallel mesh below.
TOKENS = np.random.default_rng(1).integers(0, VOCAB, (8, 13))
EXPERT_MESH = dict(data=1, fsdp=2, tensor=1, expert=4)


def save_mixtral(path, fused=False, **overrides):
  model = randomise(transformers.MixtralForCausalLM(transformers.MixtralConfig(**dict(SETTINGS, **overrides))))
  model.eval()
  if fused:  # what transformers holds in memory: mlp.experts.gate_up_proj, mlp.experts.down_proj
    from safetensors.torch import save_file
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    model.config.save_pretrained(path)
  else:
    model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
  """(model, its published-layout directory, our import of it)."""
  root = tmp_path_factory.mktemp("mixtral")
  model = save_mixtral(root / "hf")
  importer.run_import("llm", str(root / "hf"), str(root / "ours"))
  return model, root / "hf", root / "ours"


def expert_parallel_logits(out_dir, tokens, **moe):
  """Our Decoder on the expert-parallel mesh (experts split over `expert`, tokens over every batch
  axis), from the import's checkpoint as a run restores it; config.model.moe overridden by `moe`.
  Returns (logits, aux)."""
  config = configs.load_experiment(os.path.join(out_dir, "config.py"))
  config.model.moe.update(moe)
  mesh = shd.make_mesh(EXPERT_MESH)
  abstract, _ = importer.abstract_part(config, "llm", mesh)
  loaded = ckpt_lib.load_param_parts({}, {"llm": abstract}, {"llm": str(out_dir)})["llm"]
  assert loaded["layers"]["sparse"]["moe"]["gate"].sharding.spec[1] == "expert"
  decoder = nnx.eval_shape(lambda: Decoder(config.model.llm, moe=config.model.moe, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(decoder, nnx.Param)
  nnx.replace_by_pure_dict(params, loaded)
  rows = jax.sharding.NamedSharding(mesh, shd.logical_to_mesh(("batch", None), config.sharding_rules, mesh))
  batch = [jax.device_put(jnp.asarray(a, jnp.int32), rows)
           for a in (tokens, np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape), np.ones_like(tokens))]
  with shd.use_rules(mesh, config.sharding_rules):
    logits, _, aux = jax.jit(lambda p, *b: nnx.merge(graphdef, p)(*b))(params, *batch)
  return np.asarray(logits), aux


def test_transformers_saves_the_published_layout(mixtral):
  """What users have on disk: one tensor per expert, as the Hub's Mixtral checkpoints."""
  _, hf_dir, _ = mixtral
  names = PublicCheckpoint(str(hf_dir)).keys()
  assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
  assert not any(".mlp." in n for n in names)


# capacity_factor = E / k: an expert's queue holds every token of its shard, so nothing is dropped.
@pytest.mark.parametrize("moe", [dict(impl="ragged"), dict(impl="capacity", capacity_factor=EXPERTS / TOP_K)],
                         ids=["ragged", "capacity"])
def test_logits_match_transformers_expert_parallel(mixtral, moe):
  model, _, ours_dir = mixtral
  ours, aux = expert_parallel_logits(ours_dir, TOKENS, **moe)
  theirs = hf_logits(model, TOKENS)
  assert ours.shape == theirs.shape
  assert float(aux["dropped_tokens"]) == 0
  assert np.all(np.asarray(aux["expert_load"]) > 0)  # routing is not trivial: every expert gets tokens
  assert parity.relative_difference(ours, theirs) < TOL


def test_import_config_and_check(mixtral):
  """The written experiment sets config.model.moe (dropless routing); `check` runs load_model's path."""
  model, hf_dir, ours_dir = mixtral
  config = configs.load_experiment(str(ours_dir / "config.py"))
  want = dict(num_experts=EXPERTS, top_k=TOP_K, interval=1, expert_mlp_dim=48, impl="auto")
  assert {k: config.model.moe[k] for k in want} == want
  assert config.model.llm.n_kv_heads == 2 and config.init.llm_from == str(ours_dir)
  assert json.load(open(ours_dir / "import.json"))["config"]["moe"]["num_experts"] == EXPERTS
  result = parity.run_check(str(hf_dir), str(ours_dir))
  assert result["kind"] == "llm" and result["max_relative_difference"] < TOL


def test_import_builds_experts_in_their_expert_sharding(mixtral):
  """On a mesh with the expert axis: each device's shard is cut from its own experts' tensors only."""
  _, hf_dir, _ = mixtral
  checkpoint = PublicCheckpoint(str(hf_dir))
  reads = []
  read = checkpoint.read
  checkpoint.read = lambda name: reads.append(name) or read(name)
  stats = {}
  part, params = importer.read_part("llm", checkpoint, shd.make_mesh(EXPERT_MESH), stats=stats)
  expert_reads = [n for n in reads if ".experts." in n]
  assert part["moe"]["num_experts"] == EXPERTS
  gate = params["layers"]["sparse"]["moe"]["gate"]  # [layers, experts, d, ff]
  assert tuple(gate.sharding.spec) == (None, "expert", "fsdp", None)
  assert {s.data.shape for s in gate.addressable_shards} == {(LAYERS, 1, 16, 48)}
  for s in gate.addressable_shards:
    j = s.index[1].start
    want = np.stack([checkpoint.read(f"model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight").T
                     for i in range(LAYERS)])[:, None]
    np.testing.assert_array_equal(np.asarray(s.data), want[(slice(None), slice(None)) + s.index[2:]])
  # Each expert tensor is read once, though two devices (the fsdp halves) hold slices of it; and
  # no host array is a whole expert param.
  assert len(expert_reads) == len(set(expert_reads)) == LAYERS * EXPERTS * 3
  assert stats["largest_host_array"] < gate.nbytes


def test_fused_layout_imports_the_same_params(mixtral, tmp_path):
  """A directory of transformers' in-memory tensors (gate_up_proj fused) imports as the published one."""
  model, _, ours_dir = mixtral
  save_mixtral(tmp_path / "fused", fused=True)  # same seed: the same model
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fused"), dtype=torch.float32)
  np.testing.assert_array_equal(hf_logits(reloaded.eval(), TOKENS[:2]), hf_logits(model, TOKENS[:2]))
  mesh = importer.import_mesh()
  _, fused = importer.read_part("llm", PublicCheckpoint(str(tmp_path / "fused")), mesh)
  config = configs.load_experiment(str(ours_dir / "config.py"))
  abstract, _ = importer.abstract_part(config, "llm", mesh)
  published = ckpt_lib.load_param_parts({}, {"llm": abstract}, {"llm": str(ours_dir)})["llm"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fused, published)


def test_export_round_trip_is_bit_identical(mixtral, tmp_path):
  model, hf_dir, ours_dir = mixtral
  exporter.run_export(str(ours_dir), str(tmp_path / "exported"), dtype="float32", max_shard_bytes=60_000)
  exported = PublicCheckpoint(str(tmp_path / "exported"))
  assert exported.config["model_type"] == "mixtral" and exported.config["num_local_experts"] == EXPERTS
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), dtype=torch.float32)
  assert type(reloaded).__name__ == "MixtralForCausalLM"
  np.testing.assert_array_equal(hf_logits(reloaded.eval(), TOKENS), hf_logits(model, TOKENS))
  original = PublicCheckpoint(str(hf_dir))
  assert exported.keys() == original.keys()
  for name in original.keys():
    np.testing.assert_array_equal(exported.read(name), original.read(name))


EXPERIMENT = '''from mm15_jax import configs


def get_config(arg=""):
  c = configs.base()
  c.model.moe.update({moe})
  return c
'''


@pytest.mark.parametrize("moe,message", [
    (dict(num_experts=4, top_k=2, interval=2), "moe.interval=2: the Mixtral layout has routed experts in every layer"),
    (dict(num_experts=4, top_k=1, interval=1), "moe.top_k=1"),
])
def test_export_refuses_what_mixtral_cannot_express(mixtral, tmp_path, moe, message):
  (tmp_path / "exp.py").write_text(EXPERIMENT.format(moe=moe))
  with pytest.raises(ValueError, match=message):
    exporter.run_export(str(mixtral[2]), str(tmp_path / "exported"), config_spec=str(tmp_path / "exp.py"))
  assert not os.path.exists(tmp_path / "exported")


@pytest.mark.parametrize("drop,config_edit,message", [
    ("model.layers.1.block_sparse_moe.experts.3.w2.weight", None,
     r"1 missing tensor\(s\), e.g. \['model.layers.1.block_sparse_moe.experts.3.w2.weight'\]"),
    ("model.layers.0.block_sparse_moe.gate.weight", None, "missing tensor.*block_sparse_moe.gate.weight"),
    (None, {"num_local_experts": 6}, "missing tensor.*experts.4"),
    (None, {"intermediate_size": 40}, "experts.0.w1.weight .* config gives"),
    (None, {"sliding_window": 64}, "sliding_window=64"),
    (None, {"num_experts_per_tok": 1}, "num_experts_per_tok=1"),
    (None, {"hidden_act": "gelu"}, "hidden_act"),
])
def test_bad_mixtral_checkpoints_get_clear_errors(mixtral, tmp_path, drop, config_edit, message):
  from safetensors.numpy import load_file, save_file
  hf = tmp_path / "hf"
  hf.mkdir()
  tensors = load_file(str(mixtral[1] / "model.safetensors"))
  tensors.pop(drop, None)
  save_file(tensors, str(hf / "model.safetensors"))
  config = json.load(open(mixtral[1] / "config.json"))
  json.dump(dict(config, **(config_edit or {})), open(hf / "config.json", "w"))
  with pytest.raises(ValueError, match=message):
    importer.run_import("llm", str(hf), str(tmp_path / "ours"))
  assert not os.path.exists(tmp_path / "ours" / "config.py")
