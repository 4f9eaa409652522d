"""Small configs and batches shared by the training tests."""

import os

import jax
import numpy as np

import data_pipelines
from mm15_jax import configs
from mm15_jax import sharding as shd
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(experiment="tiny.py", **overrides):
  """A tiny experiment with test-sized data; overrides by dotted path ("model.moe.impl")."""
  c = configs.load_experiment(os.path.join(ROOT, "experiments", experiment))
  c.train.batch_size = 8
  c.data.num_examples = 256
  c.data.prefetch = 1
  c.eval.batches = 1
  c.eval.generate_per_task = min(c.eval.generate_per_task, 24)  # the quick start asks 96: statistics, not tests
  c.log_every = 1
  return set_fields(c, overrides)


def set_fields(config, fields: dict):
  """config with each dotted field ("train.steps") set to its value, as --config.FIELD=VALUE does."""
  for key, value in fields.items():
    configs.set_field(config, key, value)
  return config


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


def train_on_fixed_batch(setup, config):
  """`config.train.steps` steps on one batch: (losses, last metrics)."""
  state = state_lib.init_state(setup)
  batch = place(setup, host_batch(config))
  step = step_lib.jit_train_step(setup)
  losses = []
  for _ in range(config.train.steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, metrics
