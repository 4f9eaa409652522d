"""Can the image encoder localise, and see what it grounds? One-object scenes read off the
connector's tokens.

  python benchmarks/grounding_probe.py --config=experiments/tiny_spatial.py:spatial
  python benchmarks/grounding_probe.py --config=experiments/tiny_spatial.py:spatial --checkpoint=W/spatial
  python benchmarks/grounding_probe.py --checkpoint=W/spatial --attributes --steps=0 --ask=120
  python benchmarks/grounding_probe.py --attributes --steps=1000 --set=model.vit.patch_size=4   # another encoder

Built-in scenes with one shape (data_pipelines/builtin/scenes.py), each rendered as the
config's single tile (AnyRes off: the whole image fit into one tile, padded), and the shape's
box in tile units (0..1, the canvas the model's coordinates refer to). Two measurements, each
scored as the fraction of held-out boxes found at IoU >= 0.5 (the grounding metric):

  supervised  the config's ViT + connector, from its random init, trained directly on the
              boxes through a small MLP head on the tile's tokens (L1 loss): what the encoder
              can learn to see in `--steps` steps, with the best possible signal.
  probe       the same MLP head trained on the FROZEN tokens of the checkpoint's encoder, and
              of the random init in the same run: how much of a box the trained tokens hold
              beyond what random features already give. Without --checkpoint only the random
              init is probed.

It answers where grounding is lost: an encoder that learns boxes when supervised but whose
trained tokens probe no better than random ones never got a position signal through the
decoder (benchmarks/RESULTS.md, "Why the tiny model does not ground").

A grounding phrase names its object by colour, shape or both, so the model must also see
those. --attributes measures the object's colour (5 classes) and shape (3) the same two ways,
as accuracy: supervised (a linear classifier on the tokens, trained with the encoder) and a
linear probe on frozen tokens. --ask=N asks the checkpoint's whole model N questions per case
("What color is the circle?", "Which shape is red?" on scenes of 1, 2 and 3 objects, every
object a different colour and shape) and reports how often the answer is right and how often
it names some object in the scene: with k objects, right / in-scene near 1/k means it sees
the objects but cannot tell which one the question names.
"""

import argparse
import ast
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data_pipelines import anyres
from data_pipelines.builtin import scenes
from mm15_jax import configs
from mm15_jax.evaluation import metrics
from mm15_jax.models import build
from mm15_jax.models.mm15 import normalize_pixels


def one_object_scenes(num: int, tile: int, seed: int) -> dict:
  """{"tiles": uint8 [num, tile, tile, 3], "boxes": float [num, 4] (x1, y1, x2, y2 in tile
  units), "colors": int [num] (index in scenes.COLORS), "shapes": int [num] (in scenes.SHAPES)}."""
  rng = np.random.default_rng(seed)
  tiles, boxes, colors, shapes = [], [], [], []
  for _ in range(num):
    h, w = scenes.image_hw(rng, 1.0)
    image, _, objects = scenes.draw_scene(rng, h, w, 1)
    layout = anyres.plan(h, w, tile=tile, n_min=1, n_max=1, split=False)
    tiles.append(anyres.render_tiles(image, layout)[0])
    (rh, rw), (x1, y1, x2, y2) = layout.resized_hw, objects[0].box
    boxes.append([x1 * rw / (w * tile), y1 * rh / (h * tile), x2 * rw / (w * tile), y2 * rh / (h * tile)])
    colors.append(list(scenes.COLORS).index(objects[0].color))
    shapes.append(scenes.SHAPES.index(objects[0].shape))
  return dict(tiles=np.stack(tiles), boxes=np.asarray(boxes, np.float32), colors=np.asarray(colors),
              shapes=np.asarray(shapes))


def one_object_tiles(num: int, tile: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 tiles [num, tile, tile, 3] and float boxes [num, 4] (x1, y1, x2, y2 in tile units)."""
  data = one_object_scenes(num, tile, seed)
  return data["tiles"], data["boxes"]


def hit_rate(pred: np.ndarray, boxes: np.ndarray) -> float:
  """Fraction of boxes found at IoU >= 0.5."""
  return float(np.mean([metrics.grounding_hit(p, b) for p, b in zip(pred, boxes)]))


class BoxHead(nnx.Module):
  """The tile's tokens, concatenated in order -> GELU MLP -> box (+0.4: near the mean box at the start)."""

  def __init__(self, in_dim: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(in_dim, 256, rngs=rngs)
    self.fc2 = nnx.Linear(256, 4, rngs=rngs)

  def __call__(self, tokens):
    return self.fc2(jax.nn.gelu(self.fc1(tokens.reshape(tokens.shape[0], -1)))) + 0.4


class AttributeHead(nnx.Module):
  """The tile's tokens, concatenated -> one linear map -> colour logits, then shape logits."""

  def __init__(self, in_dim: int, *, rngs: nnx.Rngs):
    self.fc = nnx.Linear(in_dim, NUM_COLORS + len(scenes.SHAPES), rngs=rngs)

  def __call__(self, tokens):
    return self.fc(tokens.reshape(tokens.shape[0], -1))


NUM_COLORS = len(scenes.COLORS)
HEADS = {"box": BoxHead, "attributes": AttributeHead}


def box_loss(pred, boxes):
  return jnp.abs(pred - boxes).mean()


def attribute_loss(logits, labels):
  """labels [n, 2]: colour and shape indices."""
  ce = optax.softmax_cross_entropy_with_integer_labels
  return (ce(logits[:, :NUM_COLORS], labels[:, 0]) + ce(logits[:, NUM_COLORS:], labels[:, 1])).mean()


def attribute_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict:
  """{"color": accuracy, "shape": accuracy} of the logits' argmax per attribute."""
  return dict(color=float(np.mean(logits[:, :NUM_COLORS].argmax(1) == labels[:, 0])),
              shape=float(np.mean(logits[:, NUM_COLORS:].argmax(1) == labels[:, 1])))


def labels(data: dict) -> np.ndarray:
  return np.stack([data["colors"], data["shapes"]], 1)


class EncoderWithHead(nnx.Module):
  def __init__(self, model_config, seed: int, head: str = "box"):
    model = build.build_model(model_config, seed)
    self.vit, self.connector, self.pixel_stats = model.vit, model.connector, model.pixel_stats
    k, d = model_config.connector.tokens_per_tile, model_config.llm.d_model
    self.head = HEADS[head](k * d, rngs=nnx.Rngs(seed + 1))

  def tokens(self, tiles):
    return self.connector(self.vit(normalize_pixels(tiles, *self.pixel_stats)))

  def __call__(self, tiles):
    return self.head(self.tokens(tiles))


def fit(model, inputs, targets, *, steps: int, lr: float, batch: int, loss=box_loss):
  """Adam on loss(model(inputs), targets) over every param of `model`."""
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    value, grads = nnx.value_and_grad(lambda m: loss(m(x), y))(model)
    opt.update(model, grads)
    return value

  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(inputs), batch)
    step(model, opt, jnp.asarray(inputs[idx]), jnp.asarray(targets[idx]))


def predict(fn, inputs, chunk: int = 256) -> np.ndarray:
  return np.concatenate([np.asarray(fn(jnp.asarray(inputs[i:i + chunk]))) for i in range(0, len(inputs), chunk)])


def frozen_tokens(model_config, params, train_tiles, test_tiles) -> list[np.ndarray]:
  """The tiles' tokens from an encoder with `params` (None: its random init), standardised by
  the train split's statistics (trained tokens are larger)."""
  model = EncoderWithHead(model_config, seed=0)
  for part in ("vit", "connector") if params is not None else ():
    _, state = nnx.split(getattr(model, part), nnx.Param)
    nnx.replace_by_pure_dict(state, params[part])
    nnx.update(getattr(model, part), state)
  tokens = nnx.jit(lambda m, x: m.tokens(x))
  feats = [predict(lambda x: tokens(model, x), tiles) for tiles in (train_tiles, test_tiles)]
  mean, std = feats[0].mean(0), feats[0].std(0) + 1e-6
  return [(f - mean) / std for f in feats]


def probe(feats, train_targets, test_targets, *, head: str, steps: int, lr: float, batch: int):
  """A head trained on frozen tokens, scored on the test split: box hit rate or attribute accuracy."""
  model = HEADS[head](feats[0][0].size, rngs=nnx.Rngs(1))
  loss = box_loss if head == "box" else attribute_loss
  fit(model, feats[0], train_targets, steps=steps, lr=lr, batch=batch, loss=loss)
  out = predict(nnx.jit(lambda x: model(x)), feats[1])
  return hit_rate(out, test_targets) if head == "box" else attribute_accuracy(out, test_targets)


def ask_attributes(model, num: int, seed: int = 0) -> dict:
  """A loaded model's (mm15_jax.inference) answers to "What color is the <shape>?" / "Which shape
  is <colour>?" on `num` scenes of each of 1, 2 and 3 objects -> {"<k> objects, <asked>":
  {"right", "in_scene", "n"}}."""
  from data_pipelines.builtin.single_image import PREFIX

  rng = np.random.default_rng(seed)
  questions = []
  for count in (1, 2, 3):
    for asked in ("color", "shape"):
      for _ in range(num):
        h, w = scenes.image_hw(rng, 1.0)
        image, _, objects = scenes.draw_scene(rng, h, w, count, max_frac=0.3)  # 3 always fit at 0.3
        obj = objects[rng.integers(len(objects))]
        question = f"What color is the {obj.shape}?" if asked == "color" else f"Which shape is {obj.color}?"
        in_scene = [getattr(o, asked) for o in objects]
        questions.append((f"{len(objects)} objects, {asked}", PREFIX + question, image, getattr(obj, asked), in_scene))
  answers = []
  for i in range(0, len(questions), 32):
    batch = questions[i:i + 32]
    answers += model.generate_batch([q[1] for q in batch], [[q[2]] for q in batch], max_new_tokens=8)
  tally = {}
  for (case, _, _, truth, in_scene), answer in zip(questions, answers):
    text = answer.text.strip().lower().rstrip(".")
    right, seen = tally.setdefault(case, ([], []))
    right.append(text == truth)
    seen.append(text in in_scene)
  return {case: dict(right=float(np.mean(r)), in_scene=float(np.mean(s)), n=len(r)) for case, (r, s) in tally.items()}


def literal(text: str):
  """A --set value: a Python literal (4, 0.5, True) or else the string itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="experiments/tiny_spatial.py:spatial")
  parser.add_argument("--checkpoint", default="", help="A run's workdir or step dir: probe its encoder too.")
  parser.add_argument("--steps", type=int, default=2000, help="Supervised encoder training steps.")
  parser.add_argument("--probe_steps", type=int, default=3000)
  parser.add_argument("--train_scenes", type=int, default=20000)
  parser.add_argument("--test_scenes", type=int, default=500)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--save_encoder", default="",
                      help="Save the supervised ViT as a checkpoint that init.vit_from can start a run from.")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="Change the config, e.g. --set=model.vit.patch_size=4 (repeatable).")
  parser.add_argument("--attributes", action="store_true",
                      help="Also measure the object's colour and shape: supervised and by probes.")
  parser.add_argument("--ask", type=int, default=0,
                      help="With --checkpoint: ask its model this many colour and shape questions per case.")
  args = parser.parse_args(argv)
  config = configs.load_experiment(args.config)
  for change in args.set:
    field, _, value = change.partition("=")
    configs.set_field(config, field, literal(value))
  tile = config.model.vit.image_size
  train = one_object_scenes(args.train_scenes, tile, seed=1)
  test = one_object_scenes(args.test_scenes, tile, seed=2)
  kw = dict(lr=args.lr, batch=args.batch)
  result = dict(config=args.config, tile=tile, tokens_per_tile=config.model.connector.tokens_per_tile,
                test_scenes=args.test_scenes)
  if args.steps:
    model = EncoderWithHead(config.model, seed=0)
    fit(model, train["tiles"], train["boxes"], steps=args.steps, **kw)
    result["supervised_hit_rate"] = hit_rate(predict(nnx.jit(lambda x: model(x)), test["tiles"]), test["boxes"])
    result["supervised_steps"] = args.steps
    if args.save_encoder:
      from mm15_jax.convert.importer import save_part
      _, vit_params = nnx.split(model.vit, nnx.Param)
      save_part(args.save_encoder, "vit", nnx.to_pure_dict(vit_params))
      result["saved_encoder"] = args.save_encoder
    if args.attributes:
      model = EncoderWithHead(config.model, seed=0, head="attributes")
      fit(model, train["tiles"], labels(train), steps=args.steps, loss=attribute_loss, **kw)
      result["supervised_attributes"] = attribute_accuracy(predict(nnx.jit(lambda x: model(x)), test["tiles"]),
                                                           labels(test))
  encoders, trained = {"random_init": None}, None
  if args.checkpoint:
    from mm15_jax.inference import load_model  # the run's params, as inference loads them

    trained = load_model(config, args.checkpoint)  # loaded once: probed, then asked
    encoders["checkpoint"] = jax.device_get(trained.params)
    result["checkpoint"] = args.checkpoint
  for name, params in encoders.items():
    feats = frozen_tokens(config.model, params, train["tiles"], test["tiles"])
    result[f"probe_{name}_hit_rate"] = probe(feats, train["boxes"], test["boxes"], head="box",
                                             steps=args.probe_steps, **kw)
    if args.attributes:
      result[f"probe_{name}_attributes"] = probe(feats, labels(train), labels(test), head="attributes",
                                                 steps=args.probe_steps, **kw)
  if trained is not None and args.ask:
    result["asked"] = ask_attributes(trained, args.ask, seed=config.seed)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
