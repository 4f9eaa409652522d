"""Grain pipelines that turn a config into host-local batches: the trainer's only input.

  sources (config.data.sources) -> per-source shuffle + repeat -> weighted mix -> host shard
  -> decode + AnyRes + sequence (ToExample; grain worker processes when data.num_workers > 0)
  -> packing (several examples per row, segment ids) -> batch

Each batch is a dict of NumPy arrays in the schema of mm15_jax/batch.py, with the batch
dimension host-local (config.train.batch_size // process_count); the trainer builds global
arrays with `jax.make_array_from_process_local_data`. One extra field, `num_skipped` [B],
counts corrupt or malformed records met while filling each row; the trainer strips it.

Sharding the mixed records by index before any decoding means each process reads only its
own records. The iterator from `iter(make_train_dataset(...))` is checkpointable
(`get_state`/`set_state`); a restored iterator continues bitwise identically.
"""

import grain

from data_pipelines import mixture, packing
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


def _examples(config, tokenizer, split: str, process_index: int, process_count: int) -> grain.IterDataset:
  tokenizer_lib.check_vocab(config, tokenizer)
  ds = mixture.mixed_records(config, split)[process_index::process_count]
  ds = ds.map(mixture.ToExample(ExampleBuilder.from_config(config, tokenizer))).to_iter_dataset()
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
