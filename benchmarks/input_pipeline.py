"""Input pipeline throughput per host core: 378 px tiles, AnyRes, the built-in SFT mixture.

  python benchmarks/input_pipeline.py                   # AnyRes (4, 9), images 192..768 px
  python benchmarks/input_pipeline.py --anyres=1,4 --image_scale=6

Config: base() with 378 px tiles, 144 tokens per tile, seq_len 4096, max_tiles 10 and the
built-in tokenizer (vocab 512); built-in images are (24..96) * image_scale px per side.
Stages, each timed on its own after a warm-up:
  generate  the built-in sources' records (drawing the scenes; a file source reads bytes instead)
  build     ToExample on those records: AnyRes planning + tiling + sequence building
  decode    ToExample on the same records serialised (records.encode, PNG): what an
            ArrayRecord source costs: PNG decode + AnyRes + sequence building
  pipeline  make_train_dataset (mix -> map -> [mp_prefetch] -> pack -> normalise -> batch)
            with data.num_workers = each of --workers; records/s counts the examples packed
            into the rows plus the skipped ones, tiles/s the used image tiles.
  pack      pack + row map (CLIP normalisation to float32) + batch alone, fed built Examples:
            the part that runs in the main process whatever data.num_workers is.
Per-core figures are per CPU-second of the whole process tree (main process, its threads
(grain's read threads prefetch the map stage even with 0 workers) and the workers), so
they hold on a shared machine; *_per_s are wall-clock rates on this machine.

The accelerator side: benchmarks/RESULTS.md mm15_1b (ViT-H/14 378 px + 1B decoder, H200)
runs a step of 4 x 4096 tokens with 4 tiles per row in --step_s=0.485 s: 16 tiles and 4 rows
per step per chip. Cores per chip = (tiles the chip consumes per second) / (tiles per CPU-second).
Prints one JSON line.
"""

import argparse
import json
import os
import time

import grain
import numpy as np
import psutil
from absl import flags

from data_pipelines import mixture, packing, pipeline, records
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.sequence import ExampleBuilder
from mm15_jax import configs


def make_config(image_scale: float, n_min: int, n_max: int, batch: int, workers: int = 0):
  c = configs.base()
  c.model.vit.image_size = 378
  c.model.connector.tokens_per_tile = 144
  c.data.seq_len = 4096
  c.data.max_tiles = 10
  c.data.anyres.n_min, c.data.anyres.n_max = n_min, n_max
  c.data.image_scale = image_scale
  c.data.num_workers = workers
  c.train.batch_size = batch
  return c


def _rate(n: int, seconds: float) -> float:
  return round(n / seconds, 2)


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and all its live descendants (grain workers)."""
  total = 0.0
  me = psutil.Process()
  for proc in [me] + me.children(recursive=True):
    try:
      t = proc.cpu_times()
      total += t.user + t.system
    except psutil.NoSuchProcess:
      pass
  return total


class Clock:
  """Wall and CPU (process tree) seconds since start."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), cpu_seconds()

  def stop(self) -> tuple[float, float]:
    return time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def _stage(n: int, tiles: int, clock: Clock, name: str) -> dict:
  wall, cpu = clock.stop()
  return {f"{name}_records_per_s": _rate(n, wall), f"{name}_records_per_cpu_s": _rate(n, cpu),
          f"{name}_tiles_per_s": _rate(tiles, wall), f"{name}_tiles_per_cpu_s": _rate(tiles, cpu)}


def time_stages(config, tokenizer, num: int) -> tuple[dict, list]:
  """generate / build / decode, one after the other in this thread; returns the built examples too."""
  ds = mixture.mixed_records(config, "train")
  [ds[i] for i in range(5)]  # warm-up (fonts, caches)
  clock = Clock()
  recs = [ds[i] for i in range(5, 5 + num)]
  out = _stage(num, 0, clock, "generate")
  to_example = mixture.ToExample(ExampleBuilder.from_config(config, tokenizer))
  [to_example(r) for r in recs[:5]]
  clock = Clock()
  examples = [to_example(r) for r in recs]
  kept = [e for e in examples if e is not None and not int(e["skipped"])]
  tiles = sum(len(e["tiles"]) for e in kept)
  out.update(_stage(num, tiles, clock, "build"))
  encoded = [records.encode(r) for r in recs]
  clock = Clock()
  for item in encoded:
    to_example(item)
  out.update(_stage(num, tiles, clock, "decode_build"))
  out = dict(records=num, dropped_overlong=sum(e is None for e in examples), tiles_per_record=round(tiles / num, 2),
             mean_image_hw=_mean_image_hw(recs), mean_png_kb=round(sum(len(b) for b in encoded) / num / 1024, 1),
             **{k: v for k, v in out.items() if not k.startswith("generate_tiles")})
  return out, kept


def _mean_image_hw(recs) -> list[float]:
  sizes = np.array([im.shape[:2] for r in recs for im in r["images"]], np.float64)
  return [round(float(v), 1) for v in sizes.mean(0)] if len(sizes) else [0.0, 0.0]


def _count(batch, k: int) -> tuple[int, int, int]:
  """(records, tiles, rows) in a batch: segments plus skipped records; used image tiles."""
  recs = int(batch["segment_ids"].max(axis=1).sum()) + int(batch["num_skipped"].sum())
  return recs, int((batch["image_token_positions"] >= 0).sum()) // k, len(batch["tokens"])


def _timed(it, warmup: int, batches: int, k: int, name: str) -> dict:
  for _ in range(warmup):
    next(it)
  recs = tiles = rows = 0
  clock = Clock()
  for _ in range(batches):
    r, t, n = _count(next(it), k)
    recs, tiles, rows = recs + r, tiles + t, rows + n
  wall, cpu = clock.stop()
  return dict(name=name, batches=batches, records_per_row=round(recs / rows, 2), tiles_per_row=round(tiles / rows, 2),
              wall_s=round(wall, 2), cpu_s=round(cpu, 2), cores_busy=round(cpu / wall, 2),
              records_per_s=_rate(recs, wall), tiles_per_s=_rate(tiles, wall), rows_per_s=_rate(rows, wall),
              records_per_cpu_s=_rate(recs, cpu), tiles_per_cpu_s=_rate(tiles, cpu), rows_per_cpu_s=_rate(rows, cpu))


def time_packing(config, examples: list, warmup: int, batches: int) -> dict:
  """The main-process stages alone: pack + row map (CLIP normalisation) + batch, fed built Examples."""
  ds = grain.MapDataset.source(examples).repeat().to_iter_dataset(grain.ReadOptions(num_threads=0))
  it = iter(packing.pack_examples(ds, config).batch(config.train.batch_size, drop_remainder=True))
  return _timed(it, warmup, batches, config.model.connector.tokens_per_tile, "pack_normalise_batch")


def time_pipeline(config, tokenizer, warmup: int, batches: int) -> dict:
  clock = Clock()
  it = iter(pipeline.make_train_dataset(config, tokenizer))
  next(it)  # worker start-up (spawned processes import the code) and the first fills
  startup_s = round(clock.stop()[0], 1)
  name = f"pipeline_workers{config.data.num_workers}"
  out = _timed(it, warmup, batches, config.model.connector.tokens_per_tile, name)
  del it  # stops the workers
  return dict(workers=config.data.num_workers, startup_s=startup_s, **out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--image_scale", type=float, default=8.0, help="built-in image sides (24..96) * this")
  parser.add_argument("--anyres", default="4,9", help="n_min,n_max")
  parser.add_argument("--records", type=int, default=100, help="records for the single-process stages")
  parser.add_argument("--batch", type=int, default=4, help="rows per batch")
  parser.add_argument("--warmup", type=int, default=6, help="batches before timing the pipeline")
  parser.add_argument("--batches", type=int, default=16, help="batches timed per pipeline run")
  parser.add_argument("--workers", default="0,2", help="data.num_workers values to run")
  parser.add_argument("--step_s", type=float, default=0.485, help="accelerator step time (RESULTS.md mm15_1b)")
  parser.add_argument("--step_rows", type=int, default=4, help="rows per accelerator step")
  parser.add_argument("--step_tiles", type=int, default=16, help="tiles per accelerator step")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags

  n_min, n_max = (int(v) for v in args.anyres.split(","))
  config = make_config(args.image_scale, n_min, n_max, args.batch)
  tokenizer = tokenizer_lib.tokenizer_for_config(config)
  single, examples = time_stages(config, tokenizer, args.records)
  out = dict(tile=378, tokens_per_tile=144, seq_len=4096, max_tiles=10, anyres=[n_min, n_max],
             image_scale=args.image_scale, batch=args.batch, cpu_count=os.cpu_count(), single_process=single)
  out["pack_normalise_batch"] = time_packing(config, examples, args.warmup, args.batches)
  del examples
  out["pipeline"] = [time_pipeline(make_config(args.image_scale, n_min, n_max, args.batch, int(w)), tokenizer,
                                   args.warmup, args.batches) for w in args.workers.split(",")]

  # What one chip consumes, and the host cores (CPU-seconds per second) each stage needs for it.
  tiles_per_s = args.step_tiles / args.step_s
  need = dict(step_s=args.step_s, chip_tiles_per_s=round(tiles_per_s, 1),
              chip_rows_per_s=round(args.step_rows / args.step_s, 2))
  for name, rate in (("build", single["build_tiles_per_cpu_s"]),
                     ("decode_build", single["decode_build_tiles_per_cpu_s"]),
                     ("pack_normalise_batch", out["pack_normalise_batch"]["tiles_per_cpu_s"]),
                     *((p["name"], p["tiles_per_cpu_s"]) for p in out["pipeline"])):
    need[f"cores_per_chip_{name}"] = round(tiles_per_s / rate, 2)
  out["accelerator"] = need
  print(json.dumps(out))


if __name__ == "__main__":  # grain's worker processes are spawned: they import this module
  main()
