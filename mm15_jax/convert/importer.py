"""Public weights -> an orbax checkpoint of one part (llm or vit) plus an experiment file.

  OUT/checkpoints/0/params   {"llm": ...} or {"vit": ...}, our layout and param dtype
  OUT/config.py              the experiment: base() with the imported shape, init.<part>_from=OUT
  OUT/tokenizer.model        the decoder's SentencePiece model with <image> added (if it had one), or
  OUT/tokenizer.json         its Hugging Face tokenizer with <image> added, and tokenizer_config.json
                             naming bos/eos/pad (a checkpoint with tokenizer.json only: Llama 3, Qwen2)
  OUT/import.json            where it came from

The experiment file is written last, so its presence marks a complete import.
`mm15_jax.inference.load_model("OUT/config.py", "OUT")` loads it (the other parts start from
config.seed), and training starts from it through `config.init.llm_from` / `vit_from`.
"""

import json
import os
import pprint
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import storage, tokenizer_json
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.progress import Progress
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import configs, run_record
from mm15_jax import sharding as shd
from mm15_jax.convert import public_decoder, public_moe_decoder, public_vision, tensor_map
from mm15_jax.convert.safetensors_dir import PublicCheckpoint
from mm15_jax.models import build

KINDS = ("llm", "vit")


def experiment_config(kind: str, part_config: dict, *, tokenizer: str = "none"):
  """base() with the imported part's shape; the other parts stay the base's (tiny) ones."""
  c = configs.base()
  if kind == "llm":
    part_config = dict(part_config)
    c.model.moe.update(part_config.pop("moe", {}))  # a mixture-of-experts decoder's
    c.model.llm.update(part_config)
    c.data.tokenizer = tokenizer
  else:
    c.model.vit.update(part_config)
    c.model.connector.hidden_dim = part_config["width"]
    c.model.connector.tokens_per_tile = configs.tokens_per_tile(part_config["image_size"], part_config["patch_size"])
    c.data.max_tiles = 4
  return c


def abstract_part(config, kind: str, mesh):
  """(ShapeDtypeStructs carrying their shardings, shardings) of one part's params under `mesh`."""
  structs = build.abstract_params(config, mesh)[2][kind]
  return structs, jax.tree.map(lambda a: a.sharding, structs)


def import_mesh(devices=None):
  """Params sharded over every device (fsdp), as training holds them: nothing is replicated."""
  return shd.make_mesh(dict(data=1, fsdp=-1, tensor=1, expert=1), devices)


def read_part(kind: str, checkpoint: PublicCheckpoint, mesh, *, stats=None, progress: bool = False):
  """(our part config, params placed on `mesh`) from a public checkpoint; `progress`: tensors
  read and the ETA on process 0."""
  maps = tensor_map  # name and shape checks and the sharded load; a Mixtral decoder's also cover its experts
  if kind == "llm":
    if checkpoint.config.get("model_type") in public_moe_decoder.MODEL_TYPES:
      maps, part = public_moe_decoder, public_moe_decoder.llm_config(checkpoint.config)
      entries = public_moe_decoder.tensors(part, part["moe"], public_moe_decoder.layout_of(checkpoint.keys()))
    else:
      part = public_decoder.llm_config(checkpoint.config)
      entries = public_decoder.tensors(part)
    n_layers = part["n_layers"]
    ignore = public_decoder.IGNORED + (("lm_head.weight",) if part["tie_embeddings"] else ())
    what = f"{checkpoint.config['model_type']} decoder"
  elif kind == "vit":
    part = public_vision.vit_config(checkpoint.config, checkpoint.load_json("preprocessor_config.json"))
    prefix = public_vision.prefix_of(checkpoint.keys())
    entries, n_layers, ignore = public_vision.tensors(part, prefix), part["depth"], public_vision.ignored(prefix)
    what = f"{checkpoint.config['model_type']} vision"
  else:
    raise ValueError(f"--kind={kind!r}: expected one of {KINDS}")
  maps.check_names(entries, checkpoint, n_layers, ignore=ignore, what=what)
  config = experiment_config(kind, part)
  abstract, shardings = abstract_part(config, kind, mesh)
  maps.check_shapes(entries, checkpoint, abstract)
  missing = sorted(set(map(tuple, tensor_map.leaf_paths(abstract))) - {e.ours for e in entries})
  if missing:  # a mapping that forgot a param would leave it at its fresh init
    raise AssertionError(f"no public tensor maps to {missing}")
  with Progress(len(entries), f"import {kind}", "tensors", enabled=progress and jax.process_index() == 0) as bar:
    return part, maps.load(entries, checkpoint, abstract, shardings, stats, bar)


def write_tokenizer(hf_dir: str, out_dir: str, model_config: dict) -> str | None:
  """The decoder's tokenizer copied to out_dir with `<image>` added at the next free id (every
  existing id unchanged): tokenizer.model (SentencePiece), else tokenizer.json with a
  tokenizer_config.json naming bos/eos/pad. Returns the file for config.data.tokenizer, or None
  when the checkpoint has neither."""
  sp_path, json_path = os.path.join(hf_dir, "tokenizer.model"), os.path.join(hf_dir, "tokenizer.json")
  if os.path.isfile(sp_path):
    with open(sp_path, "rb") as f:
      files = {"tokenizer.model": tokenizer_lib.with_image_piece(f.read())}
  elif os.path.isfile(json_path):
    with open(json_path, encoding="utf-8") as f:
      text = tokenizer_json.with_image_token(f.read())
    config = tokenizer_json.imported_config(tokenizer_json.read_config(json_path), model_config, text)
    files = {"tokenizer.json": text.encode(), "tokenizer_config.json": json.dumps(config, indent=2).encode()}
  else:
    return None
  for name, data in files.items():
    with storage.open_file(storage.join(out_dir, name), "wb") as f:
      f.write(data)
  return storage.join(out_dir, next(iter(files)))


def add_image_token(llm_params: dict, part: dict, tokenizer):
  """(params, part) with one embedding row (and LM head column) added, the mean of the others,
  when the tokenizer's ids (its `<image>` included: the id MM1.5 writes image tokens at) pass the
  checkpoint's rows by one. Unchanged when they fit, e.g. in spare rows (Qwen2 has some)."""
  vocab = tokenizer.vocab_size
  if vocab <= part["vocab_size"]:
    return llm_params, part
  if vocab != part["vocab_size"] + 1:
    raise ValueError(f"the tokenizer has {vocab - 1} ids besides {tokenizer_lib.IMAGE_TOKEN} but config.json "
                     f"vocab_size={part['vocab_size']}")
  params = dict(llm_params)
  params["embedding"] = jnp.concatenate([params["embedding"], params["embedding"].mean(0, keepdims=True)], 0)
  if "lm_head" in params:
    params["lm_head"] = jnp.concatenate([params["lm_head"], params["lm_head"].mean(1, keepdims=True)], 1)
  return params, dict(part, vocab_size=vocab)


def save_part(out_dir: str, kind: str, params) -> None:
  ckpt_lib.save_params(ckpt_lib.workdir_checkpoints(storage.absolute(out_dir)), 0, {kind: params})


CONFIG_TEMPLATE = '''"""{title}, imported by `python -m mm15_jax.convert import` from
{source}

  python -m mm15_jax.train --config={path} --workdir=DIR   # starts from the imported {kind}
  python -m mm15_jax.convert check --hf={source} --checkpoint={out}

The other parts of the model are the base experiment's (mm15_jax.configs.base); set them
(and data, mesh, train) for the run you want, or load this file from your experiment.
"""

import os

from mm15_jax import configs

HERE = os.path.dirname(os.path.abspath(__file__))
IMPORTED = {part}


def get_config(arg=""):
  del arg
  c = configs.base()
  c.model.{kind}.update(IMPORTED)
{moe}{extra}  c.init.{kind}_from = HERE
  return c
'''


def write_experiment(out_dir: str, kind: str, part: dict, source: str, tokenizer_file: str | None) -> str:
  part = dict(part)
  moe = part.pop("moe", None)  # a mixture-of-experts decoder's config.model.moe
  moe_lines = ("  # Routed experts; impl 'auto' drops no token, as the public model computes.\n"
               f"  c.model.moe.update({moe!r})\n") if moe else ""
  if kind == "llm":
    tok = (f'os.path.join(HERE, "{os.path.basename(tokenizer_file)}")' if tokenizer_file else
           '"none"  # no tokenizer.model or tokenizer.json was found')
    extra = f"  c.data.tokenizer = {tok}\n"
    title = "Decoder LLM"
  else:
    tokens = configs.tokens_per_tile(part["image_size"], part["patch_size"])
    extra = (f"  c.model.connector.hidden_dim = {part['width']}\n"
             f"  c.model.connector.tokens_per_tile = {tokens}\n  c.data.max_tiles = 4\n")
    title = "Image encoder"
  path = storage.join(out_dir, "config.py")
  text = CONFIG_TEMPLATE.format(title=title, source=storage.absolute(source), path=path, out=out_dir, kind=kind,
                                part=pprint.pformat(part, indent=4, sort_dicts=False), extra=extra, moe=moe_lines)
  storage.write_text_atomic(path, text)
  return path


def load_written_experiment(out_dir: str, config_py: str):
  """The ConfigDict of an import's config.py. In a bucket the file cannot be executed where it
  lies: a local copy is, and its paths (HERE) are pointed back at the bucket."""
  if not storage.is_remote(out_dir):
    return configs.load_experiment(config_py)
  local = tempfile.mkdtemp(prefix="mm15_import_")
  try:
    copy = os.path.join(local, "config.py")
    with open(copy, "w") as f:
      f.write(storage.read_text(config_py))
    config = configs.load_experiment(copy)
  finally:
    shutil.rmtree(local, ignore_errors=True)
  for kind in ("llm", "vit"):
    if config.init[f"{kind}_from"] == local:
      config.init[f"{kind}_from"] = out_dir
  if config.data.tokenizer.startswith(local + os.sep):
    config.data.tokenizer = storage.join(out_dir, os.path.basename(config.data.tokenizer))
  return config


def run_import(kind: str, hf_dir: str, out_dir: str, *, devices=None) -> dict:
  """The whole import; returns a summary (param count, bytes read, paths). hf_dir and out_dir may
  be in a bucket (gs://): a bucket model directory is copied to a local folder first (safetensors
  files are memory-mapped), the import is written to the bucket directly."""
  out_dir = storage.absolute(out_dir)
  if storage.exists(storage.join(out_dir, "config.py")) or storage.exists(storage.join(out_dir, "checkpoints")):
    raise FileExistsError(f"--out={out_dir!r} already holds an import; give a new directory")
  with storage.local_copy(hf_dir) as local_hf:
    return _import(kind, local_hf, out_dir, devices, source=storage.absolute(hf_dir))


def _import(kind: str, hf_dir: str, out_dir: str, devices, source: str) -> dict:
  checkpoint = PublicCheckpoint(hf_dir)
  stats = {}
  part, params = read_part(kind, checkpoint, import_mesh(devices), stats=stats, progress=True)
  tokenizer_file = None
  storage.makedirs(out_dir)
  if kind == "llm":
    tokenizer_file = write_tokenizer(hf_dir, out_dir, checkpoint.config)
    if tokenizer_file:  # loaded as training will load it: <image> and eos are checked here
      params, part = add_image_token(params, part, tokenizer_lib.load_tokenizer_file(tokenizer_file))
  save_part(out_dir, kind, params)
  summary = dict(kind=kind, source=source, model_type=checkpoint.config.get("model_type"),
                 params=int(sum(np.prod(a.shape) for a in jax.tree.leaves(params))),
                 bytes_read=checkpoint.bytes_read, largest_host_array=stats.get("largest_host_array", 0),
                 tokenizer=tokenizer_file)
  if jax.process_index() == 0:
    storage.write_text_atomic(storage.join(out_dir, "import.json"),
                              json.dumps(dict(summary, config=part), indent=2, default=list))
    summary["config"] = write_experiment(out_dir, kind, part, source, tokenizer_file)
    # The same experiment as data: usable without executing the directory's Python.
    run_record.write_config(load_written_experiment(out_dir, summary["config"]), out_dir)
  return summary
