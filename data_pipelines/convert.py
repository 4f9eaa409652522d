r"""JSONL + image files -> sharded ArrayRecord, the format read at scale.

  python -m data_pipelines.convert --jsonl=data/sft.jsonl --image_root=data/images \
      --out=data/ar/sft --shards=8

writes data/ar/sft-00000-of-00008.array_record ... and data/ar/sft.index.json (shard
names, records per shard and per kind, skip counts); `sources.ArrayRecordSource(
"data/ar/sft")` reads them back. Images are embedded as their file bytes (no re-encode).
Lines are split over shards in contiguous blocks, so reading the shards in order gives the
good lines in file order. Bad lines (bad JSON, malformed, missing or, with --check_images,
undecodable images) are skipped and counted, never a crash. Shards are written under
temporary names and renamed once all are complete; the index is renamed last, so its
presence means the conversion finished.
"""

import collections
import json
import os
import sys

from absl import app, flags
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import records, sources

# group_size:1 makes every record its own chunk: fast random access, which grain needs.
WRITER_OPTIONS = "group_size:1"
MAX_EXAMPLES = 20  # skip reasons kept verbatim in the summary


def convert(jsonl: str, out: str, *, shards: int = 1, image_root: str | None = None,
            check_images: bool = True) -> dict:
  """Writes the shards and the index; returns the summary (also the index's contents)."""
  if shards < 1:
    raise ValueError(f"--shards={shards} must be >= 1")
  source = sources.JsonlSource(jsonl, image_root)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  finals = [sources.shard_name(out, s, shards) for s in range(shards)]
  temps = [f"{path}.tmp-{os.getpid()}" for path in finals]
  per_shard, kinds = [0] * shards, collections.Counter()
  skipped, examples = collections.Counter(), []
  writers = []
  try:
    writers = [ArrayRecordWriter(path, WRITER_OPTIONS) for path in temps]
    n = len(source)
    for index in range(n):
      shard = index * shards // n  # contiguous blocks keep file order
      data = source[index]
      record, reason = records.decode_or_skip(data, decode_images=check_images)
      if reason is not None:
        skipped[reason.split(":", 1)[0]] += 1
        if len(examples) < MAX_EXAMPLES:
          examples.append(reason)
        continue
      writers[shard].write(data)
      per_shard[shard] += 1
      kinds[record["kind"]] += 1
    for writer in writers:
      writer.close()
    writers = []
    for temp, final in zip(temps, finals):
      os.replace(temp, final)
  finally:
    for writer in writers:
      writer.close()
    for temp in temps:
      if os.path.exists(temp):
        os.remove(temp)
  summary = dict(
      source=os.path.abspath(jsonl), lines=len(source), records=sum(per_shard), skipped=sum(skipped.values()),
      skipped_by_reason=dict(skipped), skipped_examples=examples, kinds=dict(sorted(kinds.items())),
      shards=[os.path.basename(path) for path in finals], records_per_shard=per_shard)
  index_path = out + sources.INDEX_SUFFIX
  with open(f"{index_path}.tmp-{os.getpid()}", "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(f"{index_path}.tmp-{os.getpid()}", index_path)
  return summary


def _define_flags() -> None:
  # Defined only when run as a program, so importing convert() never clashes with other CLIs' flags.
  flags.DEFINE_string("jsonl", None, "Input JSONL, one record per line (see sources.JsonlSource).")
  flags.DEFINE_string("image_root", None, "Folder the image paths are relative to (default: the JSONL's).")
  flags.DEFINE_string("out", None, "Output prefix DIR/name; shards are DIR/name-SSSSS-of-NNNNN.array_record.")
  flags.DEFINE_integer("shards", 1, "Number of ArrayRecord shards.")
  flags.DEFINE_bool("check_images", True, "Decode every image and skip lines whose images fail.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  args = flags.FLAGS
  if not args.jsonl or not args.out:
    raise app.UsageError("--jsonl and --out are required")
  summary = convert(args.jsonl, args.out, shards=args.shards, image_root=args.image_root,
                    check_images=args.check_images)
  json.dump(summary, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  _define_flags()
  app.run(main)
