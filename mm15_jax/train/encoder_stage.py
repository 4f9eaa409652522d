"""`train.objective="object_boxes"`: a stage that pretrains the image encoder alone.

MM1.5 starts from a pretrained CLIP encoder; a from-scratch tiny model trained only through
its decoder learns tokens that hold little of what is where (benchmarks/RESULTS.md, "Why the
tiny model does not ground"). This stage gives the tiny experiments an encoder to start from:
the config's ViT and connector, with a small head on each of the tile's tokens, learn from
labelled built-in tiles (data_pipelines/builtin/object_boxes.py) which colour of object is
centred in each token's cell and that object's box. The head is dropped; the checkpoint
holds params {"vit", "connector"}, which the next stage loads with `init.vit_from` and
`init.connector_from` (mm15_jax.tools.recipe sets both after such a stage). docs/recipe.md,
"A pretrained encoder for the tiny model".

Data parallel over every device of every process (the same batches whatever their number); the
checkpoint is written once, at the last step: an interrupted stage starts again (it is minutes
long), and a finished one is what `stage_progress` and the recipe see.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines.builtin import object_boxes
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import run_record
from mm15_jax.evaluation import metrics as metrics_lib
from mm15_jax.models import build
from mm15_jax.models.mm15 import normalize_pixels
from mm15_jax.train.metrics import MetricsWriter
from mm15_jax.train.optimizer import learning_rate_schedule

NUM_COLORS = len(object_boxes.COLOR_NAMES)
HELD_OUT = 512  # tiles, drawn from their own seed: the same on every process and every run
TRAIN_TILES = 24_576  # drawn once (~10 s); batches sample them with replacement


class ObjectBoxHead(nnx.Module):
  """Each token on its own (one GELU MLP shared by all) -> per colour: a logit that an object
  of that colour is centred in the token's cell, and that object's box (+0.4: near the mean
  box at the start). Read per token, as the decoder reads tokens: the colour a phrase names
  selects the token that holds it, whose features then hold its box."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, 256, rngs=rngs)
    self.fc2 = nnx.Linear(256, NUM_COLORS * 5, rngs=rngs)

  def __call__(self, tokens):
    out = self.fc2(jax.nn.gelu(self.fc1(tokens))).reshape(*tokens.shape[:2], NUM_COLORS, 5)
    return out[..., 0], out[..., 1:] + 0.4  # [n, tokens, colours], [n, tokens, colours, 4]


class EncoderWithBoxHead(nnx.Module):
  """The model's ViT and connector (initialised as the full model's are) and the box head."""

  def __init__(self, model_config, seed: int):
    model = build.build_model(model_config, seed)
    self.vit, self.connector, self.pixel_stats = model.vit, model.connector, model.pixel_stats
    self.head = ObjectBoxHead(model_config.llm.d_model, rngs=nnx.Rngs(seed + 1))

  def __call__(self, tiles):
    return self.head(self.connector(self.vit(normalize_pixels(tiles, *self.pixel_stats))))


def cell_of_centre(boxes, side: int):
  """The token cell (row-major over the connector's side x side grid of the tile) that holds
  each box's centre: [..., 4] tile units -> int [...]."""
  cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
  col = jnp.clip(jnp.floor(cx * side), 0, side - 1)
  row = jnp.clip(jnp.floor(cy * side), 0, side - 1)
  return (row * side + col).astype(jnp.int32)


def object_box_loss(model, tiles, present, boxes):
  """Per token and colour: sigmoid cross-entropy on "an object of this colour is centred
  here"; L1 on the box at the token that holds each drawn object's centre."""
  logits, pred = model(tiles)
  side = round(logits.shape[1] ** 0.5)
  # [n, colours, tokens]: 1 at the drawn object's cell.
  here = jax.nn.one_hot(cell_of_centre(boxes, side), logits.shape[1]) * present[..., None]
  here = jnp.swapaxes(here, 1, 2)  # [n, tokens, colours]
  presence = optax.sigmoid_binary_cross_entropy(logits, here).mean()
  box = (jnp.abs(pred - boxes[:, None]).mean(-1) * here).sum() / jnp.maximum(here.sum(), 1.0)
  return presence + box, dict(presence_loss=presence, box_loss=box)


def read_boxes(logits: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per colour, the most confident token's logit and box: [n, colours], [n, colours, 4]."""
  best = logits.argmax(1)  # [n, colours]
  n, c = np.indices(best.shape)
  return logits[n, best, c], pred[n, best, c]


def score(logits: np.ndarray, pred: np.ndarray, present: np.ndarray, boxes: np.ndarray) -> dict:
  """box_hit_rate: the drawn objects whose colour's box (from its most confident token) is
  found at IoU >= 0.5 (the grounding metric); presence_accuracy: colours rightly said drawn
  or not (some token's logit > 0)."""
  confidence, found = read_boxes(logits, pred)
  hits = [metrics_lib.grounding_hit(found[i, c], boxes[i, c]) for i, c in zip(*np.nonzero(present))]
  return dict(box_hit_rate=float(np.mean(hits)), presence_accuracy=float(np.mean((confidence > 0) == (present > 0))))


def check_encoder_config(config) -> None:
  """What this stage cannot run with, said before anything compiles."""
  n = jax.process_count() * jax.local_device_count()
  t = config.train
  errors = []
  if t.batch_size % n:
    errors.append(f"config.train.batch_size={t.batch_size} must divide over the {n} devices "
                  f"(data parallel); e.g. --config.train.batch_size={max(n, t.batch_size // n * n)}")
  for field in ("from_checkpoint", "llm_from", "vit_from", "connector_from", "upcycle_from"):
    if config.init[field]:
      errors.append(f"config.init.{field}={config.init[field]!r}: an object_boxes stage starts its "
                    "encoder from scratch; leave config.init empty")
  if errors:
    raise ValueError("train.objective='object_boxes':\n  " + "\n  ".join(errors))


def train_encoder(config, workdir: str, *, progress: bool = True) -> dict:
  """Trains the encoder `config.train.steps` steps and saves {"vit", "connector"} at the last;
  a workdir already holding that step is left as it is. Returns the held-out scores."""
  config = config.copy_and_resolve_references()
  check_encoder_config(config)
  t = config.train
  directory = ckpt_lib.workdir_checkpoints(workdir)
  if ckpt_lib.path_exists(directory) and (ckpt_lib.latest_step(directory) or 0) >= t.steps:
    print(f"mm15_jax: {workdir} already holds the encoder at step {t.steps}", flush=True)
    return {}
  # Process by process, so that process p's devices hold rows [p * local, (p + 1) * local).
  mesh = Mesh(np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))), ("data",))
  launch = run_record.write_run_files(config, workdir, mesh)
  tile = config.model.vit.image_size

  model = EncoderWithBoxHead(config.model, config.seed)
  schedule = learning_rate_schedule(t)
  clip = optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity()
  optimizer = nnx.Optimizer(model, optax.chain(clip,
                                               optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps,
                                                           weight_decay=t.weight_decay)), wrt=nnx.Param)
  replicated, by_example = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = nnx.state((model, optimizer))
  nnx.update((model, optimizer), jax.device_put(state, replicated))

  @nnx.jit
  def train_step(model, optimizer, tiles, present, boxes):
    (loss, parts), grads = nnx.value_and_grad(object_box_loss, has_aux=True)(model, tiles, present, boxes)
    optimizer.update(model, grads)
    return dict(loss=loss, grad_norm=optax.tree.norm(grads), **parts)

  predict = nnx.jit(lambda model, tiles: model(tiles))
  held_out = object_boxes.labelled_tiles(np.random.default_rng([config.seed, 1]), HELD_OUT, tile)

  def evaluate() -> dict:
    logits, pred = jax.device_get(predict(model, jax.device_put(held_out["tiles"], replicated)))
    return score(np.asarray(logits), np.asarray(pred), held_out["present"], held_out["boxes"])

  # The training tiles are drawn once (drawing them every step would take longer than the step:
  # ~0.4 ms a tile in Python), the same on every process; every process draws the same global
  # batch indices and takes its devices' rows: the batches do not depend on the process count.
  pool = object_boxes.labelled_tiles(np.random.default_rng([config.seed, 2]), TRAIN_TILES, tile)
  order = np.random.default_rng([config.seed, 3])
  local = t.batch_size // jax.process_count()
  mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  writer = MetricsWriter(workdir, t.steps, 0, progress=progress, config=config, run_record=launch)
  writer.message(f"mm15_jax: encoder stage (object_boxes) on {tile}-px tiles, batch {t.batch_size}, "
                 f"{t.steps} steps, mesh {dict(mesh.shape)}")
  result, start = {}, time.perf_counter()
  try:
    for step in range(1, t.steps + 1):
      pick = order.integers(0, TRAIN_TILES, t.batch_size)[mine]
      batch = {k: v[pick] for k, v in pool.items()}
      arrays = [jax.make_array_from_process_local_data(by_example, batch[k]) for k in ("tiles", "present", "boxes")]
      out = train_step(model, optimizer, *arrays)
      writer.advance()
      if step % config.log_every == 0 or step == t.steps:
        row = {k: float(v) for k, v in jax.device_get(out).items()}
        row.update(lr=float(schedule(step - 1)), step_seconds=(time.perf_counter() - start) / step)
        writer.write(step, row)
      if (config.eval.every and step % config.eval.every == 0) or step == t.steps:
        result = evaluate()
        writer.write(step, result, kind="eval")
        writer.message(f"step {step} held-out: boxes found {100 * result['box_hit_rate']:.1f}%, "
                       f"colours present {100 * result['presence_accuracy']:.1f}%")
    params = {part: nnx.to_pure_dict(nnx.state(getattr(model, part), nnx.Param)) for part in ("vit", "connector")}
    ckpt_lib.save_params(directory, t.steps, params)
    writer.message(f"encoder saved: {directory}/{t.steps} (vit, connector); start the next stage with "
                   f"--config.init.vit_from={workdir} --config.init.connector_from={workdir}")
  finally:
    writer.close()
  return result
