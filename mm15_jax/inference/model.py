"""A trained model for inference: load it, get logits, generate grounded answers.

  model = load_model("experiments/tiny.py", "workdirs/tiny")   # latest complete checkpoint
  answer = model.generate("Where is the red circle?", [image])
  answer.text, answer.boxes   # boxes in pixels of `image`

Params are placed with the training shardings on the mesh of `config.mesh` (all visible
devices; one CPU is a 1-device mesh). MoE layers run "auto" at inference, dropless with the
backend's kernel, whatever `moe.impl` trained them (a TPU run's megablox would be Pallas'
interpreter on a CPU): capacity dropping is a training-throughput device, and the parameters
are the same.

Several processes (jax.distributed): the mesh spans all of them, and every process makes the
same calls with the same prompts; each builds the global batch from its own copy of them and
gets every answer (decode.py).
"""

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding

import data_pipelines
from data_pipelines import anyres
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import configs, distributed, modes, run_record
from mm15_jax import sharding as shd
from mm15_jax.inference import decode as decode_lib
from mm15_jax.inference import grounding
from mm15_jax.inference import prompt as prompt_lib
from mm15_jax.models import build


@dataclasses.dataclass
class Answer:
  """text: the generated answer (stop token/string excluded); token_ids: the generated ids;
  raw_coords: boxes (4-tuples) and points (2-tuples) as written, canvas 0..1000; boxes: the
  same in pixels of the first image (float; empty without an image); labels: the phrase
  before each."""
  text: str
  token_ids: list[int]
  boxes: list[tuple]
  raw_coords: list[tuple]
  labels: list[str]


def _inference_config(config, checkpoint_dir=None):
  if config is None or (isinstance(config, str) and not config.partition(":")[0].endswith(".py")):
    # A run's directory: the config.json it wrote (mm15_jax/run_record.py).
    where = str(checkpoint_dir if config is None else config)
    config = run_record.find_config(where)
    if config is None:
      raise FileNotFoundError(f"no config.json of a run at or above {where!r}: pass the experiment file "
                              "(load_model('FILE.py[:arg]', CHECKPOINT))")
  elif isinstance(config, str):
    config = configs.load_experiment(config)
  config = config.copy_and_resolve_references()
  if config.model.moe.num_experts:
    config.model.moe.impl = modes.MoeImpl.AUTO.value  # dropless, this backend's kernel (module docstring)
  return config


class Model:
  """Params on a mesh plus the jitted passes; see the module docstring."""

  def __init__(self, config, params, tokenizer, mesh, graphdef, rest, *,
               steps_per_call: int = decode_lib.STEPS_PER_CALL):
    """steps_per_call: decoding steps per device call (decode.py); the answers do not depend on it."""
    self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
    self.rules = tuple(config.sharding_rules)
    # tokenizer None (config.data.tokenizer="none", e.g. an import without a tokenizer file):
    # token ids in, logits out; prompts and generation need a tokenizer.
    self.builder = data_pipelines.ExampleBuilder.from_config(config, tokenizer) if tokenizer else None
    self.tile, self.k = config.model.vit.image_size, config.model.connector.tokens_per_tile
    self._prefill = decode_lib.jit_prefill(graphdef, rest, mesh, self.rules)
    self.steps_per_call = steps_per_call
    self._steps = decode_lib.jit_steps(graphdef, rest, mesh, self.rules, steps_per_call)
    self._forward = decode_lib.jit_forward(graphdef, rest, mesh, self.rules)
    self.batch_shards = shd.axis_size(shd.logical_to_mesh(("batch",), self.rules, mesh)[0], mesh)

  @classmethod
  def from_params(cls, config, params, tokenizer=None, *, devices=None) -> "Model":
    """A model from params already in memory (e.g. the trainer's), placed on this model's mesh."""
    config = _inference_config(config)
    mesh, graphdef, rest, abstract = _abstract(config, devices)
    tokenizer = tokenizer or data_pipelines.tokenizer_for_config(config, required=False)
    params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract))
    return cls(config, params, tokenizer, mesh, graphdef, rest)

  # ------------------------------------------------------------ inputs

  def prompt(self, prompt, images=None) -> dict:
    """The training layout of a prompt: dict(tokens, image_slots, tiles, layouts) (ExampleBuilder.prompt)."""
    if self.builder is None:
      raise ValueError("this model has no tokenizer (config.data.tokenizer='none'): give token ids to "
                       "Model.logits, or set config.data.tokenizer to a SentencePiece .model file or a tokenizer.json")
    return self.builder.prompt(prompt_lib.make_record(prompt, images))

  def _place(self, arrays: dict) -> dict:
    def put(x):
      spec = shd.logical_to_mesh(("batch",) + (None,) * (x.ndim - 1), self.rules, self.mesh)
      sharding = NamedSharding(self.mesh, spec)
      if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
      # Several processes: every one holds the whole host batch and places its devices' shards.
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return {k: put(v) for k, v in arrays.items()}

  def _arrays(self, examples, length: int) -> dict:
    rows = -(-len(examples) // self.batch_shards) * self.batch_shards
    tiles = self.config.data.max_tiles if any(len(ex["tiles"]) for ex in examples) else 0
    bos = self.tokenizer.bos_id if self.tokenizer else 0
    if bos is None:  # a tokenizer without <bos> (Qwen2): filler rows hold pad; their outputs are dropped
      bos = self.tokenizer.pad_id
    return prompt_lib.batch_arrays(examples, rows=rows, length=length, max_tiles=tiles, tile=self.tile,
                                   tokens_per_tile=self.k, bos_id=bos)

  # ------------------------------------------------------------ outputs

  def logits(self, token_ids, images=None) -> np.ndarray:
    """float32 [len(token_ids), vocab] by the training forward (no cache). token_ids must hold
    each image's block as the builder makes it (`self.prompt(...)["tokens"]` plus any answer
    ids): its <image> ids are filled with the images' AnyRes tiles, in order."""
    token_ids = np.asarray(token_ids, np.int32)
    if images and self.builder is None:
      self.prompt("", images)  # raises: images need the tokenizer's <image> id
    images = [prompt_lib.as_image(im) for im in images or ()]
    layouts = [] if not images else anyres.plan_images([im.shape[:2] for im in images], tile=self.tile,
                                                       anyres=self.builder.anyres)
    tiles = [anyres.render_tiles(im, layout) for im, layout in zip(images, layouts)]
    slots = np.flatnonzero(token_ids == self.tokenizer.image_id) if self.tokenizer else np.zeros((0,), np.int64)
    want = sum(layout.num_tiles for layout in layouts) * self.k
    if len(slots) != want:
      raise ValueError(f"token_ids hold {len(slots)} <image> ids but the {len(images)} image(s) need {want}; "
                       "build the ids with Model.prompt(text, images)")
    t = self.tile
    example = dict(tokens=token_ids, image_slots=slots,
                   tiles=np.concatenate(tiles) if tiles else np.zeros((0, t, t, 3), np.uint8))
    batch = self._arrays([example], prompt_lib.bucket(len(token_ids)))
    out = self._forward(self.params, self._place({k: batch[k] for k in decode_lib.PROMPT_INPUTS[:-1]}))
    return np.asarray(distributed.host_value(out[0, :len(token_ids)]), np.float32)

  def generate_tokens(self, prompts, images=None, *, max_new_tokens: int = 64, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int = 0, stop=None, with_logits: bool = False):
    """Generated ids per prompt (see decode.generate_ids); `generate_batch` without the parsing."""
    examples = [self.prompt(p, ims) for p, ims in zip(prompts, images or [None] * len(prompts))]
    return self._generate(examples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          seed=seed, stop=stop, with_logits=with_logits)

  def _generate(self, examples, *, max_new_tokens, temperature, top_p, seed, stop, with_logits=False):
    if max_new_tokens < 1 or temperature < 0 or not 0 <= top_p <= 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1, temperature={temperature} >= 0 and "
                       f"top_p={top_p} in [0, 1]")
    longest = max(len(ex["tokens"]) for ex in examples)
    limit = self.config.data.seq_len  # the length the model was trained at
    if longest > limit:
      # Refused before anything is allocated: attention over a much longer prompt needs memory
      # quadratic in its length, at positions the model never saw. (The answer may run past the
      # trained length: max_new_tokens bounds the cache, and answers usually stop well before.)
      raise ValueError(f"a prompt of {longest} tokens (images included) is longer than the model's trained length "
                       f"data.seq_len={limit}; shorten the prompt (fewer images or frames, or lower "
                       "data.anyres.n_max)")
    stop = [stop] if isinstance(stop, (str, int)) else list(stop or [])
    stop_ids = [self.tokenizer.eos_id] + [s for s in stop if isinstance(s, int)]
    stop_strings = [s for s in stop if isinstance(s, str)]
    length = prompt_lib.bucket(max(len(ex["tokens"]) for ex in examples))
    batch = self._place(self._arrays(examples, length))
    max_len = prompt_lib.bucket(decode_lib.cache_length(length, max_new_tokens, self.steps_per_call))
    return decode_lib.generate_ids(
        self._prefill, self._steps, self.params, batch, len(examples), max_len=max_len, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, stop_ids=stop_ids, stop_strings=stop_strings,
        decode=self.tokenizer.decode, with_logits=with_logits)

  def generate_batch(self, prompts, images=None, *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, stop=None) -> list[Answer]:
    """Answers to several prompts, decoded together. images: one list per prompt (or None).
    temperature 0 is greedy; `seed` makes sampling reproducible; `stop`: strings and/or ids
    that end an answer besides <eos>."""
    images = images or [None] * len(prompts)
    if len(images) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists; give one list (or None) per prompt")
    examples = [self.prompt(p, ims) for p, ims in zip(prompts, images)]
    ids = self._generate(examples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         seed=seed, stop=stop)
    stop_strings = [s for s in ([stop] if isinstance(stop, str) else stop or []) if isinstance(s, str)]
    answers = []
    for ex, row in zip(examples, ids):
      text = self.tokenizer.decode(row)
      for s in stop_strings:
        text = text.split(s)[0]
      layout = ex["layouts"][0] if ex["layouts"] else None
      raw, boxes, labels = grounding.parse_answer(text.strip(), layout)
      answers.append(Answer(text.strip(), row, boxes, raw, labels))
    return answers

  def generate(self, prompt, images=None, **kw) -> Answer:
    """The answer to one prompt (a str, or a conversation ending with the user's turn); see generate_batch."""
    return self.generate_batch([prompt], [images], **kw)[0]


def _abstract(config, devices=None):
  """(mesh, graphdef, rest, abstract params carrying their shardings) of a config's model."""
  mesh = shd.make_mesh(config.mesh, devices)
  return (mesh, *build.abstract_params(config, mesh))


def load_model(config, checkpoint_dir=None, *, tokenizer=None, devices=None,
               steps_per_call: int = decode_lib.STEPS_PER_CALL) -> Model:
  """config: a ConfigDict, an experiment spec "FILE[:arg]", or a run's workdir (its config.json;
  then checkpoint_dir defaults to that workdir); checkpoint_dir: a run's workdir, its
  checkpoints/ directory or one step directory (the latest complete step; params only), or None
  for a random init (config.seed). devices: the mesh's devices (default all)."""
  if isinstance(config, str) and not config.partition(":")[0].endswith(".py") and checkpoint_dir is None:
    checkpoint_dir = config  # load_model(WORKDIR)
  config = _inference_config(config, checkpoint_dir)
  mesh, graphdef, rest, abstract = _abstract(config, devices)
  def init():
    fresh = lambda: build.model_parts(config, abstract=False).params
    return jax.jit(fresh, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))()

  # A checkpoint of some parts only (an import) gets the others fresh from config.seed.
  params = init() if checkpoint_dir is None else ckpt_lib.load_params(str(checkpoint_dir), abstract, init=init)
  tokenizer = tokenizer or data_pipelines.tokenizer_for_config(config, required=False)
  return Model(config, params, tokenizer, mesh, graphdef, rest, steps_per_call=steps_per_call)
