"""data_pipelines: tokenizer, mixtures, the packed grain pipeline, resume, hosts, skips.

References are computed here by hand (pixel masks, the CLIP constants, token layout),
never by calling the code under test a second way.
"""

import json
import re

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

import data_pipelines as dp
from data_pipelines import mixture, packing, records
from mm15_jax import batch as batch_lib
from mm15_jax import configs
from mm15_jax.train.config_checks import check_config

K = 4  # tokens_per_tile of the tiny test config
NUMBERS = re.compile(r"\[([\d, ]+)\]")


def tiny_config(**data):
  c = configs.base()
  c.model.connector.tokens_per_tile = K
  c.data.num_examples = 64
  for key, value in data.items():  # assignment replaces (ConfigDict.update would merge sources)
    c.data[key] = value
  return c


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return dp.load_tokenizer(512, cache_dir=str(tmp_path_factory.mktemp("tok")))


def rows(batch):
  return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["tokens"]))]




def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


# --- tokenizer ---------------------------------------------------------------

def test_tokenizer_is_deterministic_and_cached(tmp_path, monkeypatch):
  a, b = tmp_path / "a", tmp_path / "b"
  dp.load_tokenizer(512, cache_dir=str(a))
  dp.load_tokenizer(512, cache_dir=str(b))
  (fa,), (fb,) = list(a.iterdir()), list(b.iterdir())
  assert fa.name == fb.name and fa.name.endswith(".model")
  assert fa.read_bytes() == fb.read_bytes()
  # A second load reads the cache instead of training.
  monkeypatch.setattr("data_pipelines.tokenizer._train", lambda *_: pytest.fail("trained again"))
  assert dp.load_tokenizer(512, cache_dir=str(a)).model_proto == fa.read_bytes()


def test_tokenizer_ids_and_round_trip(tok):
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (512, 0, 2, 3)
  # "<image>" is one piece wherever it appears (the leading "▁" is sentencepiece's word start).
  assert tok.encode("<image>")[-1:] == [tok.image_id] and tok.decode(tok.encode("<image>")[:-1]) == ""
  ids = tok.encode("see <image><image> here")
  assert ids.count(tok.image_id) == 2 and tok.decode(ids) == "see <image><image> here"
  assert tok.decode([tok.image_id]) == "<image>"
  assert tok.image_id not in (0, 1, 2, 3)
  for text in ["What color is the circle?", "Where is the red square?", "[12, 345, 678, 1000]",
               "What shape is at [907, 31]?", "purple triangle 0123456789", "unseen words: zebra, Ωmega!"]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 1 not in ids  # byte fallback: never <unk>
  # Digits are single pieces, so a coordinate's tokens are its digits.
  ids = tok.encode("[907, 31]")
  assert [tok.decode([i]) for i in ids if tok.decode([i]).isdigit()] == list("90731")
  # pad/bos/eos decode to nothing.
  assert tok.decode([tok.bos_id] + tok.encode("red") + [tok.eos_id, tok.pad_id]) == "red"


def test_vocab_mismatch_is_a_clear_error(tok):
  c = tiny_config()
  c.model.llm.vocab_size = 600
  with pytest.raises(ValueError, match="vocab_size=600"):
    dp.make_train_dataset(c, tok)
  # The config check says the same, among the other config errors, before anything is built.
  with pytest.raises(ValueError, match=rf"config\.model\.llm\.vocab_size=600 but the tokenizer has {tok.vocab_size} "
                                       rf"pieces; set --config\.model\.llm\.vocab_size={tok.vocab_size}"):
    check_config(c, tokenizer=tok, paths=False)
  with pytest.raises(ValueError, match="vocab_size"):
    dp.load_tokenizer(100_000)


# --- mixtures and the packed pipeline --------------------------------------

def without_counts(batch):
  return {k: v for k, v in batch.items() if k not in packing.COUNT_FIELDS}


def test_train_and_eval_batches_follow_the_schema(tok):
  c = tiny_config()
  expected = batch_lib.shapes_for_config(c)
  for batch in take(iter(dp.make_train_dataset(c, tok)), 3):
    assert batch["num_skipped"].shape == (c.train.batch_size,)
    batch_lib.check(without_counts(batch), expected)
    # Rows are packed: several examples each, segments numbered 1.., padding only at the end.
    for seg in batch["segment_ids"]:
      real = seg[seg > 0]
      assert np.all(np.diff(real) >= 0) and np.all(seg[len(real):] == 0) and real[0] == 1
    assert batch["segment_ids"].max() > 1
    slots = batch["image_token_positions"]
    rows_, cols = np.nonzero(slots >= 0)
    assert np.all(batch["tokens"][rows_, slots[rows_, cols]] == tok.image_id)
  evals = dp.make_eval_batches(c, tok, 2)
  for batch in evals:
    batch_lib.check(without_counts(batch), expected)
  assert_batches_equal(evals, dp.make_eval_batches(c, tok, 2))


def test_mixture_proportions_match_the_weights():
  weights = {"caption": 0.5, "text_doc": 0.3, "multi_image": 0.2}  # three distinct record kinds
  kinds = {"caption": "caption", "text_doc": "text", "multi_image": "multi_image"}
  c = tiny_config(sources={n: dict(kind="builtin", weight=w) for n, w in weights.items()}, num_examples=50)
  ds = mixture.mixed_records(c, "train")
  n = 3000
  seen = [ds[i]["kind"] for i in range(n)]
  for name, w in weights.items():
    got = seen.count(kinds[name]) / n
    assert abs(got - w) < 4 * np.sqrt(w * (1 - w) / n), (name, got, w)
  # Deterministic from the seed; another seed gives another order.
  assert [mixture.mixed_records(c, "train")[i]["messages"] for i in range(20)] == [ds[i]["messages"] for i in range(20)]
  c.seed = 1
  assert [mixture.mixed_records(c, "train")[i]["messages"] for i in range(20)] != [ds[i]["messages"] for i in range(20)]


def test_bad_mixture_config_is_a_clear_error():
  with pytest.raises(ValueError, match="sources.foo.task='foo'"):
    mixture.make_source("foo", dict(kind="builtin"), tiny_config(), "train")
  with pytest.raises(ValueError, match="sources.x.kind='csv'"):
    mixture.make_source("x", dict(kind="csv"), tiny_config(), "train")
  with pytest.raises(ValueError, match="weights"):
    mixture.weights(tiny_config(sources={"qa": dict(kind="builtin", weight=-1.0)}))


def test_resume_is_bitwise_identical(tok, tmp_path):
  c = tiny_config(num_examples=20)  # crosses epochs within the batches taken
  it = iter(dp.make_train_dataset(c, tok))
  take(it, 3)
  state = it.get_state()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 2)

  fresh = iter(dp.make_train_dataset(c, tok))
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 2), expected)

  restored = iter(dp.make_train_dataset(c, tok))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_batches_equal(take(restored, 2), expected)


def test_two_processes_read_disjoint_records(tok):
  c = tiny_config(sources={"qa": dict(kind="builtin", weight=1.0)}, num_examples=40)
  whole = mixture.mixed_records(c, "train")
  key = lambda r: r["images"][0].tobytes() + repr(r["messages"]).encode()
  first_epoch = {key(whole[i]) for i in range(40)}
  hosts = [whole[p::2] for p in (0, 1)]
  seen = [{key(h[i]) for i in range(20)} for h in hosts]
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == first_epoch  # together: exactly one epoch, each record once
  # The packed batches of the two processes hold different examples too.
  batches = [next(iter(dp.make_train_dataset(c, tok, process_index=p, process_count=2))) for p in (0, 1)]
  assert all(b["tokens"].shape[0] == c.train.batch_size // 2 for b in batches)
  assert not np.array_equal(batches[0]["images"], batches[1]["images"])
  with pytest.raises(ValueError, match="batch_size=8"):
    dp.make_train_dataset(c, tok, process_index=0, process_count=3)


def test_overlong_records_are_dropped_and_counted(tok, tmp_path):
  """data.overlong="drop": a record longer than a row is not packed but counted as num_overlong,
  and the prefetcher's total (what the trainer logs as overlong_records) adds the rows up."""
  from mm15_jax.train.prefetch import DevicePrefetcher

  def text(words):
    return json.dumps({"kind": "text", "messages": [{"role": "text", "content": " ".join(["circle"] * words)}]})

  (tmp_path / "data.jsonl").write_text("\n".join([text(5)] * 4 + [text(600)] * 4) + "\n")
  c = tiny_config(sources={"mine": dict(kind="jsonl", weight=1.0, path=str(tmp_path / "data.jsonl"))})
  batches = take(iter(dp.make_train_dataset(c, tok)), 3)
  kept = sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches)
  overlong = sum(int(b["num_overlong"].sum()) for b in batches)
  assert sum(int(b["num_skipped"].sum()) for b in batches) == 0
  # As many long records as short ones, but for the short ones the packer still holds in its bins.
  assert kept > 20 and 0 <= overlong - kept <= c.data.pack_bins * 16, (overlong, kept)

  class Replay:
    def __init__(self):
      self.i = 0

    def get_state(self):
      return {"i": self.i}

    def __next__(self):
      self.i += 1
      return batches[self.i - 1]

  prefetcher = DevicePrefetcher(Replay(), lambda b: b, depth=1)
  got = [next(prefetcher) for _ in range(2)]
  assert all(k not in b for b in got for k in packing.COUNT_FIELDS)  # counts never reach the model
  assert prefetcher.overlong_records == sum(int(b["num_overlong"].sum()) for b in batches[:2])


def test_corrupt_records_are_skipped_and_counted(tok, tmp_path):
  from PIL import Image
  Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(tmp_path / "ok.png")
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  good = {"kind": "conversation", "images": ["ok.png"], "messages": [
      {"role": "user", "content": "<image> What color is the image?"}, {"role": "assistant", "content": "gray"}]}
  lines = [json.dumps(good)] * 4 + [
      "{not json", json.dumps({**good, "images": ["missing.png"]}), json.dumps({**good, "images": ["bad.png"]}),
      json.dumps({**good, "kind": "painting"})]
  (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
  c = tiny_config(sources={"mine": dict(kind="jsonl", weight=1.0, path=str(tmp_path / "data.jsonl"))})
  it = iter(dp.make_train_dataset(c, tok))
  batches = take(it, 6)  # never a crash
  examples = sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches)
  skipped = sum(int(b["num_skipped"].sum()) for b in batches)
  # Half the lines are bad: as many skips as good examples, but for the good ones the packer
  # still holds in its bins (at most one per tile) and a part-read epoch (at most 4).
  assert examples > 20 and -4 <= skipped - examples <= c.data.pack_bins * c.data.max_tiles + 4, (skipped, examples)
  # Each bad line is skipped for its own reason.
  from data_pipelines import sources
  src = sources.JsonlSource(str(tmp_path / "data.jsonl"))
  reasons = [records.decode_or_skip(src[i])[1] for i in range(len(src))]
  assert reasons[:4] == [None] * 4 and all(reasons[4:])


def test_worker_processes_give_the_same_batches_and_resume(tok):
  """grain worker processes (data.num_workers) change where decoding runs, not what comes out."""
  c = tiny_config(num_examples=32)
  serial = take(iter(dp.make_train_dataset(c, tok)), 3)
  c.data.num_workers = 2
  it = iter(dp.make_train_dataset(c, tok))
  assert_batches_equal(take(it, 2), serial[:2])
  state = it.get_state()
  expected = take(it, 1)
  assert_batches_equal(expected, serial[2:])
  fresh = iter(dp.make_train_dataset(c, tok))
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 1), expected)


def test_read_threads_choose_by_source_and_keep_the_batches(tok, tmp_path):
  """data.read_threads: auto reads built-in records in the packer's thread (drawn in Python,
  threads only contend for the GIL) and files with grain's reader threads; any count gives the
  same batches and resumes where it stopped."""
  c = tiny_config(num_examples=32)
  assert dp.pipeline.read_options(c).num_threads == 0
  files = tiny_config(sources={"qa": dict(kind="builtin", weight=1.0),
                               "docs": dict(kind="jsonl", path=str(tmp_path / "d.jsonl"), weight=1.0)})
  assert dp.pipeline.read_options(files).num_threads == dp.pipeline.FILE_READ_THREADS
  files.data.read_threads = 3
  assert dp.pipeline.read_options(files).num_threads == 3

  serial = take(iter(dp.make_train_dataset(c, tok)), 3)
  c.data.read_threads = 4
  it = iter(dp.make_train_dataset(c, tok))
  assert_batches_equal(take(it, 2), serial[:2])
  state = it.get_state()
  c.data.read_threads = 0
  fresh = iter(dp.make_train_dataset(c, tok))
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 1), serial[2:])
