"""Parquet and WebDataset sources against the same samples written as JSONL + image files.

The reference is hand-written: each sample below is a JSONL record (what the corpus row
means here) and the pixel arrays the test drew. The Parquet rows and tar members are built
from the same samples in the corpora's own layouts (LLaVA turns, OBELICS texts/images,
WebDataset members); each source must decode to the JSONL source's records and the drawn
pixels, and build the same training examples.
"""

import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
from concurrent import futures

import jax
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_setup import place, setup_on, tiny_config

import data_pipelines as dp
from data_pipelines import convert, corpus_formats, mixture, packing, records, sources
from data_pipelines.sequence import ExampleBuilder
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib

M = records.IMAGE_MARKER
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face datasets' Image
TURNS = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))


def _image(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encoded(array, format_="PNG") -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format=format_)
  return buffer.getvalue()


def _conv(*contents):
  return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


def _text(*contents):
  return [{"role": "text", "content": c} for c in contents]


# name -> record with image file names (under img/), as the JSONL reference holds it.
CONVERSATIONS = {
    "c0": dict(kind="conversation", messages=_conv(f"{M}\nWhat colour is it?", "Red."), images=["c0.png"]),
    "c1": dict(kind="conversation", messages=_conv(f"Describe this.\n{M}", "A box.", "How big?", "Small."),
               images=["c1.png"]),
    "c2": dict(kind="text", messages=_conv("2+2?", "4"), images=[]),
    "c3": dict(kind="multi_image", messages=_conv(f"{M} and {M}: same?", "No."), images=["c3a.png", "c3b.png"]),
    # Its LLaVA row has no marker: the image goes in front of the first turn.
    "c4": dict(kind="conversation", messages=_conv(f"{M}\nWhat is it?", "A dot."), images=["c4.png"]),
}
# name -> (OBELICS texts, OBELICS images as file names, the record they mean)
DOCUMENTS = {
    "d0": (["Intro.", None, "After the picture."], [None, "d0.png", None],
           dict(kind="interleaved", messages=_text("Intro.", f"{M}After the picture."), images=["d0.png"])),
    "d1": ([None, "Between.", None, None], ["d1a.png", None, "d1b.png", "d1c.png"],
           dict(kind="interleaved", messages=_text(f"{M}Between.{M}{M}"), images=["d1a.png", "d1b.png", "d1c.png"])),
    "d2": (["Only text.", "Second paragraph."], [None, None],
           dict(kind="text", messages=_text("Only text.", "Second paragraph."), images=[])),
}
CAPTIONS = {
    "p0": dict(kind="caption", messages=_text(f"{M}A red square."), images=["p0.png"]),
    "p1": dict(kind="caption", messages=_text(f"{M}A photo."), images=["p1.jpg"]),
}
SAMPLES = {**CONVERSATIONS, **{name: doc[2] for name, doc in DOCUMENTS.items()}, **CAPTIONS}


def _turns(name):
  """The LLaVA turns of a conversation sample."""
  record = CONVERSATIONS[name]
  turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in record["messages"]]
  if name == "c4":
    turns[0]["value"] = "What is it?"
  return turns


def _write_parquet(path, columns: dict, schema: dict, row_group_size: int):
  table = pa.table({name: pa.array(values, type=schema[name]) for name, values in columns.items()})
  pq.write_table(table, path, row_group_size=row_group_size)


def _write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The samples as JSONL + images, Parquet (LLaVA and OBELICS) and WebDataset shards."""
  root = tmp_path_factory.mktemp("corpus")
  (root / "img").mkdir()
  names = sorted({n for record in SAMPLES.values() for n in record["images"]} - {"p1.jpg"})
  arrays = {n: _image(4 + i % 5, 9 - i % 4, 500 + i) for i, n in enumerate(names)}
  files = {n: _encoded(a) for n, a in arrays.items()}
  files["p1.jpg"] = _encoded(_image(12, 10, 600), "JPEG")
  arrays["p1.jpg"] = np.asarray(PIL.Image.open(io.BytesIO(files["p1.jpg"])).convert("RGB"))  # PIL is the reference
  for n, data in files.items():
    (root / "img" / n).write_bytes(data)

  def jsonl(name, sample_names):
    lines = [json.dumps({**SAMPLES[s], "images": [f"img/{n}" for n in SAMPLES[s]["images"]]}) for s in sample_names]
    (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")

  def hf_image(n, embed=True):
    return {"bytes": files[n] if embed else None, "path": n if embed else f"img/{n}"}

  def first(name):
    images = CONVERSATIONS[name]["images"]
    return hf_image(images[0], embed=name != "c1") if images else None  # c1: a path only

  # LLaVA: two shards, `image` as HF Image structs (embedded bytes, or a path), row groups of 1 and 2.
  llava = dict(conversations=TURNS, image=IMAGE, id=pa.string())
  _write_parquet(root / "llava-0.parquet", dict(id=["c0", "c1"], conversations=[_turns("c0"), _turns("c1")],
                                                image=[first("c0"), first("c1")]), llava, 1)
  _write_parquet(root / "llava-1.parquet", dict(id=["c2", "c4"], conversations=[_turns("c2"), _turns("c4")],
                                                image=[first("c2"), first("c4")]), llava, 2)
  jsonl("llava", ["c0", "c1", "c2", "c4"])
  # LLaVA, own column names: `dialog`, and `pictures` as a list of path strings.
  _write_parquet(root / "multi.parquet", dict(dialog=[_turns("c3"), _turns("c0")],
                                              pictures=[["img/c3a.png", "img/c3b.png"], ["img/c0.png"]]),
                 dict(dialog=TURNS, pictures=pa.list_(pa.string())), 2)
  jsonl("multi", ["c3", "c0"])
  # OBELICS: two shards; images as structs, d1's first image by path.
  obelics = dict(texts=pa.list_(pa.string()), images=pa.list_(IMAGE))
  cells = {name: [None if n is None else hf_image(n, embed=(n != "d1a.png")) for n in doc[1]]
           for name, doc in DOCUMENTS.items()}
  _write_parquet(root / "obelics-0.parquet", dict(texts=[DOCUMENTS["d0"][0], DOCUMENTS["d1"][0]],
                                                  images=[cells["d0"], cells["d1"]]), obelics, 1)
  _write_parquet(root / "obelics-1.parquet", dict(texts=[DOCUMENTS["d2"][0]], images=[cells["d2"]]), obelics, 1)
  jsonl("obelics", ["d0", "d1", "d2"])
  # WebDataset: three shards; a .txt caption, .json captions and conversations, c3's images
  # stored out of order (1 before 0), a .cls member to ignore, a .json before its image.
  conv_json = lambda name: json.dumps({"conversations": _turns(name), "id": name}).encode()
  _write_tar(root / "wds-000.tar", [
      ("p0.png", files["p0.png"]), ("p0.txt", b"A red square."),
      ("c0.png", files["c0.png"]), ("c0.json", conv_json("c0")), ("c0.cls", b"3"),
      ("c3.1.png", files["c3b.png"]), ("c3.0.png", files["c3a.png"]), ("c3.json", conv_json("c3"))])
  _write_tar(root / "wds-001.tar", [("p1.jpg", files["p1.jpg"]), ("p1.json", b'{"caption": "A photo."}'),
                                    ("c2.json", conv_json("c2"))])
  _write_tar(root / "wds-002.tar", [("c1.json", conv_json("c1")), ("c1.png", files["c1.png"])])
  jsonl("wds", ["p0", "c0", "c3", "p1", "c2", "c1"])
  return root, arrays


def _sources(root):
  """(name, source under test, JSONL reference source, sample names in order)."""
  return [
      ("llava", sources.ParquetSource(str(root / "llava-*.parquet"), image_root=str(root)),
       ["c0", "c1", "c2", "c4"]),
      ("multi", sources.ParquetSource(str(root / "multi.parquet"), image_root=str(root),
                                      fields=dict(conversations="dialog", images="pictures")), ["c3", "c0"]),
      ("obelics", sources.ParquetSource([str(root / "obelics-0.parquet"), str(root / "obelics-1.parquet")],
                                        image_root=str(root)), ["d0", "d1", "d2"]),
      ("wds", sources.WebDatasetSource(str(root / "wds-{000..002}.tar")), ["p0", "c0", "c3", "p1", "c2", "c1"]),
  ]


def _assert_same(got, want):
  assert {k: got[k] for k in ("kind", "messages", "category", "coords")} == \
         {k: want[k] for k in ("kind", "messages", "category", "coords")}
  assert len(got["images"]) == len(want["images"])
  for g, w in zip(got["images"], want["images"]):
    assert g.dtype == np.uint8 and g.shape == w.shape
    np.testing.assert_array_equal(g, w)


@pytest.fixture(scope="module")
def tok():
  return dp.load_tokenizer(tiny_config().model.llm.vocab_size)


# --- records and examples equal the JSONL reference ---------------------------------------


@pytest.mark.parametrize("which", range(4))
def test_sources_decode_to_the_jsonl_records_and_examples(corpus, tok, which):
  root, arrays = corpus
  name, source, samples = _sources(root)[which]
  reference = sources.JsonlSource(str(root / f"{name}.jsonl"))
  assert len(source) == len(reference) == len(samples)
  builder = ExampleBuilder.from_config(tiny_config(), tok)
  for i, sample in enumerate(samples):
    got, want = records.decode(source[i]), records.decode(reference[i])
    _assert_same(got, want)
    drawn = dict(SAMPLES[sample], images=[arrays[n] for n in SAMPLES[sample]["images"]], category="", coords="none")
    _assert_same(got, drawn)  # and the hand-written sample with the test's own pixels
    built, expected = builder(got), builder(want)
    assert built is not None and built.keys() == expected.keys()
    for key in expected:
      np.testing.assert_array_equal(built[key], expected[key], err_msg=f"{name}[{i}] {key}")
  with pytest.raises(IndexError):
    source[len(source)]


def test_global_index_spans_the_shards_in_order(corpus):
  root, _ = corpus
  llava = sources.ParquetSource(str(root / "llava-*.parquet"), image_root=str(root))
  # llava-0: row groups [1, 1]; llava-1: one group of 2 rows.
  assert [llava.locate(i) for i in range(4)] == [(str(root / "llava-0.parquet"), 0), (str(root / "llava-0.parquet"), 1),
                                                 (str(root / "llava-1.parquet"), 0), (str(root / "llava-1.parquet"), 1)]
  assert llava.layout == "conversations" and llava.columns == ["conversations", "image"]
  obelics = sources.ParquetSource(str(root / "obelics-*.parquet"), image_root=str(root))
  assert obelics.layout == "interleaved" and len(obelics) == 3
  # A list of patterns, brace and glob, in the order named; the same shard twice is read twice.
  both = sources.WebDatasetSource([str(root / "wds-{001,002}.tar"), str(root / "wds-00[0].tar")])
  order = ["p1", "c2", "c1", "p0", "c0", "c3"]
  assert len(both) == 6
  assert [records.decode(both[i])["messages"] for i in range(6)] == [SAMPLES[n]["messages"] for n in order]


@pytest.mark.parametrize("pattern,expected", [
    ("a-{000..002}.tar", ["a-000.tar", "a-001.tar", "a-002.tar"]),
    ("x{9..11}", ["x9", "x10", "x11"]),  # no padding asked
    ("{3..1}", ["3", "2", "1"]),
    ("{a,b}-{0..1}", ["a-0", "a-1", "b-0", "b-1"]),
    ("d/{07..10}/s", ["d/07/s", "d/08/s", "d/09/s", "d/10/s"]),
    ("plain{x}.tar", ["plain{x}.tar"]),
])
def test_brace_expansion(pattern, expected):
  assert corpus_formats.expand_braces(pattern) == expected


# --- bad input -------------------------------------------------------------------------------


def test_bad_parquet_rows_are_skipped_and_counted(corpus, tok, tmp_path):
  root, arrays = corpus
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
  rows = [  # (texts, images as path strings, expected reason prefix or None)
      (["A.", None], [None, "img/d0.png"], None),
      ([None, "x"], ["https://example.com/a.jpg", None], "CorruptImage: bad.parquet row 1: images[0]: "
                                                         "'https://example.com/a.jpg' is a URL"),
      (["x", None], [None, "corrupt.png"], "CorruptImage: images[0]: cannot decode image"),
      (["x", None], [None, "img/nope.png"], "CorruptImage: bad.parquet row 3: images[1]: cannot read 'img/nope.png'"),
      (["x", "y"], [None], "MalformedRecord: bad.parquet row 4: texts/images: 2 texts and 1 images"),
      (["x"], ["img/d0.png"], "MalformedRecord: bad.parquet row 5: texts[0], images[0]: both set"),
      (None, None, "MalformedRecord: bad.parquet row 6: texts: expected a list, got NoneType"),
  ]
  _write_parquet(tmp_path / "bad.parquet", dict(texts=[r[0] for r in rows], images=[r[1] for r in rows]),
                 dict(texts=pa.list_(pa.string()), images=pa.list_(pa.string())), 3)
  # image_root: the shard's folder by default; "img/d0.png" lives under the corpus root.
  os.symlink(root / "img", tmp_path / "img")
  source = sources.ParquetSource(str(tmp_path / "bad.parquet"))
  to_example = mixture.ToExample(ExampleBuilder.from_config(tiny_config(), tok))
  for i, (_, _, prefix) in enumerate(rows):
    record, reason = records.decode_or_skip(source[i])
    if prefix is None:
      assert reason is None and record["messages"] == _text(f"A.{M}")
      np.testing.assert_array_equal(record["images"][0], arrays["d0.png"])
      assert to_example(source[i])["skipped"] == 0
    else:
      assert record is None and reason.startswith(prefix), (reason, prefix)
      assert to_example(source[i])["skipped"] == 1  # what packing counts as num_skipped


def test_bad_parquet_files_and_fields_are_clear_errors(corpus, tmp_path):
  root, _ = corpus
  strings = pa.list_(pa.string())
  _write_parquet(tmp_path / "renamed.parquet", dict(texts=[["a", None]], imgs=[[None, "img/d0.png"]]),
                 dict(texts=strings, imgs=strings), 1)
  with pytest.raises(ValueError, match=r"columns \['texts', 'imgs'\] fit no layout.*fields=dict"):
    sources.ParquetSource(str(tmp_path / "renamed.parquet"))
  with pytest.raises(ValueError, match=r"no column 'images' \(columns: \['texts', 'imgs'\]\)"):
    sources.ParquetSource(str(tmp_path / "renamed.parquet"), layout="interleaved")
  renamed = sources.ParquetSource(str(tmp_path / "renamed.parquet"), fields=dict(images="imgs"), image_root=str(root))
  assert records.decode(renamed[0])["messages"] == _text(f"a{M}")
  # A later shard without the columns of the first.
  _write_parquet(tmp_path / "x-1.parquet", dict(texts=[["a"]]), dict(texts=strings), 1)
  (tmp_path / "x-0.parquet").write_bytes((root / "obelics-1.parquet").read_bytes())
  with pytest.raises(ValueError, match=r"x-1.parquet: no column 'images'"):
    sources.ParquetSource(str(tmp_path / "x-*.parquet"))
  with pytest.raises(ValueError, match="no image column 'image' or 'images'.*fields=dict"):
    sources.ParquetSource(str(root / "multi.parquet"), fields=dict(conversations="dialog"))
  text_only = sources.ParquetSource(str(root / "multi.parquet"), fields=dict(conversations="dialog", image=None,
                                                                                 images=None))
  assert records.decode_or_skip(text_only[0])[1].startswith("MalformedRecord: multi.parquet row 0: messages: 2 "
                                                            "<image> marker(s) for 0 image(s)")
  (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
  with pytest.raises(ValueError, match="junk.parquet: cannot read the file's footer"):
    sources.ParquetSource(str(tmp_path / "junk.parquet"))
  with pytest.raises(ValueError, match=r"fields \['text'\] unknown"):
    sources.ParquetSource(str(root / "obelics-*.parquet"), fields=dict(text="t"))
  with pytest.raises(ValueError, match="layout='llava'"):
    sources.ParquetSource(str(root / "obelics-*.parquet"), layout="llava")
  with pytest.raises(FileNotFoundError, match="parquet paths"):
    sources.ParquetSource(str(tmp_path / "none-*.parquet"))


def test_bad_webdataset_samples_are_skipped_and_shards_are_clear_errors(corpus, tmp_path):
  root, _ = corpus
  png = (root / "img/c0.png").read_bytes()
  members = [
      ("ok.png", png), ("ok.txt", b"Fine."),
      ("nokey.png", png), ("nokey.json", b'{"text": "x"}'),
      ("badjson.png", png), ("badjson.json", b'{"caption": '),
      ("corrupt.png", b"\x89PNG\r\n\x1a\ntruncated"), ("corrupt.txt", b"x"),
      ("two.0.png", png), ("two.1.png", png), ("two.txt", b"Two images, one caption."),
      ("label.cls", b"7"),
      ("speaker.png", png), ("speaker.json", json.dumps({"conversations": [{"from": "bot", "value": M}]}).encode()),
  ]
  _write_tar(tmp_path / "bad-0.tar", members)
  source = sources.WebDatasetSource(str(tmp_path / "bad-0.tar"))
  expected = [
      None,
      "MalformedRecord: bad-0.tar: nokey.json: neither 'conversations' nor 'caption' among its keys ['text']",
      "MalformedRecord: bad-0.tar: badjson.json: bad JSON",
      "CorruptImage: images[0]: cannot decode image",
      "MalformedRecord: bad-0.tar: two: images: a caption record has exactly 1 image(s), got 2",
      "MalformedRecord: bad-0.tar: label: no .json or .txt member (members: ['cls'])",
      "MalformedRecord: bad-0.tar: speaker.json conversations[0].from: 'bot' is not one of",
  ]
  assert len(source) == len(expected)
  for i, prefix in enumerate(expected):
    record, reason = records.decode_or_skip(source[i])
    assert (reason is None) if prefix is None else reason.startswith(prefix), (i, reason)
  # Shards that cannot be indexed, or are missing from a brace range.
  with tarfile.open(tmp_path / "packed.tar.gz", "w:gz") as tar:
    tar.add(root / "img/c0.png", arcname="c0.png")
  with pytest.raises(ValueError, match="packed.tar.gz: cannot read it as an uncompressed tar.*decompress"):
    sources.WebDatasetSource(str(tmp_path / "packed.tar.gz"))
  with pytest.raises(FileNotFoundError, match=r"bad-1.tar"):
    sources.WebDatasetSource(str(tmp_path / "bad-{0..1}.tar"))
  # A shard cut short after indexing: its samples become errors, not crashes.
  (tmp_path / "short.tar").write_bytes((root / "wds-002.tar").read_bytes())
  short = sources.WebDatasetSource(str(tmp_path / "short.tar"))
  os.truncate(tmp_path / "short.tar", 600)  # c1.json's data starts at 512, after its header
  assert re.match(r"MalformedRecord: short.tar: c1.json: 88 of \d+ bytes; the shard is shorter",
                  records.decode_or_skip(short[0])[1])


# --- grain: pickling, threads, the pipeline --------------------------------------------------


def test_sources_pickle_and_read_alike_from_many_threads(corpus):
  root, _ = corpus
  for name, source, _ in _sources(root):
    serial = [source[i] for i in range(len(source))]
    copy = pickle.loads(pickle.dumps(source))  # what grain does for its worker processes
    assert [copy[i] for i in range(len(copy))] == serial, name
    # grain's reader threads share one source (ReadOptions.num_threads).
    order = list(np.random.default_rng(0).permutation(np.tile(np.arange(len(source)), 8)))
    with futures.ThreadPoolExecutor(8) as pool:
      assert list(pool.map(copy.__getitem__, order)) == [serial[i] for i in order], name


def _web_config(root):
  c = tiny_config()
  c.data.sources = {
      "docs": dict(kind="parquet", weight=0.5, paths=str(root / "obelics-*.parquet"),
                   eval_paths=str(root / "obelics-1.parquet"), image_root=str(root)),
      "chat": dict(kind="webdataset", weight=0.5, paths=str(root / "wds-{000..002}.tar"),
                   eval_paths=str(root / "wds-001.tar")),
  }
  return c


def test_config_makes_the_sources(corpus):
  root, _ = corpus
  c = _web_config(root)
  train = mixture.make_source("docs", c.data.sources.docs, c, "train")
  assert isinstance(train, sources.ParquetSource) and len(train) == 3
  assert len(mixture.make_source("docs", c.data.sources.docs, c, "eval")) == 1
  assert len(mixture.make_source("chat", c.data.sources.chat, c, "eval")) == 2
  multi = mixture.make_source("m", dict(kind="parquet", paths=str(root / "multi.parquet"), image_root=str(root),
                                        fields=dict(conversations="dialog", images="pictures")), c, "train")
  assert records.decode(multi[0])["kind"] == "multi_image"
  with pytest.raises(ValueError, match="sources.chat: kind='webdataset' needs eval_paths"):
    mixture.make_source("chat", dict(kind="webdataset", paths=str(root / "wds-000.tar")), c, "eval")
  # The mixture draws from both.
  kinds = {records.decode(mixture.mixed_records(c, "train")[i])["kind"] for i in range(30)}
  assert {"interleaved", "caption"} <= kinds


def test_mixture_trains_and_resumes(corpus, tok):
  root, _ = corpus
  c = _web_config(root)
  it = iter(dp.make_train_dataset(c, tok))
  batches = [next(it) for _ in range(2)]
  assert all(int(b["num_skipped"].sum()) == 0 for b in batches)  # every record here is good
  assert all(int(b["segment_ids"].max(axis=1).sum()) >= c.train.batch_size for b in batches)
  state = it.get_state()
  expected = next(it)
  fresh = iter(dp.make_train_dataset(c, tok))
  fresh.set_state(state)
  got = next(fresh)
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  # Two training steps on these batches.
  setup = setup_on(c, dict(data=2, fsdp=1, tensor=1, expert=1), jax.devices()[:2])
  train_state = state_lib.init_state(setup)
  step = step_lib.jit_train_step(setup)
  for batch in batches:
    batch = {k: v for k, v in batch.items() if k not in packing.COUNT_FIELDS}
    train_state, metrics = step(train_state, place(setup, batch))
    assert np.isfinite(float(metrics["loss"]))


# --- converter -------------------------------------------------------------------------------


def test_convert_parquet_and_webdataset(corpus, tmp_path):
  root, _ = corpus
  for name, source, samples in [s for s in _sources(root) if s[0] != "multi"]:
    kwargs = dict(webdataset=source.paths) if name == "wds" else dict(parquet=source.paths, image_root=str(root))
    summary = convert.convert(None, str(tmp_path / name / "out"), shards=2, **kwargs)
    assert summary["format"] == ("webdataset" if name == "wds" else "parquet")
    assert summary["items"] == summary["records"] == len(samples) and summary["skipped"] == 0
    written = sources.ArrayRecordSource(str(tmp_path / name / "out"))
    assert [written[i] for i in range(len(written))] == [source[i] for i in range(len(source))], name


def test_convert_cli_inputs_and_skips(corpus, tmp_path):
  root, _ = corpus
  tar = root / "wds-{000..002}.tar"
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.convert", f"--webdataset={tar}", f"--out={tmp_path / 'w'}", "--shards=2"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  summary = json.loads(result.stdout)
  assert summary["source"] == str(tar) and summary["records"] == 6 and summary["records_per_shard"] == [3, 3]
  written = sources.ArrayRecordSource(str(tmp_path / "w"))
  assert [records.decode(written[i])["kind"] for i in range(6)] == \
         [SAMPLES[n]["kind"] for n in ["p0", "c0", "c3", "p1", "c2", "c1"]]
  # --fields, a URL row skipped and counted, two --parquet flags (an unquoted brace pattern, shell-expanded).
  strings = pa.list_(pa.string())
  _write_parquet(tmp_path / "web.parquet", dict(words=[["x", None], ["y", None]],
                                                imgs=[[None, "img/d0.png"], [None, "http://x/y.png"]]),
                 dict(words=strings, imgs=strings), 1)
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.convert", f"--parquet={tmp_path / 'web.parquet'}",
       f"--parquet={root / 'obelics-1.parquet'}", "--fields=texts=words,images=imgs", f"--image_root={root}",
       f"--out={tmp_path / 'p'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "obelics-1.parquet: no column 'words'" in result.stderr
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.convert", f"--parquet={tmp_path / 'web.parquet'}",
       "--fields=texts=words,images=imgs", f"--image_root={root}", f"--out={tmp_path / 'p'}"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  summary = json.loads(result.stdout)
  assert summary["items"] == 2 and summary["records"] == 1 and summary["skipped_by_reason"] == {"CorruptImage": 1}
  assert "'http://x/y.png' is a URL" in summary["skipped_examples"][0]
  written = sources.ArrayRecordSource(str(tmp_path / "p"))
  assert len(written) == 1 and records.decode(written[0])["messages"] == _text(f"x{M}")
