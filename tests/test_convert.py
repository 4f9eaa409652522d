"""Public-weight import/export against transformers, run locally on small random models.

Each test builds a model with transformers' own config classes (nothing downloaded), with
every parameter randomised (biases and norm scales too, so a mapping that drops one shows),
saves it as safetensors, imports it and compares outputs in float32.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mm15_jax import checkpoint as ckpt_lib  # noqa: E402
from mm15_jax import configs, run_record  # noqa: E402
from mm15_jax.convert import exporter, importer, parity  # noqa: E402
from mm15_jax.convert.safetensors_dir import PublicCheckpoint  # noqa: E402
from tests.tiny_setup import ROOT  # noqa: E402

TOL = 2e-5  # float32 on both sides; our attention and norms order their sums differently


def randomise(model, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "norm" in name and p.ndim == 1 else 0.0))
  return model


def save_decoder(path, kind="llama", seed=0, shard="10MB", **overrides):
  settings = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
  settings.update(overrides)
  if kind == "llama":
    config = transformers.LlamaConfig(**settings)
    model = transformers.LlamaForCausalLM(config)
  else:
    config = transformers.Qwen2Config(**settings)
    model = transformers.Qwen2ForCausalLM(config)
  randomise(model, seed).eval()
  model.save_pretrained(path, max_shard_size=shard)
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def our_logits(out_dir, tokens):
  config = configs.load_experiment(os.path.join(out_dir, "config.py"))
  config.model.dtype = "float32"
  return parity.our_logits(config, out_dir, tokens)


TOKENS = np.random.default_rng(0).integers(0, 384, (2, 21))

DECODERS = {
    # grouped-query attention, untied, default RoPE, sharded safetensors with an index
    "llama_gqa": dict(kind="llama", shard="20KB", rope_theta=10_000.0),
    # Qwen2: q/k/v biases, tied embeddings, another theta, head_dim given (not d / heads)
    "qwen2_tied_bias": dict(kind="qwen2", tie_word_embeddings=True, rope_theta=1_000_000.0, head_dim=24),
    # Llama 3.1's frequency-dependent RoPE scaling, multi-head (no grouping)
    "llama3_rope": dict(kind="llama", num_key_value_heads=4,
                        rope_parameters=dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=16)),
    "linear_rope": dict(kind="llama", rope_parameters=dict(rope_type="linear", rope_theta=10_000.0, factor=4.0)),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_logits_match_transformers(tmp_path, name):
  model = save_decoder(tmp_path / "hf", **DECODERS[name])
  summary = importer.run_import("llm", str(tmp_path / "hf"), str(tmp_path / "ours"))
  assert summary["params"] == sum(p.numel() for p in model.parameters())  # tied: counted once on both sides
  theirs = hf_logits(model, TOKENS)
  ours = our_logits(str(tmp_path / "ours"), TOKENS)
  assert ours.shape == theirs.shape
  assert parity.relative_difference(ours, theirs) < TOL


def test_import_reads_shards_into_their_sharding(tmp_path):
  """Every param is built in its fsdp sharding over the 8 devices, from one public tensor at a time."""
  save_decoder(tmp_path / "hf", shard="20KB", num_hidden_layers=6)  # more layers than a few cached tensors
  checkpoint = PublicCheckpoint(str(tmp_path / "hf"))
  assert len({v for v in checkpoint._file_of.values()}) > 1  # several shards, found through the index
  stats = {}
  mesh = importer.import_mesh()
  _, params = importer.read_part("llm", checkpoint, mesh, stats=stats)
  q = params["layers"]["q"]  # [layers, d=64, heads, head_dim], embed over fsdp=8
  assert q.sharding.spec[1] == "fsdp" and len(q.sharding.device_set) == 8
  assert q.addressable_shards[0].data.shape == (6, 8, 4, 16)
  # The largest host array built at once is one device's shard of the largest param, not a whole param.
  largest_param = max(a.nbytes for a in jax.tree.leaves(params))
  assert 0 < stats["largest_host_array"] < largest_param
  # Each public tensor is read exactly once (fp32 on both sides), though 8 devices hold slices of it.
  assert checkpoint.bytes_read == sum(p.nbytes for p in jax.tree.leaves(params))


def test_export_round_trip_loads_in_transformers(tmp_path):
  model = save_decoder(tmp_path / "hf", kind="qwen2", rope_theta=20_000.0)
  importer.run_import("llm", str(tmp_path / "hf"), str(tmp_path / "ours"))
  exporter.run_export(str(tmp_path / "ours"), str(tmp_path / "exported"), dtype="float32", max_shard_bytes=50_000)
  files = os.listdir(tmp_path / "exported")
  assert "model.safetensors.index.json" in files and "config.json" in files
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), dtype=torch.float32).eval()
  assert type(reloaded).__name__ == "Qwen2ForCausalLM"
  np.testing.assert_array_equal(hf_logits(reloaded, TOKENS), hf_logits(model, TOKENS))
  # Tensor for tensor the same as the original.
  original, exported = PublicCheckpoint(str(tmp_path / "hf")), PublicCheckpoint(str(tmp_path / "exported"))
  assert exported.keys() == original.keys()
  for name in original.keys():
    np.testing.assert_array_equal(exported.read(name), original.read(name))
  # The import's config.json is its config.py as data: export needs no Python from the directory.
  written = run_record.load_config(str(tmp_path / "ours"))
  assert written.to_dict() == configs.load_experiment(str(tmp_path / "ours" / "config.py")).to_dict()
  os.remove(tmp_path / "ours" / "config.py")
  exporter.run_export(str(tmp_path / "ours"), str(tmp_path / "again"), dtype="float32", max_shard_bytes=50_000)
  again = PublicCheckpoint(str(tmp_path / "again"))
  for name in original.keys():
    np.testing.assert_array_equal(again.read(name), original.read(name))


def test_export_in_bfloat16_has_the_public_dtype(tmp_path, capsys):
  save_decoder(tmp_path / "hf")
  importer.run_import("llm", str(tmp_path / "hf"), str(tmp_path / "ours"))
  capsys.readouterr()
  exporter.run_export(str(tmp_path / "ours"), str(tmp_path / "exported"))
  size = sum(os.path.getsize(p) for p in (tmp_path / "exported").glob("*.safetensors"))
  done = re.search(r"export: ([\d,]+)/\1 bytes \(100%\)", capsys.readouterr().err)
  assert done and size - 4096 < int(done.group(1).replace(",", "")) <= size  # headers aside, every byte
  exported = PublicCheckpoint(str(tmp_path / "exported"))
  assert {exported.dtype(n) for n in exported.keys()} == {"BF16"}
  assert exported.config["torch_dtype"] == "bfloat16"


VISION = {
    # (config class, model class, settings, image sizes: native and interpolated position embeddings)
    "clip_quick_gelu": ("CLIPVisionConfig", "CLIPVisionModel",
                        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8, hidden_act="quick_gelu"), (32, 48)),
    "clip_gelu_p4": ("CLIPVisionConfig", "CLIPVisionModel",
                     dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                          image_size=24, patch_size=4, hidden_act="gelu"), (24, 40)),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel",
               dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=16, patch_size=4), (16, 28)),
}


@pytest.mark.parametrize("name", sorted(VISION))
def test_vision_features_match_transformers(tmp_path, name):
  config_cls, model_cls, settings, sizes = VISION[name]
  model = randomise(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings))).eval()
  model.save_pretrained(tmp_path / "hf")
  importer.run_import("vit", str(tmp_path / "hf"), str(tmp_path / "ours"))
  config = configs.load_experiment(str(tmp_path / "ours" / "config.py"))
  config.model.dtype = "float32"
  for size in sizes:
    pixels = np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
      theirs = model(pixel_values=torch.as_tensor(pixels), interpolate_pos_encoding=True).last_hidden_state.numpy()
    if name.startswith("clip"):
      theirs = theirs[:, 1:]  # the class token is not a patch feature
    ours = parity.our_features(config, str(tmp_path / "ours"), pixels.transpose(0, 2, 3, 1))
    assert ours.shape == theirs.shape
    assert parity.relative_difference(ours, theirs) < TOL, size


def test_whole_clip_model_imports_its_vision_tower(tmp_path):
  """A CLIPModel checkpoint (text tower and projections too): the vision part only."""
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=50),
      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         image_size=16, patch_size=8), projection_dim=8)
  model = randomise(transformers.CLIPModel(config)).eval()
  model.save_pretrained(tmp_path / "hf")
  json.dump({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2]},
            open(tmp_path / "hf" / "preprocessor_config.json", "w"))
  importer.run_import("vit", str(tmp_path / "hf"), str(tmp_path / "ours"))
  result = parity.run_check(str(tmp_path / "hf"), str(tmp_path / "ours"))
  assert result["kind"] == "vit" and result["max_relative_difference"] < TOL
  ours = configs.load_experiment(str(tmp_path / "ours" / "config.py"))
  assert tuple(ours.model.vit.image_mean) == (0.5, 0.4, 0.3)  # the encoder's own pixel normalisation


def test_tokenizer_gets_an_image_piece_and_the_model_generates(tmp_path):
  """A decoder with a SentencePiece tokenizer.model: <image> is appended (one embedding row
  more), load_model generates text, and training starts from the import (init.llm_from)."""
  import sentencepiece as spm

  from data_pipelines import tokenizer as tokenizer_lib
  from mm15_jax.inference import load_model

  lines = list(tokenizer_lib.corpus())
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=384,
                                 model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                 minloglevel=2)
  model = save_decoder(tmp_path / "hf")
  os.replace(tmp_path / "sp.model", tmp_path / "hf" / "tokenizer.model")
  importer.run_import("llm", str(tmp_path / "hf"), str(tmp_path / "ours"))
  config = configs.load_experiment(str(tmp_path / "ours" / "config.py"))
  assert config.model.llm.vocab_size == 385 and config.data.tokenizer.endswith("tokenizer.model")
  config.model.dtype = "float32"
  ours = load_model(config, str(tmp_path / "ours"))
  assert ours.tokenizer.image_id == 384 and ours.tokenizer.pad_id == 0
  ids = ours.prompt("Where is the red square?")["tokens"]
  logits = ours.logits(ids)
  assert parity.relative_difference(logits[:, :384], hf_logits(model, np.asarray(ids)[None])[0]) < TOL
  answer = ours.generate("Where is the red square?", max_new_tokens=4)
  assert len(answer.token_ids) >= 1

  # A run starting from the import holds exactly its decoder (and a fresh encoder).
  from mm15_jax import sharding as shd
  from mm15_jax.train import state as state_lib
  setup = state_lib.make_setup(config, shd.make_mesh(config.mesh))
  state = state_lib.init_state(setup)
  params = ckpt_lib.load_param_parts(state["params"], setup.abstract_state["params"],
                                     {"llm": config.init.llm_from})
  np.testing.assert_array_equal(np.asarray(params["llm"]["layers"]["q"]), np.asarray(ours.params["llm"]["layers"]["q"]))
  np.testing.assert_array_equal(np.asarray(params["vit"]["pos_embedding"]),
                                np.asarray(state["params"]["vit"]["pos_embedding"]))

  # The trainer does the same through config.init.llm_from, and trains on the built-in data
  # with the imported tokenizer.
  from mm15_jax.train.loop import train_and_evaluate
  config.train.steps, config.train.lr, config.log_every = 2, 1e-4, 1
  config.checkpoint.every, config.eval.batches = 0, 1
  config.data.num_examples, config.data.eval_examples = 64, 8
  result = train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert np.isfinite(result["loss"])
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    first = next(r for r in map(json.loads, f) if "kind" not in r)
  assert np.isfinite(first["loss"]) and first["loss"] < 20  # not a random init's blow-up on 385 ids


def test_load_params_refuses_a_partial_checkpoint_without_init(tmp_path):
  save_decoder(tmp_path / "hf")
  importer.run_import("llm", str(tmp_path / "hf"), str(tmp_path / "ours"))
  assert ckpt_lib.stored_parts(str(tmp_path / "ours")) == ["llm"]
  config = configs.load_experiment(str(tmp_path / "ours" / "config.py"))
  from mm15_jax.inference.model import _abstract
  _, _, _, abstract = _abstract(config)
  with pytest.raises(ValueError, match="llm_from"):
    ckpt_lib.load_params(str(tmp_path / "ours"), abstract)


def _break(path, drop=None, config_edit=None):
  if drop:
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(path / "model.safetensors"))
  if config_edit:
    config = json.load(open(path / "config.json"))
    config.update(config_edit)
    json.dump(config, open(path / "config.json", "w"))


@pytest.mark.parametrize("drop,config_edit,message", [
    ("model.layers.1.mlp.up_proj.weight", None, "missing tensor.*up_proj"),
    (None, {"intermediate_size": 80}, "gate_proj.*config gives"),
    (None, {"hidden_act": "gelu"}, "hidden_act"),
    (None, {"model_type": "gpt2"}, "model_type='gpt2'"),
    (None, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
])
def test_bad_checkpoints_get_clear_errors(tmp_path, drop, config_edit, message):
  save_decoder(tmp_path / "hf")
  _break(tmp_path / "hf", drop, config_edit)
  with pytest.raises(ValueError, match=message):
    importer.run_import("llm", str(tmp_path / "hf"), str(tmp_path / "ours"))
  assert not os.path.exists(tmp_path / "ours" / "config.py")  # nothing that looks like a finished import


def test_command_line_import_and_check(tmp_path):
  save_decoder(tmp_path / "hf", kind="qwen2")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  run = lambda *args: subprocess.run([sys.executable, "-m", "mm15_jax.convert", *args], cwd=ROOT, env=env,
                                     capture_output=True, text=True, timeout=600)
  done = run("import", "--kind=llm", f"--hf={tmp_path / 'hf'}", f"--out={tmp_path / 'ours'}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert re.search(r"import llm: (\d+)/\1 tensors \(100%\)", done.stderr), done.stderr[-2000:]
  checked = run("check", f"--hf={tmp_path / 'hf'}", f"--checkpoint={tmp_path / 'ours'}")
  assert checked.returncode == 0, checked.stderr[-2000:]
  result = json.loads(checked.stdout.strip().splitlines()[-2])
  assert result["kind"] == "llm" and result["max_relative_difference"] < TOL
  again = run("import", "--kind=llm", f"--hf={tmp_path / 'hf'}", f"--out={tmp_path / 'ours'}")
  assert again.returncode != 0 and "already holds an import" in again.stderr
