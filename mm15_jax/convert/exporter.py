"""Our decoder -> the public Llama/Qwen2 layout, or Mixtral's for routed experts in every layer
(safetensors shards + config.json), so common serving tools load it. Single host: each param is
fetched one layer at a time and written in shards of bounded size, so the host holds one shard,
never the whole model."""


import jax
import ml_dtypes
import numpy as np

from data_pipelines import storage, tokenizer_json
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.progress import Progress
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import configs, distributed, run_record
from mm15_jax.convert import public_decoder, public_moe_decoder, tensor_map
from mm15_jax.convert.importer import abstract_part, import_mesh
from mm15_jax.convert.safetensors_dir import write_checkpoint
from mm15_jax.models.moe import moe_settings

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


def experiment_for(checkpoint_dir: str, config_spec: str | None):
  """The experiment a checkpoint was written with: --config, else the import's CHECKPOINT/config.py,
  else the config.json its run wrote."""
  spec = config_spec or storage.join(checkpoint_dir, "config.py")
  if storage.exists(spec.partition(":")[0]):
    return configs.load_experiment(spec)
  if not config_spec:
    written = run_record.find_config(checkpoint_dir)
    if written is not None:
      return written
  raise FileNotFoundError(f"no experiment file for --checkpoint={checkpoint_dir!r} (and no config.json of its run): "
                          "pass --config=FILE[:arg] (the experiment the run was trained with)")


def run_export(checkpoint_dir: str, out_dir: str, *, config_spec: str | None = None, dtype: str = "bfloat16",
               max_shard_bytes: int = 2 << 30, devices=None) -> list[str]:
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {sorted(DTYPES)}")
  config = experiment_for(checkpoint_dir, config_spec)
  llm = config.model.llm
  moe = moe_settings(config.model.moe, llm.mlp_dim)  # None: a dense decoder
  if moe is not None:
    public_moe_decoder.check_exportable(llm, moe)  # before anything is read
  mesh = import_mesh(devices)
  abstract, _ = abstract_part(config, "llm", mesh)
  params = ckpt_lib.load_param_parts({}, {"llm": abstract}, {"llm": checkpoint_dir})["llm"]
  # Several processes: every one gathers the decoder (a collective), process 0 writes.
  params = distributed.host_value(params)
  if not distributed.is_main():
    return []
  extra, tok = tokenizer_files(config.data.tokenizer)
  public = (public_decoder.public_config(llm, dtype=dtype) if moe is None else
            public_moe_decoder.public_config(llm, moe, dtype=dtype))
  if tok:  # bos may be None (Qwen2 has none): config.json then says so
    public.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  cast = DTYPES[dtype]
  if moe is None:
    named = tensor_map.export(public_decoder.tensors(llm), params, llm.n_layers)
  else:
    named = public_moe_decoder.export(public_moe_decoder.tensors(llm, moe), params, llm.n_layers)
  total = sum(leaf.size for leaf in jax.tree.leaves(params)) * np.dtype(cast).itemsize
  with Progress(total, "export", "bytes") as bar:  # every param is exported once
    def pairs():
      for name, array in named:
        array = array.astype(cast)
        yield name, array
        bar.update(array.nbytes)
    return write_checkpoint(out_dir, pairs(), public, max_shard_bytes=max_shard_bytes, extra_files=extra)


def tokenizer_files(source: str):
  """({exported name: path}, tokenizer) of config.data.tokenizer: a tokenizer.json goes with the
  tokenizer_config.json beside it, a SentencePiece model as tokenizer.model; ({}, None) without one."""
  if not source or source == "none":
    return {}, None
  tok = tokenizer_lib.load_tokenizer_file(source)
  if not source.endswith(".json"):
    return {"tokenizer.model": source}, tok
  files = {"tokenizer.json": source}
  beside = tokenizer_json.config_path(source)
  if storage.isfile(beside):
    files["tokenizer_config.json"] = beside
  return files, tok

