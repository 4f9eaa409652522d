"""Hugging Face tokenizer.json tokenizers (data_pipelines/tokenizer_json.py) and their import.

The tokenizers are byte-level BPEs like Llama 3's and Qwen2's, trained here on a few sentences
with the `tokenizers` library (nothing downloaded); transformers' own tokenizer classes reading
the same files are the reference. The models are tiny random transformers decoders.
"""

import json
import os
import pickle

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
try:  # the public implementation compared with (the test extra, on Python < 3.12)
  import torch
  import transformers
except ImportError:
  torch = transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs torch and transformers (the test extra)")

from data_pipelines import anyres, sequence, tokenizer_json  # noqa: E402
from data_pipelines import tokenizer as tokenizer_lib  # noqa: E402
from mm15_jax import configs  # noqa: E402
from mm15_jax.convert import exporter, importer, parity  # noqa: E402
from mm15_jax.convert.safetensors_dir import PublicCheckpoint  # noqa: E402

BPE_VOCAB = 300  # 256 byte tokens and 44 merges; the special tokens come after, as in Llama 3 and Qwen2
# Llama 3's split: digits in groups of up to three; Qwen2's: one digit each.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3 = dict(specials=["<|begin_of_text|>", "<|end_of_text|>"], digits="{1,3}",
              tokenizer_class="PreTrainedTokenizerFast", bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
QWEN2 = dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], digits="", tokenizer_class="Qwen2Tokenizer",
             bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
TEXTS = ["Hello, world!", "Image 1 row 2 col 3: [123, 4567, 89]", "naïve café — 東京 🙂", "two\nlines\n\nand  spaces ",
         "User: What colour is the circle?\nAssistant: red"]
LINES = ["The quick brown fox jumps over the lazy dog.", "User: What colour is the circle?", "Assistant: a red circle.",
         "Image 1 row 1 col 2: the box [120, 45, 300, 210]", "Circles are round; squares are not.\n"] * 4


def save_tokenizer(path, specials, digits, tokenizer_class, **special_tokens):
  """A byte-level BPE tokenizer.json and its tokenizer_config.json in `path`."""
  from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT.format(digits=digits)), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(LINES, trainers.BpeTrainer(vocab_size=BPE_VOCAB, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(specials)
  bos = special_tokens.get("bos_token")
  if bos:  # Llama 3 adds <|begin_of_text|> when asked for special tokens; encode() must not
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
  os.makedirs(path, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  added = {str(tok.token_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False,
                                         special=True) for t in specials}
  config = dict(special_tokens, tokenizer_class=tokenizer_class, clean_up_tokenization_spaces=False,
                model_max_length=256, added_tokens_decoder=added)
  with open(path / "tokenizer_config.json", "w") as f:
    json.dump(config, f)
  return str(path / "tokenizer.json")


def with_image(path):
  """The tokenizer at `path` with <image> added, as an import writes it."""
  with open(path) as f:
    text = tokenizer_json.with_image_token(f.read())
  with open(path, "w") as f:
    f.write(text)
  return tokenizer_lib.load_tokenizer_file(path)


@pytest.fixture(params=["llama3", "qwen2"])
def public(request, tmp_path):
  """(style, path of a public-style tokenizer.json without <image>)."""
  style = dict(llama3=LLAMA3, qwen2=QWEN2)[request.param]
  return request.param, save_tokenizer(tmp_path / request.param, **style)


@needs_transformers
def test_encode_decode_and_special_ids_match_transformers(public):
  style, path = public
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
  auto = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path))
  ours = tokenizer_json.load(path)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False) == auto.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == theirs.decode(ids, clean_up_tokenization_spaces=False) == text
  assert (ours.bos_id, ours.eos_id) == (auto.bos_token_id, auto.eos_token_id)
  assert ours.pad_id == (auto.pad_token_id if auto.pad_token_id is not None else auto.eos_token_id)
  assert ours.vocab_size == len(auto) == BPE_VOCAB + len(dict(llama3=LLAMA3, qwen2=QWEN2)[style]["specials"])
  assert (ours.bos_id is None) == (style == "qwen2")
  # bos/eos/pad decode to nothing, as the SentencePiece tokenizer's do.
  silent = [i for i in (ours.bos_id, ours.eos_id, ours.pad_id) if i is not None]
  assert ours.decode(silent + ours.encode("red") + silent) == "red"
  assert ours.piece_to_id("Ċ") == ours.encode("\n")[0] and ours.piece_to_id("<0x0A>") is None


@needs_transformers
def test_image_token_takes_the_next_id_and_keeps_every_other(public):
  _, path = public
  before = tokenizers.Tokenizer.from_file(path).get_vocab(with_added_tokens=True)
  with open(path) as f:
    text = f.read()
  tok = with_image(path)
  after = tokenizers.Tokenizer.from_file(path).get_vocab(with_added_tokens=True)
  assert tok.image_id == len(before) == tok.vocab_size - 1
  assert after == dict(before, **{"<image>": tok.image_id})
  assert tokenizer_json.with_image_token(tokenizer_json.with_image_token(text)) == tokenizer_json.with_image_token(text)
  # transformers reads the written file the same way: <image> is one token, decoded to its text.
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
  ids = tok.encode("see <image><image> here")
  assert ids == theirs.encode("see <image><image> here", add_special_tokens=False)
  assert ids.count(tok.image_id) == 2 and tok.decode(ids) == "see <image><image> here"
  assert tok.decode([tok.image_id]) == "<image>"


def test_pickles_for_grain_workers(public):
  _, path = public
  tok = with_image(path)
  back = pickle.loads(pickle.dumps(tok))
  assert (back.bos_id, back.eos_id, back.pad_id, back.image_id, back.vocab_size) == (
      tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id, tok.vocab_size)
  assert all(back.encode(t) == tok.encode(t) for t in TEXTS)


def test_example_builder_without_bos(tmp_path):
  """Qwen2 has no <bos>: the sequence starts at "User:"; "seps" puts the tokenizer's newline between rows."""
  tok = with_image(save_tokenizer(tmp_path, **QWEN2))
  k, s = 2, 8
  builder = sequence.ExampleBuilder(tok, seq_len=256, tile=s, tokens_per_tile=k, indicators="seps", max_tiles=8,
                                    anyres=dict(enabled=True, n_min=2, n_max=4, split_max_images=2))
  im = np.random.default_rng(0).integers(0, 256, (16, 8, 3), np.uint8)
  assert anyres.plan_images([(16, 8)], tile=s, anyres=builder.anyres)[0].grid == (2, 1)
  record = dict(kind="conversation", images=[im], category="", coords="none",
                messages=[dict(role="user", content="<image>\nWhat colour?"), dict(role="assistant", content="red")])
  ex = builder(record)
  img, nl = [tok.image_id] * k, tok.encode("\n")
  assert nl == [tok.piece_to_id("Ċ")]  # one token: the byte-level newline, not the text "<0x0A>"
  # Spans start at a word boundary, as SentencePiece's do: " User:", " red" (but "\nWhat" as written).
  want = (tok.encode(" User:") + img + nl + img + nl + tok.encode(":") + img + tok.encode("\nWhat colour?")
          + tok.encode(" Assistant:") + tok.encode(" red") + [tok.eos_id])
  np.testing.assert_array_equal(ex["tokens"], want)
  assert tok.encode(" red") != tok.encode("red")  # the byte-level BPE tells them apart
  assert ex["tokens"][0] == tok.encode(" User:")[0] and ex["loss_on"][0] == 0
  np.testing.assert_array_equal(ex["image_slots"], np.flatnonzero(ex["tokens"] == tok.image_id))
  assert len(ex["image_slots"]) == 3 * k and ex["tiles"].shape == (3, s, s, 3)
  assert tok.decode(ex["tokens"][ex["loss_on"] > 0]) == " red"
  # A document's first token is text with no <bos> before it: nothing predicts it.
  ex = builder(dict(kind="text", images=[], category="", coords="none",
                    messages=[dict(role="text", content="Circles are round.")]))
  np.testing.assert_array_equal(ex["tokens"], tok.encode(" Circles are round.") + [tok.eos_id])
  assert ex["loss_on"][0] == 0 and ex["loss_on"][1:].all()


def test_config_errors(tmp_path):
  path = save_tokenizer(tmp_path, **LLAMA3)
  config = configs.base()
  config.data.tokenizer = path
  with pytest.raises(ValueError, match="no <image> token.*convert import"):
    tokenizer_lib.tokenizer_for_config(config)
  config.data.tokenizer = str(tmp_path / "missing" / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="no such file.*tokenizer.json"):
    tokenizer_lib.tokenizer_for_config(config)
  config.data.tokenizer = path
  tok = with_image(path)
  config.model.llm.vocab_size = tok.vocab_size - 1
  with pytest.raises(ValueError, match=f"vocab_size={tok.vocab_size}"):
    tokenizer_lib.tokenizer_for_config(config)
  config.model.llm.vocab_size = tok.vocab_size + 8  # spare rows are fine for a tokenizer file
  assert isinstance(tokenizer_lib.tokenizer_for_config(config), tokenizer_json.JsonTokenizer)
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump(dict(eos_token="<|eot_id|>"), f)
  with pytest.raises(ValueError, match="eos_token='<|eot_id|>' is not a token"):
    tokenizer_lib.tokenizer_for_config(config)
  os.remove(tmp_path / "tokenizer_config.json")
  with pytest.raises(ValueError, match="no end-of-sequence token.*eos_token"):
    tokenizer_lib.tokenizer_for_config(config)


def save_decoder(path, kind, vocab_size, **overrides):
  settings = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-5)
  settings.update(overrides)
  names = dict(qwen2=("Qwen2Config", "Qwen2ForCausalLM"), llama=("LlamaConfig", "LlamaForCausalLM"))[kind]
  model = getattr(transformers, names[1])(getattr(transformers, names[0])(**settings))
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "norm" in name and p.ndim == 1 else 0.0))
  model.eval().save_pretrained(path, safe_serialization=True)
  return model


@needs_transformers
def test_qwen2_import_generates_and_exports(tmp_path):
  """A Qwen2-style checkpoint: tokenizer.json only, no <bos>, spare embedding rows for <image>."""
  from mm15_jax.inference import load_model

  hf, out = tmp_path / "hf", tmp_path / "ours"
  model = save_decoder(hf, "qwen2", vocab_size=320, tie_word_embeddings=True, bos_token_id=300, eos_token_id=300)
  save_tokenizer(hf, **QWEN2)
  summary = importer.run_import("llm", str(hf), str(out))
  assert summary["tokenizer"] == str(out / "tokenizer.json")
  config = configs.load_experiment(str(out / "config.py"))
  assert config.data.tokenizer == str(out / "tokenizer.json")
  assert config.model.llm.vocab_size == 320  # <image> (id 303) lands in a spare row: params unchanged
  config.model.dtype = "float32"
  ours = load_model(config, str(out))
  tok = ours.tokenizer
  assert (tok.image_id, tok.bos_id, tok.eos_id) == (303, None, 300)
  ids = list(ours.prompt("Where is the red circle?")["tokens"])
  assert ids == tok.encode(" User:") + tok.encode(" Where is the red circle?") + tok.encode(" Assistant:")
  with torch.no_grad():
    theirs = model(torch.as_tensor([ids])).logits[0].numpy()
  assert parity.relative_difference(ours.logits(ids), theirs) < 2e-5
  # Greedy generation from a text prompt: the ids transformers' argmax gives, step by step.
  got = ours.generate_tokens(["Where is the red circle?"], max_new_tokens=3)[0]
  assert len(got) >= 1
  seq = list(ids)
  with torch.no_grad():
    for _ in range(len(got)):
      seq.append(int(model(torch.as_tensor([seq])).logits[0, -1].argmax()))
  assert list(got) == seq[len(ids):]
  assert ours.generate("Where is the red circle?", max_new_tokens=3).text == tok.decode(got).strip()

  exporter.run_export(str(out), str(tmp_path / "exported"), dtype="float32")
  exported = tmp_path / "exported"
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(exported))
  added = json.load(open(exported / "tokenizer_config.json"))["added_tokens_decoder"]
  assert added["303"]["content"] == "<image>" and added["300"]["content"] == "<|endoftext|>"
  public = json.load(open(exported / "config.json"))
  assert public["bos_token_id"] is None and public["eos_token_id"] == 300 and public["vocab_size"] == 320
  auto = transformers.AutoTokenizer.from_pretrained(str(exported))
  assert auto.encode("a <image>", add_special_tokens=False) == tok.encode("a <image>")
  assert (auto.bos_token_id, auto.eos_token_id) == (None, 300)


@needs_transformers
def test_llama3_import_adds_one_mean_row(tmp_path):
  """A Llama-3-style checkpoint whose tokenizer fills its embedding: <image> gets one row more,
  the mean of the others (and one LM head column), exported back as vocab_size + 1."""
  hf, out = tmp_path / "hf", tmp_path / "ours"
  n = BPE_VOCAB + len(LLAMA3["specials"])
  save_decoder(hf, "llama", vocab_size=n, bos_token_id=300, eos_token_id=301)
  save_tokenizer(hf, **LLAMA3)
  importer.run_import("llm", str(hf), str(out))
  config = configs.load_experiment(str(out / "config.py"))
  assert config.model.llm.vocab_size == n + 1 and config.data.tokenizer == str(out / "tokenizer.json")
  tok = tokenizer_lib.tokenizer_for_config(config)
  assert (tok.image_id, tok.bos_id, tok.eos_id) == (n, 300, 301)
  exporter.run_export(str(out), str(tmp_path / "exported"), dtype="float32")
  original, exported = PublicCheckpoint(str(hf)), PublicCheckpoint(str(tmp_path / "exported"))
  for name, axis in (("model.embed_tokens.weight", 0), ("lm_head.weight", 0)):
    before, after = original.read(name), exported.read(name)
    assert after.shape[0] == n + 1
    np.testing.assert_array_equal(after[:n], before)
    np.testing.assert_allclose(after[n], before.mean(axis), rtol=1e-5, atol=1e-6)
  public = json.load(open(tmp_path / "exported" / "config.json"))
  assert (public["bos_token_id"], public["eos_token_id"], public["vocab_size"]) == (300, 301, n + 1)
