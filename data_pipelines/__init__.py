"""Grain input pipelines: sources, tokenisation, sequence building, host-local batches.

The trainer sees only the batch dicts of mm15_jax/batch.py that these functions yield.
"""

from data_pipelines.pipeline import make_eval_batches, make_eval_batches_per_source, make_train_dataset
from data_pipelines.sequence import ExampleBuilder
from data_pipelines.tokenizer import Tokenizer, check_vocab, load_tokenizer, tokenizer_for_config
