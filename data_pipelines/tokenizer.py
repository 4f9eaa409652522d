"""A small SentencePiece tokenizer that the project builds from its own text (no download).

Trained on the built-in mixture's text (builtin.corpus), the chat template's and the tile
indicators' words and the digits. BPE, one thread, no sampling: the same settings give the
same model bytes, so the model is cached under a hash of its settings. Byte fallback
makes any text encodable (unknown characters become UTF-8 byte pieces, never <unk>);
split_digits makes "[123, 45]" one piece per digit, so coordinates tokenise predictably.
"""

import functools
import hashlib
import io
import json
import os
import tempfile

import sentencepiece as spm

from data_pipelines import builtin, records, sequence, storage

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
IMAGE_TOKEN = records.IMAGE_MARKER
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "mm15_jax", "tokenizer")

# Bump when the corpus or the settings change meaning without changing the text below.
_BUILD_VERSION = 2
_TRAINER_ARGS = dict(
    model_type="bpe",
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    user_defined_symbols=[IMAGE_TOKEN],
    split_digits=True,
    byte_fallback=True,
    character_coverage=1.0,
    # Determinism: one thread, every sentence, in order.
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    hard_vocab_limit=True,
    minloglevel=2,
)


class Tokenizer:
  """encode/decode plus the special ids the sequence builder needs; picklable (grain workers)."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
    # A model without a bos/eos piece says -1; None means "no such token" for every tokenizer kind.
    self.bos_id, self.eos_id = (i if i >= 0 else None for i in (self.bos_id, self.eos_id))
    if self.pad_id < 0:  # Llama's tokenizers have no pad piece; padding is masked out anyway
      self.pad_id = max(self._sp.unk_id(), 0)
    self.image_id = self.piece_to_id(IMAGE_TOKEN)
    self.vocab_size = self._sp.get_piece_size()

  def piece_to_id(self, piece: str) -> int | None:
    """The id of one vocabulary piece (e.g. the byte piece "<0x0A>"), or None if absent."""
    i = self._sp.piece_to_id(piece)
    return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_span(self, text: str) -> list[int]:
    """One span of a laid-out sequence: SentencePiece starts each at a word boundary itself."""
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    """pad/bos/eos decode to nothing; <image> to its text."""
    return self._sp.decode([int(i) for i in ids])

  def __getstate__(self):
    return {"model_proto": self.model_proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
  indicators = ["Image 1 row 1 col 2:", "Image 2 row 3 col 1:", "Image 3 overview:", "Image 4:"]
  return tuple(builtin.corpus() + indicators + [sequence.USER, sequence.ASSISTANT, " ".join("0123456789")])


def min_vocab_size() -> int:
  """The fewest pieces the built-in tokenizer can be trained with: every character of its corpus
  (a space is the "▁" meta piece) plus the 256 byte pieces, pad/unk/bos/eos and `<image>`."""
  return len(set("".join(corpus())) - {" "}) + 256 + 4 + 1


def _train(vocab_size: int, lines: list[str]) -> bytes:
  out = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
                                   **_TRAINER_ARGS)
  except RuntimeError as e:
    if "Vocabulary size too high" in str(e):
      raise ValueError(f"the built-in tokenizer cannot have vocab_size={vocab_size}: its corpus (the built-in "
                       f"mixture's text) supports fewer pieces ({e}). Set config.model.llm.vocab_size to that "
                       "value or less (e.g. 512 for the tiny model).") from e
    raise
  return out.getvalue()


def load_tokenizer(vocab_size: int, cache_dir: str | None = None) -> Tokenizer:
  """The built-in tokenizer with exactly vocab_size pieces, built once and cached.

  Cached at `{cache_dir}/{hash of settings}.model` (default ~/.cache/mm15_jax/tokenizer),
  written atomically so concurrent builders (several hosts on one disk) never read a
  partial file.
  """
  lines = list(corpus())
  settings = dict(version=_BUILD_VERSION, sentencepiece=spm.__version__, vocab_size=vocab_size,
                  args=_TRAINER_ARGS, corpus=lines)
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
  path = os.path.join(cache_dir, f"{key}.model")
  if os.path.exists(path):
    with open(path, "rb") as f:
      return Tokenizer(f.read())
  model = _train(vocab_size, lines)
  os.makedirs(cache_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(model)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return Tokenizer(model)


def with_image_piece(model_proto: bytes) -> bytes:
  """A SentencePiece model with `<image>` appended as a user-defined piece if it lacks one
  (public tokenizers do): the new piece takes the next id, so every existing id is unchanged."""
  from sentencepiece import sentencepiece_model_pb2  # protobuf: only needed here

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  if any(p.piece == IMAGE_TOKEN for p in proto.pieces):
    return model_proto
  proto.pieces.add(piece=IMAGE_TOKEN, score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  return proto.SerializeToString()


def load_tokenizer_file(path: str):
  """A tokenizer file (e.g. an import's): a Hugging Face tokenizer.json (`.json`, with the
  tokenizer_config.json beside it naming its special tokens) or a SentencePiece .model file.
  It must have `<image>` and an end-of-sequence token."""
  if not storage.isfile(path):
    raise FileNotFoundError(f"config.data.tokenizer={path!r}: no such file; give a SentencePiece .model file or a "
                            "tokenizer.json, '' for the built-in tokenizer or 'none' for token ids only")
  if path.endswith(".json"):
    from data_pipelines import tokenizer_json  # the `tokenizers` library: only needed here

    tokenizer = tokenizer_json.load(path)
  else:
    tokenizer = Tokenizer(storage.read_bytes(path))
  if tokenizer.image_id is None:
    raise ValueError(f"config.data.tokenizer={path!r} has no {IMAGE_TOKEN} token; `python -m mm15_jax.convert "
                     "import` adds it (data_pipelines.tokenizer.with_image_piece, tokenizer_json.with_image_token)")
  if tokenizer.eos_id is None:
    fix = ("name one as eos_token in the tokenizer_config.json beside it" if path.endswith(".json") else
           "give a SentencePiece model with an eos piece (eos_id >= 0)")
    raise ValueError(f"config.data.tokenizer={path!r} has no end-of-sequence token; {fix}")
  return tokenizer


def vocab_error(config, tokenizer: Tokenizer) -> str | None:
  """Why the model's embedding rows do not fit the tokenizer's ids, or None. A tokenizer file
  may have fewer pieces than the embedding has rows (padded tables); the built-in one exactly as many."""
  want = config.model.llm.vocab_size
  external = bool(config.data.tokenizer)
  if want < tokenizer.vocab_size or (want != tokenizer.vocab_size and not external):
    return (f"config.model.llm.vocab_size={want} but the tokenizer has {tokenizer.vocab_size} pieces; "
            f"set --config.model.llm.vocab_size={tokenizer.vocab_size} or load a tokenizer of that size")
  return None


def check_vocab(config, tokenizer: Tokenizer) -> None:
  """Raises vocab_error's reason, if any."""
  error = vocab_error(config, tokenizer)
  if error:
    raise ValueError(error)


def tokenizer_for_config(config, cache_dir: str | None = None, *, required: bool = True) -> Tokenizer | None:
  """config.data.tokenizer: '' the built-in one (cached), a tokenizer file (SentencePiece .model or
  tokenizer.json: load_tokenizer_file), or 'none' (token ids only: None, unless `required`, as training is)."""
  source = config.data.tokenizer
  if source == "none":
    if required:
      raise ValueError("config.data.tokenizer='none' gives token ids only; training and generation need a "
                       "tokenizer: set config.data.tokenizer to a SentencePiece .model file or a tokenizer.json")
    return None
  tokenizer = load_tokenizer_file(source) if source else load_tokenizer(config.model.llm.vocab_size, cache_dir)
  check_vocab(config, tokenizer)
  return tokenizer
