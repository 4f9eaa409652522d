"""Weighted mixtures of record sources, from `config.data.sources`.

  config.data.sources = {
      "text_rich": dict(kind="builtin", weight=0.34),                       # task name = key
      "docvqa": dict(kind="array_record", weight=0.2, paths="gs://b/docvqa-*.array_record",
                     eval_paths="gs://b/docvqa_val-*.array_record"),
      "vqa": dict(kind="tfds", weight=0.1, name="my_vqa", split="train", eval_split="validation",
                  data_dir="/data/tfds", fields=dict(image="image", question="question", answer="answer")),
      "mine": dict(kind="jsonl", weight=0.1, paths="/data/mine.jsonl", eval_paths="/data/mine_val.jsonl"),
      "obelics": dict(kind="parquet", weight=0.1, paths="/data/obelics/train-*.parquet",
                      eval_paths="/data/obelics/val-*.parquet", image_root="/data/obelics/images",
                      fields=dict(texts="texts", images="images")),   # optional, as is layout=
      "llava": dict(kind="webdataset", weight=0.1, paths="/data/llava/train-{000000..000099}.tar",
                    eval_paths="/data/llava/val-000000.tar"),
  }

`kind` picks the builder in `sources.KINDS` (one module per kind in data_pipelines/sources/),
and the keys of each kind are `sources.SPEC_KEYS[kind]`: an unknown kind or key is an error
naming it (`config.data.sources.NAME.KEY`) when the source is made, before anything is read.

Each source is shuffled with its own seed and repeated, then `grain.MapDataset.mix` interleaves
them deterministically in the proportions of the weights. Items are records (built-in sources)
or serialised records (files); `ToExample` decodes and builds them in the map stage, where
grain's worker processes run.
"""

import grain

from data_pipelines import records
from data_pipelines import sources as sources_lib
from data_pipelines.sequence import ExampleBuilder


def make_source(name: str, spec, config, split: str):
  """One source of `config.data.sources` for split "train" or "eval": the builder of its kind."""
  sources_lib.validate_spec(name, spec)  # a typo fails here, not as a default silently kept
  return sources_lib.KINDS[sources_lib.kind_of(name, spec)](name, spec, config, split)


def all_builtin(config) -> bool:
  """Whether every source of config.data.sources is built-in (drawn in Python, nothing read)."""
  return all(spec.get("kind", "builtin") == "builtin" for spec in config.data.sources.values())


def weights(config) -> dict:
  specs = dict(config.data.sources)
  if not specs:
    raise ValueError("config.data.sources is empty: name at least one source, e.g. "
                     "dict(qa=dict(kind='builtin', weight=1.0))")
  out = {name: float(sources_lib.specs.field(spec, "weight", 1.0)) for name, spec in specs.items()}
  bad = {n: w for n, w in out.items() if w < 0}
  if bad or sum(out.values()) <= 0:
    raise ValueError(f"config.data.sources weights must be >= 0 and not all 0, got {out}")
  return out


def mixed_records(config, split: str = "train") -> grain.MapDataset:
  """An infinite deterministic MapDataset of records / serialised records in the weights' proportions."""
  w = weights(config)
  datasets, proportions = [], []
  for i, (name, spec) in enumerate(dict(config.data.sources).items()):
    if w[name] == 0:
      continue  # weight 0: the source is off (never opened); the others keep their seeds
    ds = grain.MapDataset.source(make_source(name, spec, config, split))
    if split == "train":
      ds = ds.seed(config.seed * 1000 + i).shuffle()
    datasets.append(ds.repeat())
    proportions.append(w[name])
  if len(datasets) == 1:
    return datasets[0]
  return grain.MapDataset.mix(datasets, proportions)


class ToExample:
  """Record or serialised record -> sequence Example; a dropped record becomes a placeholder
  with its reason (sequence.DROP_REASONS), which packing counts.

  Picklable, so it runs in grain's worker processes.
  """

  def __init__(self, builder: ExampleBuilder):
    self.builder = builder

  def __call__(self, item):
    note = None
    if isinstance(item, (bytes, bytearray)):
      record, reason = records.decode_or_skip(bytes(item))
      if record is None:
        where = getattr(item, "where", None)  # records.LocatedBytes: the file and line, row or index
        record, note = dict(skipped=1, reason=reason), f"{where}: {reason}" if where else reason
      item = record
    # build, not the builder's call: a None (too long) would vanish in a MapDataset uncounted.
    example = self.builder.build(item)
    if note:  # why, with the record's place (file and line or row): packing.DropGuard shows it
      example = dict(example, drop_note=str(note))
    return example
