"""Hugging Face `tokenizer.json` tokenizers (Llama 3, Qwen2, ...), through the `tokenizers` library.

The same interface as tokenizer.Tokenizer (encode/decode, piece_to_id and the special ids), so
the sequence builder, packing and inference take either. The special tokens are named by the
`tokenizer_config.json` beside the tokenizer.json (bos_token, eos_token, pad_token: a string, a
dict with "content", or null). bos_id may be None (Qwen2 has no BOS token): sequences then
start with their first text token. pad falls back to eos (padding is masked out anyway).
"""

import json

import tokenizers

from data_pipelines import storage
from data_pipelines.records import IMAGE_MARKER as IMAGE_TOKEN

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token")


def token_content(value) -> str | None:
  """tokenizer_config.json spells a special token as a string or as {"content": ..., ...}."""
  return value.get("content") if isinstance(value, dict) else value


class JsonTokenizer:
  """encode/decode plus the special ids the sequence builder needs; picklable (grain workers)."""

  def __init__(self, tokenizer_json: str, special: dict | None = None, *, name: str = "tokenizer.json"):
    self.tokenizer_json, self.special, self.name = tokenizer_json, dict(special or {}), name
    self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    ids = {}
    for key in SPECIAL_KEYS:
      content = token_content(self.special.get(key))
      ids[key] = None if content is None else self._tok.token_to_id(content)
      if content is not None and ids[key] is None:
        raise ValueError(f"tokenizer_config.json beside {name}: {key}={content!r} is not a token of {name}; "
                         "name one of its tokens (or null)")
    self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
    self.pad_id = next((i for i in (ids["pad_token"], self.eos_id) if i is not None), 0)
    self.image_id = self.piece_to_id(IMAGE_TOKEN)
    # Ids may have holes (added tokens past the model's vocabulary): the size covers the largest.
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    self._silent = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
    # SentencePiece starts every encoded span at a word boundary (its "▁" prefix), so the
    # sequence builder's spans ("User:", the content, "Assistant:") read as separate words. A
    # byte-level BPE (Llama 3, Qwen2) adds no prefix, and "What" and " What" are different
    # tokens: its spans get the leading space the pretrained model saw between words.
    adds_prefix = self._tok.encode("a", add_special_tokens=False).tokens[:1] != ["a"]  # "▁a", "Ġa"
    self._span_prefix = "" if adds_prefix else " "

  def piece_to_id(self, piece: str) -> int | None:
    """The id of one vocabulary token (as the vocabulary spells it, e.g. "Ċ" for a byte-level newline), or None."""
    return self._tok.token_to_id(piece)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_span(self, text: str) -> list[int]:
    """One span of a laid-out sequence, starting at a word boundary like SentencePiece's."""
    return self.encode(self._span_prefix + text if text and not text[0].isspace() else text)

  def decode(self, ids) -> str:
    """pad/bos/eos decode to nothing; <image> (and any other added token) to its text."""
    return self._tok.decode([int(i) for i in ids if int(i) not in self._silent], skip_special_tokens=False)

  def __getstate__(self):
    return {"tokenizer_json": self.tokenizer_json, "special": self.special, "name": self.name}

  def __setstate__(self, state):
    self.__init__(state["tokenizer_json"], state["special"], name=state["name"])


def config_path(tokenizer_path: str) -> str:
  """Where a tokenizer.json's tokenizer_config.json (its special tokens) lies: beside it."""
  return storage.join(storage.dirname(tokenizer_path), "tokenizer_config.json")


def read_config(tokenizer_path: str) -> dict:
  """The tokenizer_config.json beside a tokenizer.json ({} if there is none)."""
  path = config_path(tokenizer_path)
  if not storage.isfile(path):
    return {}
  return json.loads(storage.read_text(path))


def load(path: str) -> JsonTokenizer:
  special = {k: v for k, v in read_config(path).items() if k in SPECIAL_KEYS}
  return JsonTokenizer(storage.read_text(path), special, name=path)


def with_image_token(tokenizer_json: str) -> str:
  """A tokenizer.json with `<image>` added as a special token if it lacks one (public ones do):
  it takes the next free id, so every existing id is unchanged."""
  tok = tokenizers.Tokenizer.from_str(tokenizer_json)
  if tok.token_to_id(IMAGE_TOKEN) is not None:
    return tokenizer_json
  new_id = max(tok.get_vocab(with_added_tokens=True).values()) + 1
  data = json.loads(tokenizer_json)
  data["added_tokens"] = list(data.get("added_tokens") or []) + [dict(
      id=new_id, content=IMAGE_TOKEN, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)]
  text = json.dumps(data, ensure_ascii=False, indent=2)
  # The library assigns ids to added tokens itself when it reads them back; make sure it agrees.
  got = tokenizers.Tokenizer.from_str(text).token_to_id(IMAGE_TOKEN)
  if got != new_id:
    raise ValueError(f"adding {IMAGE_TOKEN} to tokenizer.json gave id {got}, not the next free id {new_id}; "
                     "its added tokens' ids are not contiguous")
  return text


def imported_config(tokenizer_config: dict, model_config: dict, tokenizer_json: str) -> dict:
  """The tokenizer_config.json of an import: the public one (chat template and all) with bos/eos/pad
  as plain strings and `<image>` among its added tokens. A missing eos comes from config.json's
  eos_token_id (a decoder needs one to end sequences)."""
  tok = tokenizers.Tokenizer.from_str(tokenizer_json)
  config = dict(tokenizer_config)
  config.update({k: token_content(tokenizer_config.get(k)) for k in SPECIAL_KEYS})
  eos_id = model_config.get("eos_token_id")
  eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
  if config["eos_token"] is None and isinstance(eos_id, int):
    config["eos_token"] = tok.id_to_token(eos_id)
  if "added_tokens_decoder" in config:  # transformers reads added tokens from here too
    config["added_tokens_decoder"] = dict(config["added_tokens_decoder"], **{str(tok.token_to_id(IMAGE_TOKEN)): dict(
        content=IMAGE_TOKEN, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)})
  return config
