"""Can the image encoder localise? One-object scenes, boxes read off the connector's tokens.

  python benchmarks/grounding_probe.py --config=experiments/tiny_spatial.py:spatial
  python benchmarks/grounding_probe.py --config=experiments/tiny_spatial.py:spatial --checkpoint=W/spatial

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
"""

import argparse
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


def one_object_tiles(num: int, tile: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 tiles [num, tile, tile, 3] and float boxes [num, 4] (x1, y1, x2, y2 in tile units)."""
  rng = np.random.default_rng(seed)
  tiles, boxes = [], []
  for _ in range(num):
    h, w = scenes.image_hw(rng, 1.0)
    image, _, objects = scenes.draw_scene(rng, h, w, 1)
    layout = anyres.plan(h, w, tile=tile, n_min=1, n_max=1, split=False)
    tiles.append(anyres.render_tiles(image, layout)[0])
    (rh, rw), (x1, y1, x2, y2) = layout.resized_hw, objects[0].box
    boxes.append([x1 * rw / (w * tile), y1 * rh / (h * tile), x2 * rw / (w * tile), y2 * rh / (h * tile)])
  return np.stack(tiles), np.asarray(boxes, np.float32)


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


class EncoderWithHead(nnx.Module):
  def __init__(self, model_config, seed: int):
    model = build.build_model(model_config, seed)
    self.vit, self.connector, self.pixel_stats = model.vit, model.connector, model.pixel_stats
    k, d = model_config.connector.tokens_per_tile, model_config.llm.d_model
    self.head = BoxHead(k * d, rngs=nnx.Rngs(seed + 1))

  def tokens(self, tiles):
    return self.connector(self.vit(normalize_pixels(tiles, *self.pixel_stats)))

  def __call__(self, tiles):
    return self.head(self.tokens(tiles))


def fit(model, inputs, boxes, *, steps: int, lr: float, batch: int):
  """Adam on the L1 box error of every param of `model`."""
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.abs(m(x) - y).mean())(model)
    opt.update(model, grads)
    return loss

  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(inputs), batch)
    step(model, opt, jnp.asarray(inputs[idx]), jnp.asarray(boxes[idx]))


def predict(fn, inputs, chunk: int = 256) -> np.ndarray:
  return np.concatenate([np.asarray(fn(jnp.asarray(inputs[i:i + chunk]))) for i in range(0, len(inputs), chunk)])


def probe(model_config, params, train, test, *, steps: int, lr: float, batch: int) -> float:
  """Hit rate of a BoxHead trained on the frozen tokens of an encoder with `params` (None: init)."""
  model = EncoderWithHead(model_config, seed=0)
  for part in ("vit", "connector") if params is not None else ():
    _, state = nnx.split(getattr(model, part), nnx.Param)
    nnx.replace_by_pure_dict(state, params[part])
    nnx.update(getattr(model, part), state)
  tokens = nnx.jit(lambda m, x: m.tokens(x))
  feats = [predict(lambda x: tokens(model, x), tiles) for tiles, _ in (train, test)]
  mean, std = feats[0].mean(0), feats[0].std(0) + 1e-6  # standardised: trained tokens are larger
  feats = [(f - mean) / std for f in feats]
  head = BoxHead(feats[0][0].size, rngs=nnx.Rngs(1))
  fit(head, feats[0], train[1], steps=steps, lr=lr, batch=batch)
  return hit_rate(predict(nnx.jit(lambda x: head(x)), feats[1]), test[1])


def checkpoint_params(config, checkpoint: str) -> dict:
  from mm15_jax.inference import load_model  # the run's params, as inference loads them
  return jax.device_get(load_model(config, checkpoint).params)


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
  args = parser.parse_args(argv)
  config = configs.load_experiment(args.config)
  tile = config.model.vit.image_size
  train = one_object_tiles(args.train_scenes, tile, seed=1)
  test = one_object_tiles(args.test_scenes, tile, seed=2)
  kw = dict(lr=args.lr, batch=args.batch)
  result = dict(config=args.config, tile=tile, tokens_per_tile=config.model.connector.tokens_per_tile,
                test_scenes=args.test_scenes)
  if args.steps:
    model = EncoderWithHead(config.model, seed=0)
    fit(model, *train, steps=args.steps, **kw)
    result["supervised_hit_rate"] = hit_rate(predict(nnx.jit(lambda x: model(x)), test[0]), test[1])
    result["supervised_steps"] = args.steps
    if args.save_encoder:
      from mm15_jax.convert.importer import save_part
      _, vit_params = nnx.split(model.vit, nnx.Param)
      save_part(args.save_encoder, "vit", nnx.to_pure_dict(vit_params))
      result["saved_encoder"] = args.save_encoder
  result["probe_random_init_hit_rate"] = probe(config.model, None, train, test, steps=args.probe_steps, **kw)
  if args.checkpoint:
    params = checkpoint_params(config, args.checkpoint)
    result["probe_checkpoint_hit_rate"] = probe(config.model, params, train, test, steps=args.probe_steps, **kw)
    result["checkpoint"] = args.checkpoint
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
