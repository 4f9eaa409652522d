"""The sources of `config.data.sources`, one module per kind, registered in KINDS.

  builtin       generated tasks (data_pipelines/builtin)
  array_record  ArrayRecord shards (e.g. written by `python -m data_pipelines.convert`)
  tfds          a tfds dataset prepared on disk
  jsonl         JSONL files + image files
  parquet       Parquet shards of the public corpora (OBELICS, LLaVA)
  webdataset    WebDataset tar shards

Each kind's module has `build(name, spec, config, split)`, which returns a grain random-access
source (`__len__`, `__getitem__`) for split "train" or "eval", and KEYS, the spec keys it reads
besides `kind` and `weight` (jsonl also RENAMED: old names still read, with a warning);
validate_spec refuses any other key, naming it (specs.py).

Built-in sources yield records; the others' items are the bytes of `records.encode` (or of
`records.encode_error` when the source could not make a record). Decoding the images is left
to the map stage (`records.decode_or_skip`), which runs in the grain worker processes and
turns bad items into skip counts, never crashes: reading stays cheap and every failure
surfaces in one place.

grain reads a source from several threads at once (ReadOptions.num_threads), so reads
share no file position: each uses its own handle or a positional read.
"""

from data_pipelines.sources import array_record, builtin, jsonl, parquet, specs, tfds, webdataset
from data_pipelines.sources.array_record import INDEX_SUFFIX, SHARD_SUFFIX, ArrayRecordSource, shard_name, shard_paths
from data_pipelines.sources.jsonl import VIDEO_MARKER, JsonlFiles, JsonlSource, video_messages
from data_pipelines.sources.parquet import ParquetSource
from data_pipelines.sources.tfds import TFDS_FIELDS, TfdsSource, tfds_to_record
from data_pipelines.sources.webdataset import WebDatasetSource

_MODULES = {"builtin": builtin, "array_record": array_record, "tfds": tfds, "jsonl": jsonl, "parquet": parquet,
            "webdataset": webdataset}

# kind -> build(name, spec, config, split) -> the grain random-access source.
KINDS = {kind: module.build for kind, module in _MODULES.items()}
# kind -> the keys its spec may have.
SPEC_KEYS = {kind: specs.COMMON_KEYS + module.KEYS for kind, module in _MODULES.items()}


def kind_of(name: str, spec) -> str:
  """The spec's kind ("builtin" when unset); an unknown kind raises, naming the ones there are."""
  kind = specs.field(spec, "kind", "builtin")
  if kind not in KINDS:
    raise ValueError(f"{specs.where(name)}.kind={kind!r}: expected one of {list(KINDS)}"
                     f"{specs.did_you_mean(kind, KINDS)}")
  return kind


def validate_spec(name: str, spec) -> None:
  """Raises ValueError for an unknown kind or key of config.data.sources[name]; warns for an old key name."""
  kind = kind_of(name, spec)
  renamed = getattr(_MODULES[kind], "RENAMED", {})  # old key names a kind still reads (jsonl's path)
  specs.check_keys(name, spec, kind, SPEC_KEYS[kind], renamed)

