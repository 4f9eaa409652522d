r"""JSONL + image files, Parquet or WebDataset shards -> sharded ArrayRecord, the format read at scale.

  python -m data_pipelines.convert --jsonl=data/sft.jsonl --image_root=data/images \
      --out=data/ar/sft --shards=8
  python -m data_pipelines.convert --parquet='/data/obelics/*.parquet' --out=data/ar/obelics --shards=64
  python -m data_pipelines.convert --webdataset='/data/llava-{000000..000099}.tar' --out=data/ar/llava
  python -m data_pipelines.convert --jsonl=data/clips.jsonl --frames=24 --out=data/ar/video   # MM1.5-Video

writes data/ar/sft-00000-of-00008.array_record ... and data/ar/sft.index.json (shard
names, records per shard and per kind, skip counts); `sources.ArrayRecordSource(
"data/ar/sft")` reads them back. Images are embedded as their file bytes (no re-encode).
Input items (JSONL lines, Parquet rows, WebDataset samples) are split over shards in
contiguous blocks, so reading the shards in order gives the good items in input order. Bad
items (bad JSON, malformed, missing or, with --check_images, undecodable images, URL images)
are skipped and counted, never a crash. Shards are written under temporary names and renamed
once all are complete; the index is renamed last, so its presence means the conversion
finished. Parquet options (--image_root, --layout, --fields) are ParquetSource's. JSONL video
lines (sources.JsonlSource) are sampled to --frames frames here, stored as the images of a
multi_image record, so the ArrayRecord holds exactly the frames training and inference see.
"""
import collections
import json
import multiprocessing
import os
import sys
from concurrent import futures

from absl import app, flags
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import records, sources
from data_pipelines.progress import Progress

# group_size:1 makes every record its own chunk: fast random access, which grain needs.
WRITER_OPTIONS = "group_size:1"
MAX_EXAMPLES = 20  # skip reasons kept verbatim in the summary


def open_input(jsonl: str | None = None, *, parquet=None, webdataset=None, image_root: str | None = None,
               fields: dict | None = None, layout: str | None = None,
               frames: int | None = None) -> tuple[str, str | list, object]:
  """Exactly one input -> (format, description, source of serialised records)."""
  given = [name for name, value in (("jsonl", jsonl), ("parquet", parquet), ("webdataset", webdataset)) if value]
  if len(given) != 1:
    raise ValueError(f"give exactly one input of --jsonl, --parquet, --webdataset; got {given or 'none'}")
  if jsonl:
    return "jsonl", os.path.abspath(jsonl), sources.JsonlSource(jsonl, image_root, frames=frames)
  patterns = parquet or webdataset
  patterns = [os.fspath(patterns)] if isinstance(patterns, (str, os.PathLike)) else [os.fspath(p) for p in patterns]
  description = patterns[0] if len(patterns) == 1 else patterns
  if parquet:
    return "parquet", description, sources.ParquetSource(patterns, image_root=image_root, fields=fields,
                                                         layout=layout)
  return "webdataset", description, sources.WebDatasetSource(patterns, fields=fields)


def _shard_range(shard: int, shards: int, n: int) -> range:
  """The input items of one shard: contiguous blocks in file order (item i goes to i * shards // n)."""
  return range(-(-shard * n // shards), -(-(shard + 1) * n // shards))


def _write_shards(source, shard_ids, shards: int, temps: list[str], check_images: bool, progress=None) -> dict:
  """Writes the given shards' temporary files; -> their counts (in shard order). Runs in a worker
  process with --num_workers (the source is picklable and reopens its files there)."""
  n = len(source)
  out = {"per_shard": {}, "kinds": collections.Counter(), "skipped": collections.Counter(), "examples": []}
  for shard in shard_ids:
    writer, kept = ArrayRecordWriter(temps[shard], WRITER_OPTIONS), 0
    try:
      for index in _shard_range(shard, shards, n):
        data = source[index]
        record, reason = records.decode_or_skip(data, decode_images=check_images)
        if progress is not None:
          progress.update()
        if reason is not None:
          out["skipped"][reason.split(":", 1)[0]] += 1
          if len(out["examples"]) < MAX_EXAMPLES:
            out["examples"].append(reason)
          continue
        writer.write(data)
        kept += 1
        out["kinds"][record["kind"]] += 1
    finally:
      writer.close()
    out["per_shard"][shard] = kept
  return out


_worker_source = None  # in each --num_workers process: the input, unpickled once per process


def _set_worker_source(source) -> None:
  global _worker_source
  _worker_source = source


def _write_shard_in_worker(shard, shards, temps, check_images):
  return _write_shards(_worker_source, [shard], shards, temps, check_images)


def convert(jsonl: str | None, out: str, *, shards: int = 1, image_root: str | None = None,
            check_images: bool = True, parquet=None, webdataset=None, fields: dict | None = None,
            layout: str | None = None, frames: int | None = None, num_workers: int = 0,
            progress: bool = True) -> dict:
  """Writes the shards and the index; returns the summary (also the index's contents).

  The input is `jsonl`, or (jsonl=None) `parquet` / `webdataset`: a glob, brace pattern or list.
  frames: JSONL video lines' frames to sample (default video_frames.DEFAULT_FRAMES, 24).
  num_workers: processes converting shards in parallel (0: this process); the output is the
  same byte for byte, so use up to `shards` workers. progress: a bar or log lines with the ETA.
  """
  if shards < 1:
    raise ValueError(f"--shards={shards} must be >= 1")
  if num_workers < 0:
    raise ValueError(f"--num_workers={num_workers} must be >= 0 (0: convert in this process)")
  input_format, description, source = open_input(jsonl, parquet=parquet, webdataset=webdataset,
                                                 image_root=image_root, fields=fields, layout=layout,
                                                 frames=frames)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  finals = [sources.shard_name(out, s, shards) for s in range(shards)]
  temps = [f"{path}.tmp-{os.getpid()}" for path in finals]
  n = len(source)
  bar = Progress(n, "convert", enabled=progress)
  try:
    if num_workers:
      # spawn: a fresh interpreter per worker (fork would copy open files and threads).
      context = multiprocessing.get_context("spawn")
      # The source (a JSONL source holds every line's offset) goes to each worker once, not per shard.
      pool = futures.ProcessPoolExecutor(min(num_workers, shards), mp_context=context,
                                         initializer=_set_worker_source, initargs=(source,))
      try:
        jobs = {pool.submit(_write_shard_in_worker, shard, shards, temps, check_images): shard
                for shard in range(shards)}
        for job in futures.as_completed(jobs):
          job.result()  # a failed shard raises here
          bar.update(len(_shard_range(jobs[job], shards, n)))
        parts = [job.result() for job in jobs]  # shard order (dicts keep it): the same summary as one process
      finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a failed shard stops the rest
    else:
      parts = [_write_shards(source, range(shards), shards, temps, check_images, bar)]
    bar.close()
    per_shard = [next(p["per_shard"][s] for p in parts if s in p["per_shard"]) for s in range(shards)]
    kinds, skipped, examples = collections.Counter(), collections.Counter(), []
    for part in parts:
      kinds.update(part["kinds"])
      skipped.update(part["skipped"])
      examples += part["examples"]
    examples = examples[:MAX_EXAMPLES]
    if not sum(per_shard):  # nothing to train on: an error, and no shards left behind
      raise ValueError(f"{description}: none of its {n} items is a usable record (skipped by reason: "
                       f"{dict(skipped)}); first: {examples[:3]}")
    for temp, final in zip(temps, finals):
      os.replace(temp, final)
  finally:
    for temp in temps:
      if os.path.exists(temp):
        os.remove(temp)
  summary = dict(
      format=input_format, source=description, items=n, records=sum(per_shard),
      skipped=sum(skipped.values()),
      skipped_by_reason=dict(skipped), skipped_examples=examples, kinds=dict(sorted(kinds.items())),
      shards=[os.path.basename(path) for path in finals], records_per_shard=per_shard)
  index_path = out + sources.INDEX_SUFFIX
  with open(f"{index_path}.tmp-{os.getpid()}", "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(f"{index_path}.tmp-{os.getpid()}", index_path)
  return summary


def parse_fields(text: str) -> dict:
  """"texts=text_list,image=" -> {"texts": "text_list", "image": None} (empty: no such column)."""
  fields = {}
  for item in filter(None, text.split(",")):
    key, equals, value = item.partition("=")
    if not equals:
      raise app.UsageError(f"--fields item {item!r}: expected key=column, e.g. --fields=texts=text_list,images=imgs")
    fields[key.strip()] = value.strip() or None
  return fields


def define_flags() -> None:
  # Defined only when run as a program, so importing convert() never clashes with other CLIs' flags.
  flags.DEFINE_string("jsonl", None, "Input JSONL, one record per line (see sources.JsonlSource).")
  # multi: an unquoted brace pattern is expanded by the shell into one flag per shard.
  flags.DEFINE_multi_string("parquet", None, "Input Parquet shards: glob or brace pattern (see ParquetSource).")
  flags.DEFINE_multi_string("webdataset", None, "Input WebDataset tar shards: brace pattern like "
                            "'x-{000..099}.tar' or glob (see WebDatasetSource).")
  flags.DEFINE_string("image_root", None, "Folder image paths are relative to (default: the JSONL's / shard's).")
  flags.DEFINE_string("layout", None, "Parquet layout: interleaved | conversations (default: from the columns).")
  flags.DEFINE_string("fields", "", "Column (Parquet) or JSON key (WebDataset) names, as key=name,... "
                      "e.g. texts=text_list,images=imgs; key= marks an absent column.")
  flags.DEFINE_string("out", None, "Output prefix DIR/name; shards are DIR/name-SSSSS-of-NNNNN.array_record.")
  flags.DEFINE_integer("shards", 1, "Number of ArrayRecord shards.")
  flags.DEFINE_integer("num_workers", 0, "Processes converting shards in parallel (0: this one); the output is "
                       "identical. Up to --shards are used.")
  flags.DEFINE_bool("check_images", True, "Decode every image and skip items whose images fail.")
  flags.DEFINE_integer("frames", None, "Frames sampled per JSONL video line (default 24, MM1.5-Video; "
                       "use the experiment's config.video.frames).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]} (quote glob and brace patterns)")
  args = flags.FLAGS
  if not (args.jsonl or args.parquet or args.webdataset) or not args.out:
    raise app.UsageError("--out and one of --jsonl, --parquet, --webdataset are required")
  summary = convert(args.jsonl, args.out, parquet=args.parquet, webdataset=args.webdataset, shards=args.shards,
                    image_root=args.image_root, check_images=args.check_images, fields=parse_fields(args.fields),
                    layout=args.layout, frames=args.frames, num_workers=args.num_workers)
  json.dump(summary, sys.stdout, indent=1)
  print()


if __name__ == "__main__":  # `mm15-convert-data` goes through mm15_jax.cli instead, for its --help
  define_flags()
  app.run(main)
