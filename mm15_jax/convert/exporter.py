"""Our decoder -> the public Llama/Qwen2 layout (safetensors shards + config.json), so common
serving tools load it. Single host: each param is fetched one layer at a time and written in
shards of bounded size, so the host holds one shard, never the whole model."""

import os

import ml_dtypes
import numpy as np

from data_pipelines import tokenizer as tokenizer_lib
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import configs
from mm15_jax.convert import public_decoder, tensor_map
from mm15_jax.convert.importer import abstract_part, import_mesh
from mm15_jax.convert.safetensors_dir import write_checkpoint

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


def experiment_for(checkpoint_dir: str, config_spec: str | None):
  """The experiment a checkpoint was written with: --config, else the import's CHECKPOINT/config.py."""
  spec = config_spec or os.path.join(checkpoint_dir, "config.py")
  if not os.path.exists(spec.partition(":")[0]):
    raise FileNotFoundError(f"no experiment file for --checkpoint={checkpoint_dir!r}: pass --config=FILE[:arg] "
                            "(the experiment the run was trained with)")
  return configs.load_experiment(spec)


def run_export(checkpoint_dir: str, out_dir: str, *, config_spec: str | None = None, dtype: str = "bfloat16",
               max_shard_bytes: int = 2 << 30, devices=None) -> list[str]:
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {sorted(DTYPES)}")
  config = experiment_for(checkpoint_dir, config_spec)
  llm = config.model.llm
  if config.model.moe.num_experts:
    raise ValueError("config.model.moe.num_experts > 0: an MoE decoder has no Llama/Qwen2 layout to export to")
  mesh = import_mesh(devices)
  abstract, _ = abstract_part(config, "llm", mesh)
  params = ckpt_lib.load_param_parts({}, {"llm": abstract}, {"llm": checkpoint_dir})["llm"]
  extra, bos, eos = {}, None, None
  source = config.data.get("tokenizer", "")
  if source and source != "none":
    tok = tokenizer_lib.load_tokenizer_file(source)
    extra["tokenizer.model"], bos, eos = source, tok.bos_id, tok.eos_id
  cast = DTYPES[dtype]
  pairs = ((name, array.astype(cast)) for name, array in
           tensor_map.export(public_decoder.tensors(llm), params, llm.n_layers))
  return write_checkpoint(out_dir, pairs, public_decoder.public_config(llm, dtype=dtype, bos_id=bos, eos_id=eos),
                          max_shard_bytes=max_shard_bytes, extra_files=extra)

