"""Grain pipelines that turn a config into host-local batches: the trainer's only input.

  sources (config.data.sources) -> per-source shuffle + repeat -> weighted mix -> host shard
  -> decode + AnyRes + sequence (ToExample; grain worker processes when data.num_workers > 0)
  -> packing (several examples per row, segment ids) -> batch

Each batch is a dict of NumPy arrays in the schema of mm15_jax/batch.py, with the batch
dimension host-local (config.train.batch_size // process_count); the trainer builds global
arrays with `jax.make_array_from_process_local_data`. Extra fields (packing.COUNT_FIELDS)
count the records dropped while filling each row: `num_skipped` [B] corrupt or malformed,
`num_overlong` [B] too long, `num_dropped` [B, len(sequence.DROP_REASONS)] both by reason;
the trainer strips them and logs their totals.

Sharding the mixed records by index before any decoding means each process reads only its
own records. The iterator from `iter(make_train_dataset(...))` is checkpointable
(`get_state`/`set_state`); a restored iterator continues bitwise identically.
"""

import grain
import numpy as np

from data_pipelines import mixture, packing, sequence
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.sequence import ExampleBuilder


def local_batch_size(config, process_count: int) -> int:
  global_batch = config.train.batch_size
  if global_batch % process_count:
    raise ValueError(f"config.train.batch_size={global_batch} does not split over {process_count} processes; "
                     f"use a multiple of {process_count}")
  return global_batch // process_count


def _check_shard(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")


# grain's default read threads: for sources in files, where reads wait on storage.
FILE_READ_THREADS = 16


def read_options(config) -> grain.ReadOptions:
  """How many threads read records ahead (data.read_threads; -1: auto).

  Built-in records are drawn in Python, so reader threads add no parallelism, only GIL
  contention with the packer and the step: on 2 cores a batch of the built-in mixture takes
  2.5x as long with grain's 16 threads as read in the packer's own thread.
  """
  threads = config.data.get("read_threads", -1)
  if threads < 0:
    threads = 0 if mixture.all_builtin(config) else FILE_READ_THREADS
  return grain.ReadOptions(num_threads=threads)


def _examples(config, tokenizer, split: str, process_index: int, process_count: int) -> grain.IterDataset:
  tokenizer_lib.check_vocab(config, tokenizer)
  ds = mixture.mixed_records(config, split)[process_index::process_count]
  ds = ds.map(mixture.ToExample(ExampleBuilder.from_config(config, tokenizer))).to_iter_dataset(read_options(config))
  if split == "train" and config.data.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return ds


def make_train_dataset(config, tokenizer, *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Infinite grain IterDataset of host-local packed training batches (schema above)."""
  _check_shard(process_index, process_count)
  batch_size = local_batch_size(config, process_count)
  ds = _examples(config, tokenizer, "train", process_index, process_count)
  return packing.pack_examples(ds, config).batch(batch_size, drop_remainder=True)


def make_eval_batches(config, tokenizer, num_batches: int, *, process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
  """The first num_batches host-local packed batches of the eval splits, in order (deterministic)."""
  _check_shard(process_index, process_count)
  batch_size = local_batch_size(config, process_count)
  ds = _examples(config, tokenizer, "eval", process_index, process_count)
  it = iter(packing.pack_examples(ds, config).batch(batch_size, drop_remainder=True))
  return [next(it) for _ in range(num_batches)]


def padding_rows(config, rows: int) -> dict:
  """Rows with no tokens, no tiles and no loss: what the packer leaves at the end of a row."""
  length, tiles = config.data.seq_len, config.data.max_tiles
  size, k = config.model.vit.image_size, config.model.connector.tokens_per_tile
  return dict(
      tokens=np.full((rows, length), tokenizer_lib.PAD_ID, np.int32),
      targets=np.full((rows, length), tokenizer_lib.PAD_ID, np.int32),
      loss_mask=np.zeros((rows, length), np.float32),
      segment_ids=np.zeros((rows, length), np.int32),
      positions=np.zeros((rows, length), np.int32),
      images=np.zeros((rows, tiles, size, size, 3), np.uint8),
      image_token_positions=np.full((rows, tiles * k), -1, np.int32),
      num_skipped=np.zeros((rows,), np.int32),
      num_overlong=np.zeros((rows,), np.int32),
      num_dropped=np.zeros((rows, len(sequence.DROP_REASONS)), np.int32),
  )


class SourceEvalBatches:
  """The first `num_batches` host-local packed batches of one source's eval split, in order.

  Re-iterable: each pass rebuilds the pipeline from the start, so passes yield identical
  batches and none stays in host memory between evaluations. The split is read once, never
  repeated: when it runs out, the remaining rows and batches are padding (loss_mask 0), so no
  example counts twice and every process runs the same number of eval steps.
  """

  def __init__(self, config, tokenizer, name: str, num_batches: int, *, process_index: int = 0,
               process_count: int = 1):
    _check_shard(process_index, process_count)
    tokenizer_lib.check_vocab(config, tokenizer)
    self.name, self.num_batches = name, num_batches
    self._config, self._tokenizer = config, tokenizer
    self._batch_size = local_batch_size(config, process_count)
    self._shard = slice(process_index, None, process_count)
    # Built now: a missing eval path fails at startup, not at the first evaluation.
    self._source = mixture.make_source(name, config.data.sources[name], config, "eval")

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    ds = grain.MapDataset.source(self._source)[self._shard]
    ds = ds.map(mixture.ToExample(ExampleBuilder.from_config(self._config, self._tokenizer)))
    ds = ds.to_iter_dataset(read_options(self._config))
    it = iter(packing.pack_examples(ds, self._config).batch(self._batch_size, drop_remainder=False))
    for _ in range(self.num_batches):
      batch = next(it, None)
      rows = 0 if batch is None else len(batch["tokens"])
      if rows < self._batch_size:
        pad = padding_rows(self._config, self._batch_size - rows)
        batch = pad if batch is None else {k: np.concatenate([batch[k], pad[k]]) for k in pad}
      yield batch


def make_eval_batches_per_source(config, tokenizer, num_batches: int, *, process_index: int = 0,
                                 process_count: int = 1) -> dict[str, SourceEvalBatches]:
  """{source name: its eval split's first num_batches batches} for every source of config.data.sources."""
  return {name: SourceEvalBatches(config, tokenizer, name, num_batches, process_index=process_index,
                                  process_count=process_count)
          for name in config.data.sources}
