"""The images reach the decoder and matter: pixels change the image-token embeddings, gradients
reach the encoder and connector, and a briefly trained model does worse on held-out questions
when its images are blanked."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_setup import place, setup_on, tiny_config

import data_pipelines
from data_pipelines import anyres, packing
from mm15_jax.evaluation import builtin_eval
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib

ONE_DEVICE = dict(data=1, fsdp=1, tensor=1, expert=1)


def model_inputs(batch):
  return {k: v for k, v in batch.items() if k not in packing.COUNT_FIELDS}


def blank(batch):
  """The batch with every tile flat (the padding colour): same tokens and slots, no pixels."""
  out = dict(batch)
  out["images"] = np.broadcast_to(np.asarray(anyres.PAD_COLOR, np.uint8), batch["images"].shape).copy()
  return out


def qa_config(steps, split=True):
  """The quick start's model on the built-in QA task alone (colours, shapes, background)."""
  c = tiny_config(**{"train.steps": steps, "train.batch_size": 16, "train.warmup_steps": 5})
  c.data.sources = {"qa": dict(kind="builtin", weight=1.0)}
  c.data.num_examples = 4096
  if not split:  # one tile per image (no AnyRes): short rows, a cheap step
    c.data.anyres.enabled = False
    c.data.seq_len, c.data.max_tiles, c.train.loss_chunk = 128, 8, 128
  return c


def test_image_tokens_depend_on_pixels_and_train_the_encoder():
  config = qa_config(1)
  setup = setup_on(config, ONE_DEVICE, jax.devices()[:1])
  state = state_lib.init_state(setup)
  tokenizer = data_pipelines.tokenizer_for_config(config)
  batch = model_inputs(next(iter(data_pipelines.make_train_dataset(config, tokenizer))))
  model = nnx.merge(setup.graphdef, state["params"], setup.rest)
  args = lambda b: (jnp.asarray(b["tokens"]), jnp.asarray(b["images"]), jnp.asarray(b["image_token_positions"]))
  real, flat = np.asarray(model.embed(*args(batch))), np.asarray(model.embed(*args(blank(batch))))
  slots = batch["image_token_positions"]
  at_image = np.zeros(batch["tokens"].shape, bool)
  for row, positions in enumerate(slots):
    at_image[row, positions[positions >= 0]] = True
  assert at_image.any() and (batch["tokens"][at_image] == tokenizer.image_id).all()
  changed = np.abs(real - flat).max(-1) > 1e-4
  assert changed[at_image].all()  # every image token carries pixels ...
  assert not changed[~at_image].any()  # ... and nothing else does
  # Tile t of a row fills that row's slots t*K..(t+1)*K-1 (mm15_jax/batch.py) and no others.
  k, tile = config.model.connector.tokens_per_tile, 1
  one = dict(batch, images=batch["images"].copy())
  one["images"][0, tile] = anyres.PAD_COLOR
  moved = np.flatnonzero(np.abs(np.asarray(model.embed(*args(one))) - real)[0].max(-1) > 1e-4)
  assert sorted(moved) == sorted(slots[0, tile * k:(tile + 1) * k]) and (slots[0, tile * k:(tile + 1) * k] >= 0).all()
  _, _, grads = step_lib.jit_loss_and_grads(setup)(state["params"], place(setup, batch))
  for part in ("vit", "connector"):
    norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads[part]))))
    assert norm > 1e-3, (part, norm)


def held_out(setup, params, batches, transform=lambda b: b):
  """(loss, token accuracy) of the answers over the eval batches."""
  eval_step = step_lib.jit_eval_step(setup)
  sums = [jax.device_get(eval_step(params, place(setup, transform(b)))) for b in batches]
  count = sum(float(s["count"]) for s in sums)
  return sum(float(s["loss_sum"]) for s in sums) / count, sum(float(s["correct"]) for s in sums) / count


@pytest.fixture(scope="module")
def trained_on_qa():
  config = qa_config(steps=80, split=False)
  setup = setup_on(config, ONE_DEVICE, jax.devices()[:1])
  tokenizer = data_pipelines.tokenizer_for_config(config)
  state = state_lib.init_state(setup)
  train_step = step_lib.jit_train_step(setup)
  batches = iter(data_pipelines.make_train_dataset(config, tokenizer))
  for _ in range(config.train.steps):
    state, _ = train_step(state, place(setup, model_inputs(next(batches))))
  held = [model_inputs(b) for b in data_pipelines.make_eval_batches(config, tokenizer, 4)]
  return setup, state["params"], held


def test_blanked_images_score_lower(trained_on_qa):
  setup, params, held = trained_on_qa
  loss, accuracy = held_out(setup, params, held)
  blank_loss, blank_accuracy = held_out(setup, params, held, blank)
  print(f"held-out QA answers: loss {loss:.3f} / {blank_loss:.3f}, token accuracy {accuracy:.3f} / "
        f"{blank_accuracy:.3f} (images / blanked)")
  assert blank_loss > loss + 0.1, (loss, blank_loss)
  assert accuracy > blank_accuracy, (accuracy, blank_accuracy)


class ReadsItsImages:
  """A stub model that knows each held-out question's answer only by looking at its image pixels."""

  def __init__(self, questions_by_task):
    self.answers = {}
    for qs in questions_by_task:
      for q in qs:
        key = (q["prompt"], b"".join(np.ascontiguousarray(im).tobytes() for im in q["images"]))
        self.answers[key] = q

  def generate_batch(self, prompts, images, **kwargs):
    out = []
    for prompt, ims in zip(prompts, images):
      q = self.answers.get((prompt, b"".join(np.ascontiguousarray(im).tobytes() for im in ims)))
      text = q["answer"] if q else "no idea"
      out.append(SimpleNamespace(text=text, boxes=list(q["boxes"]) if q else []))
    return out


def test_report_asks_again_with_blanked_images(tmp_path):
  config = qa_config(1)
  tasks = ["qa", "ground", "text_chat"]
  model = ReadsItsImages(builtin_eval.questions(t, 6, seed=config.seed) for t in tasks)
  q = builtin_eval.questions("qa", 1)[0]
  flat = builtin_eval.blanked(q)["images"][0]
  assert flat.shape == q["images"][0].shape and len(np.unique(flat.reshape(-1, 3), axis=0)) == 1
  accuracy = builtin_eval.evaluate_builtin(model, config, tasks=tasks, num_per_task=6, out_dir=str(tmp_path))
  report = json.loads((tmp_path / "REPORT.json").read_text())
  assert accuracy == report["accuracy"] == {t: 1.0 for t in tasks}
  # Image questions go unanswered without their pixels; a text-only task has nothing to blank.
  assert report["blanked"] == {"qa": 0.0, "ground": 0.0, "text_chat": 1.0}
  assert "| qa | 6 | 100.0 |" in (tmp_path / "REPORT.md").read_text()
  assert "images blanked (%)" in (tmp_path / "REPORT.md").read_text()
