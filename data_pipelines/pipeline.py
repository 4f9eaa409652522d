"""Grain pipelines that turn a config into host-local batches: the trainer's only input.

Each batch is a dict of NumPy arrays in the schema of mm15_jax/batch.py, with the batch
dimension host-local (config.train.batch_size // process_count); the trainer builds the
global array with `jax.make_array_from_process_local_data`:

  tokens, targets         int32   [B, L]   input ids; next-token ids (pad after the last token)
  loss_mask               float32 [B, L]   1 where the target is an answer token or <eos>
  segment_ids, positions  int32   [B, L]   1 on tokens, 0 on padding; 0..n-1 per example
  images                  float32 [B, T, S, S, 3]   CLIP-normalised tiles; unused tiles zero
  image_token_positions   int32   [B, T*K] indices of the <image> tokens in order; -1 unused

Order: source -> shuffle (a new permutation each epoch) -> repeat -> sequence -> host
shard -> batch. Sharding by element index before batching means step s of host p holds
elements p, p + P, ... of the global step s, so the hosts' batches of one step are
disjoint and together are the single-host batch of that step. The iterator from
`iter(make_train_dataset(...))` is checkpointable: `get_state()`/`set_state()`, or
orbax with `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`; a restored
iterator continues bitwise identically.
"""

import grain

from data_pipelines import sequence
from data_pipelines import shapes
from data_pipelines import tokenizer as tokenizer_lib

_SOURCES = ("shapes",)


def make_source(config, split: str):
  name = config.data.name
  if name == "shapes":
    examples = config.data.num_examples if split == "train" else config.data.eval_examples
    return shapes.ShapesSource(split, examples, config.model.vit.image_size, seed=config.seed)
  raise ValueError(f"config.data.name={name!r} has no pipeline yet; available: {_SOURCES}")


def local_batch_size(config, process_count: int) -> int:
  global_batch = config.train.batch_size
  if global_batch % process_count:
    raise ValueError(f"config.train.batch_size={global_batch} does not split over {process_count} processes; "
                     f"use a multiple of {process_count}")
  return global_batch // process_count


def _check_shard(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")


def make_train_dataset(config, tokenizer, *, process_index: int = 0, process_count: int = 1,
                       drop_overlong: bool = False) -> grain.IterDataset:
  """Infinite grain IterDataset of host-local training batches (schema above).

  drop_overlong: skip examples longer than data.seq_len instead of raising. Skipping
  breaks the "hosts together = single-host batch" property of a step (each host skips its
  own), never disjointness.
  """
  _check_shard(process_index, process_count)
  batch_size = local_batch_size(config, process_count)
  tokenizer_lib.check_vocab(config, tokenizer)
  ds = grain.MapDataset.source(make_source(config, "train")).seed(config.seed).shuffle().repeat()
  ds = ds.map(sequence.SequenceBuilder.from_config(config, tokenizer, drop_overlong))
  ds = ds[process_index::process_count]
  # Batch the IterDataset: it skips dropped (None) elements, a MapDataset batch would not.
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)


def make_eval_batches(config, tokenizer, num_batches: int, *, process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
  """The first num_batches host-local batches of the eval split, in order (deterministic)."""
  _check_shard(process_index, process_count)
  batch_size = local_batch_size(config, process_count)
  tokenizer_lib.check_vocab(config, tokenizer)
  source = make_source(config, "eval")
  needed = num_batches * config.train.batch_size
  if needed > len(source):
    raise ValueError(f"{num_batches} eval batches of {config.train.batch_size} need {needed} examples but "
                     f"config.data.eval_examples={len(source)}; raise it or evaluate fewer batches")
  ds = grain.MapDataset.source(source)[:needed]
  ds = ds.map(sequence.SequenceBuilder.from_config(config, tokenizer))
  ds = ds[process_index::process_count].batch(batch_size, drop_remainder=True)
  return [ds[i] for i in range(num_batches)]
