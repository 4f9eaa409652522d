"""Inference: the KV-cache path against the training forward, sampling, stops, grounding, loading, CLI."""

import os
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest
from flax import nnx
from tiny_setup import ROOT, setup_on, tiny_config

from data_pipelines import anyres, coordinates
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax.inference import Model, grounding, load_model, render
from mm15_jax.inference import model as model_lib
from mm15_jax.inference.render import COLORS
from mm15_jax.inference.sampling import sample
from mm15_jax.train.loop import train_and_evaluate

ONE_CPU = jax.devices()[:1]
PROMPTS = ["What is in [100, 200, 300, 400]?", "Where is the blue square? Give its box, please."]


def images():
  rng = np.random.RandomState(0)
  # Different sizes: a 2x2 grid + overview, and an unsplit tall image (different tile counts).
  return [[rng.randint(0, 256, (40, 70, 3)).astype(np.uint8)], [rng.randint(0, 256, (90, 20, 3)).astype(np.uint8)]]


@pytest.fixture(scope="module")
def dense():
  return load_model(os.path.join(ROOT, "experiments", "tiny.py"), devices=ONE_CPU)


@pytest.fixture(scope="module")
def moe():
  return load_model(os.path.join(ROOT, "experiments", "tiny_moe.py"), devices=ONE_CPU)


def recomputed_greedy(model, prompt, imgs, steps):
  """Greedy decoding by the training forward over the whole sequence at every step (no cache)."""
  ids = list(model.prompt(prompt, imgs)["tokens"])
  n, rows = len(ids), []
  for _ in range(steps):
    logits = model.logits(ids, imgs)[-1]
    rows.append(logits)
    if int(np.argmax(logits)) == model.tokenizer.eos_id:
      break
    ids.append(int(np.argmax(logits)))
  return ids[n:], np.stack(rows)


@pytest.mark.parametrize("trained_with", ["capacity", "megablox", "ragged"])
def test_moe_answers_dropless_with_the_backends_kernel(trained_with):
  # A capacity run must not drop at inference; a TPU run's megablox would be interpreted here.
  config = tiny_config("tiny_moe.py", **{"model.moe.impl": trained_with})
  assert model_lib._inference_config(config).model.moe.impl == "auto"  # blocked on this CPU


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_cached_greedy_equals_recomputing_the_full_sequence(which, request):
  model = request.getfixturevalue(which)
  imgs = images()
  lengths = [len(model.prompt(p, i)["tokens"]) for p, i in zip(PROMPTS, imgs)]
  assert lengths[0] != lengths[1]
  got, got_logits = model.generate_tokens(PROMPTS, imgs, max_new_tokens=8, with_logits=True)
  for row in range(2):
    want, want_logits = recomputed_greedy(model, PROMPTS[row], imgs[row], 8)
    assert got[row] == want
    np.testing.assert_allclose(got_logits[row], want_logits, atol=2e-4, rtol=1e-4)


def test_sharded_mesh_decodes_like_one_device(dense):
  config = dense.config.copy_and_resolve_references()
  config.mesh = dict(data=1, fsdp=2, tensor=2, expert=1)  # embed over fsdp, heads over tensor
  sharded = load_model(config, devices=jax.devices()[:4])
  assert sharded.batch_shards == 2
  assert sharded.generate_tokens(PROMPTS, images(), max_new_tokens=6) == dense.generate_tokens(
      PROMPTS, images(), max_new_tokens=6)


def test_answers_do_not_depend_on_the_steps_per_device_call(dense):
  """Decoding runs several steps per device call; step i always draws with step i's key, and a
  row that stops mid-run (stop id or string) keeps exactly the tokens before it."""
  imgs = images()
  sampled = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
  want = dense.generate_tokens(PROMPTS, imgs, **sampled)
  stop_id = want[0][4]  # a token the first row samples mid-way
  stop_text = dense.tokenizer.decode(want[1][2:4])
  for count in (1, 3):
    other = load_model(dense.config, devices=ONE_CPU, steps_per_call=count)
    assert other.generate_tokens(PROMPTS, imgs, **sampled) == want
    assert other.generate_tokens(PROMPTS, imgs, stop=stop_id, **sampled) == dense.generate_tokens(
        PROMPTS, imgs, stop=stop_id, **sampled)
    assert other.generate_batch(PROMPTS, imgs, stop=stop_text, **sampled) == dense.generate_batch(
        PROMPTS, imgs, stop=stop_text, **sampled)
  assert len(dense.generate_tokens(PROMPTS, imgs, stop=stop_id, **sampled)[0]) == want[0].index(stop_id)


def test_nucleus_sampling_frequencies():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.jit(jax.vmap(lambda k: sample(logits, k, 1.0, 0.7)[0]))
  counts = np.bincount(np.asarray(draw(keys)), minlength=4) / 4000
  # top_p 0.7 keeps {0.5, 0.3} (0.5 < 0.7 is not enough), renormalised: 0.625, 0.375.
  np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.03)
  assert int(sample(logits, keys[0], 0.0, 1.0)[0]) == 0  # greedy
  assert int(sample(logits, keys[0], 1.0, 0.0)[0]) == 0  # top_p -> 0 keeps the argmax


def test_sampling_reproducible_from_a_seed(dense):
  kw = dict(max_new_tokens=10, temperature=1.0)
  a = dense.generate(PROMPTS[0], images()[0], seed=1, **kw)
  b = dense.generate(PROMPTS[0], images()[0], seed=1, **kw)
  c = dense.generate(PROMPTS[0], images()[0], seed=2, **kw)
  assert a.token_ids == b.token_ids and a.text == b.text
  assert a.token_ids != c.token_ids
  greedy = dense.generate(PROMPTS[0], images()[0], max_new_tokens=10)
  assert dense.generate(PROMPTS[0], images()[0], top_p=1e-6, **kw).token_ids == greedy.token_ids


def test_stop_ids_and_strings_end_generation(dense):
  full = dense.generate(PROMPTS[1], max_new_tokens=8).token_ids
  assert len(full) == 8 and dense.tokenizer.eos_id not in full
  stop_id = full[3]
  assert dense.generate(PROMPTS[1], max_new_tokens=8, stop=[stop_id]).token_ids == full[:full.index(stop_id)]
  decode = dense.tokenizer.decode
  stop = decode(full[:4])[-2:]
  assert stop.strip()
  k = min(j for j in range(1, 9) if stop in decode(full[:j]))
  answer = dense.generate(PROMPTS[1], max_new_tokens=8, stop=stop)
  assert answer.token_ids == full[:k]
  assert answer.text == decode(full[:k]).split(stop)[0].strip() and stop not in answer.text


@pytest.mark.parametrize("hw", [(40, 70), (90, 20), (300, 200), (33, 33)])
def test_boxes_round_trip_through_the_canvas(hw):
  h, w = hw
  layout = anyres.plan(h, w, tile=32, n_min=1, n_max=4, split=True)
  box = (0.2 * w, 0.3 * h, 0.9 * w, 0.75 * h)
  point = (0.5 * w, 0.6 * h)
  on_image = coordinates.parse(coordinates.format_box(box, w, h) + coordinates.format_point(point, w, h))
  canvas = [coordinates.image_to_canvas(c, layout) for c in on_image]  # what a trained model writes
  text = (f"the red square {coordinates.BOX_FORMAT.format(*canvas[0])}, "
          f"a dot {coordinates.POINT_FORMAT.format(*canvas[1])}")
  raw, boxes, labels = grounding.parse_answer(text, layout)
  assert raw == canvas and labels == ["the red square", "a dot"]
  np.testing.assert_allclose(boxes[0], box, atol=1.0)
  np.testing.assert_allclose(boxes[1], point, atol=1.0)


def test_prompt_coordinates_are_remapped_like_training(dense):
  img = images()[0][0]
  layout = dense.prompt(PROMPTS[0], [img])["layouts"][0]
  text = dense.tokenizer.decode(dense.prompt(PROMPTS[0], [img])["tokens"])
  assert coordinates.BOX_FORMAT.format(*coordinates.image_to_canvas((100, 200, 300, 400), layout)) in text
  assert text.rstrip().endswith("Assistant:")


def test_render_draws_labelled_boxes(tmp_path):
  image = np.full((64, 128, 3), 255, np.uint8)
  out = render(image, [(10, 10, 50, 40), (100, 30)], ["cat", "dot"], str(tmp_path / "r.png"))
  drawn = np.asarray(PIL.Image.open(tmp_path / "r.png"))
  assert drawn.shape == (256, 512, 3) and out.size == (512, 256)  # scaled x4 for legibility
  assert tuple(drawn[100, 40]) == COLORS[0]  # the left edge of box 1 (x 10 * 4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  config = tiny_config()
  config.train.steps = 2
  config.train.warmup_steps = 1
  config.checkpoint.every = 2
  config.checkpoint.async_save = False
  train_and_evaluate(config, str(workdir), progress=False)
  return config, workdir


def test_load_model_gives_the_trained_params_logits(trained, dense):
  config, workdir = trained
  model = load_model(config, workdir, devices=ONE_CPU)
  ids = list(model.prompt(PROMPTS[0], images()[0])["tokens"])
  got = model.logits(ids, images()[0])
  # Reference: the trainer's restore and the training forward on the same batch.
  setup = setup_on(config, dict(data=8, fsdp=1, tensor=1, expert=1))
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints")
  params = checkpointer.restore(setup.abstract_state)["params"]
  checkpointer.close()
  net = nnx.merge(setup.graphdef, jax.device_get(params), setup.rest)
  ex = model.prompt(PROMPTS[0], images()[0])
  slots = np.full((1, 16 * 4), -1, np.int32)
  slots[0, :len(ex["image_slots"])] = ex["image_slots"]
  tiles = np.zeros((1, 16, 32, 32, 3), np.uint8)
  tiles[0, :len(ex["tiles"])] = ex["tiles"]
  n = len(ids)
  row = lambda a: np.asarray(a, np.int32)[None]
  want = net(row(ids), row(np.arange(n)), row(np.ones(n)), tiles, slots).logits
  # One device against the trainer's 8-way mesh: float32 sums in another order (~1e-5 on logits of ~3).
  np.testing.assert_allclose(got, np.asarray(want)[0], atol=3e-5, rtol=1e-5)
  # The trainer's end-of-run path: the same params handed over in memory.
  again = Model.from_params(config, params, model.tokenizer, devices=ONE_CPU).logits(ids, images()[0])
  np.testing.assert_allclose(again, got, atol=1e-6)
  assert np.abs(got - dense.logits(ids, images()[0])).max() > 1e-3  # trained, not the random init


def test_cli_prints_an_answer_and_renders(trained, tmp_path):
  _, workdir = trained
  PIL.Image.fromarray(images()[0][0]).save(tmp_path / "a.png")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  out = subprocess.run(
      # No --config: the run's own config.json, as a user asks a model they trained.
      [sys.executable, "-m", "mm15_jax.tools.generate", f"--checkpoint={workdir}",
       f"--image={tmp_path / 'a.png'}", "--prompt=Where is the red circle?", "--max_new_tokens=12",
       f"--render={tmp_path / 'out.png'}"],
      cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=300)
  assert "rendered to" in out.stdout
  assert PIL.Image.open(tmp_path / "out.png").size[0] >= 256


def test_a_prompt_longer_than_the_trained_length_is_refused_before_allocating():
  model = load_model(tiny_config())  # random init; data.seq_len 256
  with pytest.raises(ValueError, match=r"a prompt of \d+ tokens .* longer than the model's trained length "
                                       r"data.seq_len=256"):
    model.generate("word " * 2000, max_new_tokens=4)
