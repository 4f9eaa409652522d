"""Small configs and batches shared by the training tests."""

import os

import jax
import numpy as np

import data_pipelines
from mm15_jax import configs
from mm15_jax import sharding as shd
from mm15_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = configs.load_experiment(os.path.join(ROOT, "experiments", "tiny.py"))
  c.train.batch_size = 8
  c.data.num_examples = 256
  c.data.prefetch = 1
  c.eval.batches = 1
  c.log_every = 1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def host_batch(config, index=0):
  tok = data_pipelines.load_tokenizer(config.model.llm.vocab_size)
  it = iter(data_pipelines.make_train_dataset(config, tok))
  for _ in range(index):
    next(it)
  return next(it)


def setup_on(config, mesh_axes, devices=None):
  config = config.copy_and_resolve_references()
  config.mesh = mesh_axes
  mesh = shd.make_mesh(config.mesh, devices=devices)
  return state_lib.make_setup(config, mesh)


def place(setup, batch):
  return {k: jax.device_put(np.asarray(v), setup.batch_sharding(np.ndim(v))) for k, v in batch.items()}
