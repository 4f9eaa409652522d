"""The quick start's model, briefly trained, answers held-out built-in questions above chance."""

import os

import numpy as np
from tiny_setup import tiny_config

from mm15_jax.evaluation.builtin_eval import baseline_accuracy, evaluate_builtin
from mm15_jax.inference import load_model
from mm15_jax.train.loop import train_and_evaluate

TASKS = ("multi_image", "text_rich", "text_chat")
NUM = 48


def test_briefly_trained_tiny_model_beats_the_blind_baseline(tmp_path):
  config = tiny_config()
  config.train.batch_size = 16  # the quick start's run, 300 steps
  config.data.num_examples = 100_000
  config.train.steps = 300
  config.checkpoint.every = 300
  config.eval.generate_per_task = 0
  train_and_evaluate(config, str(tmp_path), progress=False)
  model = load_model(config, os.path.join(tmp_path, "checkpoints"))
  accuracy = evaluate_builtin(model, config, tasks=TASKS, num_per_task=NUM)
  # Chance: the most common training answer to the same question, without looking at the image.
  blind = baseline_accuracy(list(TASKS), NUM, seed=config.seed, image_scale=config.data.image_scale)
  assert np.mean([accuracy[t] for t in TASKS]) > np.mean([blind[t] for t in TASKS]) + 0.05, (accuracy, blind)
  untrained = evaluate_builtin(load_model(config), config, tasks=TASKS, num_per_task=8)
  assert max(untrained.values()) == 0.0  # random weights answer nothing right
