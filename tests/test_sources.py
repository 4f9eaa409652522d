"""Records, sources and the JSONL -> ArrayRecord converter.

References are hand-written records and the arrays the test itself drew; images are
compared pixel for pixel (PNG) or byte for byte (embedded files).
"""

import io
import json
import os
import pickle
import re
import subprocess
import sys
from concurrent import futures

import grain
import numpy as np
import PIL.Image
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data_pipelines import convert, corpus_formats, records, sources

M = records.IMAGE_MARKER
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(array) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _jpeg(array) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _records():
  """One hand-written record per kind (and a text-only conversation)."""
  return [
      dict(kind="caption", messages=[{"role": "text", "content": f"{M}A red square."}],
           images=[_image(5, 7, 0)], category="caption", coords="none"),
      dict(kind="interleaved", messages=[{"role": "text", "content": f"Start {M} middle {M}"},
                                         {"role": "text", "content": f"end {M}."}],
           images=[_image(3, 4, 1), _image(6, 2, 2), _image(1, 1, 3)], category="", coords="none"),
      dict(kind="conversation", messages=[{"role": "user", "content": f"{M}\nWhere is the dog?"},
                                          {"role": "assistant", "content": "[10, 20, 300, 400]"},
                                          {"role": "user", "content": "And the cat?"},
                                          {"role": "assistant", "content": "[1, 2, 3, 4]"}],
           images=[_image(9, 4, 4)], category="refer_ground", coords="image"),
      dict(kind="multi_image", messages=[{"role": "user", "content": f"{M}{M} Same colour?"},
                                         {"role": "assistant", "content": "No."}],
           images=[_image(4, 4, 5), _image(8, 3, 6)], category="general", coords="none"),
      dict(kind="text", messages=[{"role": "text", "content": "Plain document."}],
           images=[], category="", coords="none"),
      dict(kind="text", messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
           images=[], category="math", coords="none"),
  ]


def _assert_same(got, want):
  assert {k: got[k] for k in ("kind", "messages", "category", "coords")} == \
         {k: want.get(k, d) for k, d in (("kind", None), ("messages", None), ("category", ""), ("coords", "none"))}
  assert len(got["images"]) == len(want["images"])
  for g, w in zip(got["images"], want["images"]):
    assert g.dtype == np.uint8 and g.shape == w.shape
    np.testing.assert_array_equal(g, w)


# --- records ------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(6))
def test_round_trip_every_kind(index):
  record = _records()[index]
  data = records.encode(record)
  assert isinstance(data, bytes)
  _assert_same(records.decode(data), record)
  raw = records.decode(data, decode_images=False)
  assert all(isinstance(im, bytes) and im.startswith(b"\x89PNG") for im in raw["images"])


def test_encoded_bytes_are_kept_and_defaults_filled():
  jpeg = _jpeg(_image(16, 12, 7))
  data = records.encode(dict(kind="caption", messages=[{"role": "text", "content": f"{M}x"}], images=[jpeg]))
  raw = records.decode(data, decode_images=False)
  assert raw["images"] == [jpeg] and raw["category"] == "" and raw["coords"] == "none"
  assert records.decode(data)["images"][0].shape == (16, 12, 3)


def test_decode_image_modes():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  buffer = io.BytesIO()
  PIL.Image.fromarray(gray, mode="L").save(buffer, format="PNG")
  np.testing.assert_array_equal(records.decode_image(buffer.getvalue()), np.repeat(gray[..., None], 3, axis=2))
  rgba = np.concatenate([_image(2, 3, 8), np.full((2, 3, 1), 7, np.uint8)], axis=2)
  buffer = io.BytesIO()
  PIL.Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
  np.testing.assert_array_equal(records.decode_image(buffer.getvalue()), rgba[..., :3])


def _bad(record_update=None, messages=None, **kw):
  record = dict(kind="conversation", messages=[{"role": "user", "content": f"{M}q"},
                                               {"role": "assistant", "content": "a"}],
                images=[_image(2, 2, 0)], category="", coords="none")
  if messages is not None:
    record["messages"] = messages
  record.update(kw)
  return record


@pytest.mark.parametrize("record,field", [
    ("not a dict", "record"),
    ({k: v for k, v in _bad().items() if k != "kind"}, "kind"),
    ({k: v for k, v in _bad().items() if k != "messages"}, "messages"),
    (_bad(kind="video"), "kind"),
    (_bad(extra=1), "extra"),
    (_bad(messages=[]), "messages"),
    (_bad(messages=[{"role": "user"}]), r"messages\[0\]"),
    (_bad(messages=[{"role": "user", "content": f"{M}q"}, {"role": "bot", "content": "a"}]), r"messages\[1\]\.role"),
    (_bad(messages=[{"role": "user", "content": f"{M}q"}, {"role": "assistant", "content": 3}]),
     r"messages\[1\]\.content"),
    (_bad(messages=[{"role": "user", "content": f"{M}q"}]), r"messages\[0\]\.role"),  # ends with user
    (_bad(messages=[{"role": "assistant", "content": f"{M}q"}]), r"messages\[0\]\.role"),
    (_bad(kind="caption", messages=[{"role": "user", "content": f"{M}q"}]), r"messages\[0\]\.role"),
    (_bad(images=[np.zeros((2, 2, 3), np.float32)]), r"images\[0\]"),
    (_bad(images=[np.zeros((2, 2), np.uint8)]), r"images\[0\]"),
    (_bad(images=["a.png"]), r"images\[0\]"),
    (_bad(images="x"), "images"),
    (_bad(images=[_image(2, 2, 0), _image(2, 2, 1)]), "images"),  # conversation: one image
    (_bad(kind="multi_image", images=[_image(2, 2, 0)]), "images"),
    (_bad(kind="multi_image", images=[_image(2, 2, 0), _image(2, 2, 1)]), "messages"),  # 1 marker, 2 images
    (_bad(messages=[{"role": "user", "content": f"{M}{M}q"}, {"role": "assistant", "content": "a"}]), "messages"),
    (_bad(category=3), "category"),
    (_bad(coords="canvas"), "coords"),
    (_bad(kind="text", images=[], messages=[{"role": "text", "content": "x"}], coords="image"), "coords"),
])
def test_validation_names_the_field(record, field):
  with pytest.raises(records.MalformedRecord, match=rf"^{field}: "):
    records.validate(record)
  with pytest.raises(records.MalformedRecord, match=rf"^{field}: "):
    records.encode(record)


def test_decode_or_skip_never_raises():
  good = _png(_image(4, 4, 0))
  cases = {
      b"": "MalformedRecord: record",
      b"\xc1\xc1garbage": "MalformedRecord: record",
      records.encode(dict(kind="text", messages=[{"role": "text", "content": "x"}])) + b"junk": "MalformedRecord",
      records.encode(_bad(images=[b"not an image"])): "CorruptImage: images[0]",
      records.encode(_bad(images=[good[: len(good) // 2]])): "CorruptImage: images[0]",  # truncated PNG
      records.encode_error("x.jsonl line 3: bad JSON"): "MalformedRecord: x.jsonl line 3: bad JSON",
      records.encode_error("images[0]: cannot read", corrupt_image=True): "CorruptImage: images[0]",
  }
  for data, prefix in cases.items():
    record, reason = records.decode_or_skip(data)
    assert record is None and reason.startswith(prefix), (data[:20], reason)
  # A wrong marker count hidden in the bytes (written by another tool) is caught on decode.
  import msgpack
  data = msgpack.packb(dict(kind="caption", messages=[{"role": "text", "content": "no marker"}], images=[good],
                            category="", coords="none"), use_bin_type=True)
  assert records.decode_or_skip(data)[1].startswith("MalformedRecord: messages: 0 <image> marker(s)")
  # Without image decoding, a corrupt image passes (only structure is checked).
  assert records.decode_or_skip(records.encode(_bad(images=[b"xx"])), decode_images=False)[1] is None


# --- JSONL + converter + ArrayRecord --------------------------------------------------------


@pytest.fixture(scope="module")
def jsonl_data(tmp_path_factory):
  """A JSONL file with good lines of every kind and five bad ones, plus expected outcomes."""
  root = tmp_path_factory.mktemp("jsonl")
  (root / "img").mkdir()
  arrays = {f"img/{i}.png": _image(3 + i, 9 - i, 100 + i) for i in range(6)}
  for name, array in arrays.items():
    (root / name).write_bytes(_png(array))
  jpeg = _jpeg(_image(10, 6, 200))
  (root / "img/photo.jpg").write_bytes(jpeg)
  (root / "img/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
  whole = _png(_image(20, 20, 300))
  (root / "img/truncated.png").write_bytes(whole[: len(whole) - 40])

  def conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

  good = [  # (json line, expected decoded images as arrays or raw file bytes)
      (dict(kind="caption", messages=[{"role": "text", "content": f"{M}Caption."}], images=["img/0.png"],
            category="caption", id="keep-ignored"), ["img/0.png"]),
      (dict(kind="conversation", messages=conv(f"{M}\nBox of the cat?", "[1, 2, 30, 40]"), images=["img/1.png"],
            category="refer_ground", coords="image"), ["img/1.png"]),
      (dict(kind="multi_image", messages=conv(f"{M} vs {M}?", "left"), images=["img/2.png", "img/3.png"]),
       ["img/2.png", "img/3.png"]),
      (dict(kind="interleaved", messages=[{"role": "text", "content": f"a {M} b {M}"}],
            images=["img/4.png", "img/photo.jpg"]), ["img/4.png", "img/photo.jpg"]),
      (dict(kind="text", messages=[{"role": "text", "content": "Only text."}]), []),
      (dict(kind="text", messages=conv("hi", "hello")), []),
      (dict(kind="caption", messages=[{"role": "text", "content": f"{M}Again."}], images=["img/5.png"]),
       ["img/5.png"]),
  ]
  bad = [  # (raw line, expected reason prefix)
      ('{"kind": "caption", "messages": [', "MalformedRecord: data.jsonl line {}: bad JSON"),
      (json.dumps(dict(kind="caption", messages=[{"role": "text", "content": f"{M}x"}], images=["img/nope.png"])),
       "CorruptImage: data.jsonl line {}: images[0]: cannot read 'img/nope.png'"),
      (json.dumps(dict(kind="caption", messages=[{"role": "text", "content": f"{M}x"}], images=["img/corrupt.png"])),
       "CorruptImage: images[0]: cannot decode image"),
      (json.dumps(dict(kind="caption", messages=[{"role": "text", "content": f"{M}x"}],
                       images=["img/truncated.png"])), "CorruptImage: images[0]: cannot decode image"),
      (json.dumps(dict(kind="multi_image", messages=conv(f"{M} only one marker", "a"),
                       images=["img/2.png", "img/3.png"])), "MalformedRecord: data.jsonl line {}: messages: 1 <image>"),
      ("[1, 2]", "MalformedRecord: data.jsonl line {}: record: expected a JSON object"),
  ]
  # Interleave: good, bad, good, ... then the remaining good ones; a blank line in the middle.
  lines, expected = [], []
  order = [("g", 0), ("b", 0), ("g", 1), ("b", 1), ("g", 2), ("b", 2), ("blank", None), ("g", 3), ("b", 3),
           ("g", 4), ("b", 4), ("g", 5), ("b", 5), ("g", 6)]
  for tag, i in order:
    if tag == "blank":
      lines.append("   ")
      continue
    line_number = len(lines) + 1
    if tag == "g":
      line, image_names = good[i]
      lines.append(json.dumps(line))
      want = {k: v for k, v in line.items() if k != "id"}
      want["images"] = [arrays[n] if n in arrays else records.decode_image(jpeg) for n in image_names]
      want["files"] = [(root / n).read_bytes() for n in image_names]
      expected.append(("ok", want))
    else:
      raw, reason = bad[i]
      lines.append(raw)
      expected.append(("bad", reason.format(line_number)))
  (root / "data.jsonl").write_text("\n".join(lines) + "\n\n")
  return root, expected


def test_jsonl_source_items(jsonl_data):
  root, expected = jsonl_data
  source = sources.JsonlSource(str(root / "data.jsonl"))  # image_root defaults to the file's folder
  assert len(source) == len(expected)  # blank lines are not records
  source = pickle.loads(pickle.dumps(source))
  for i, (status, want) in enumerate(expected):
    record, reason = records.decode_or_skip(source[i])
    if status == "ok":
      assert reason is None, reason
      _assert_same(record, want)
    else:
      assert record is None and reason.startswith(want), (reason, want)
      if "line" not in reason:  # found only when decoded: the item itself says where it was read
        assert re.fullmatch(r"data\.jsonl line \d+", source[i].where), source[i].where
  with pytest.raises(IndexError):
    source[len(expected)]


def test_jsonl_source_reads_alike_from_many_threads(tmp_path):
  """grain reads a source from 16 threads by default; a shared seek + read mixed lines up."""
  lines = [json.dumps(dict(kind="text", messages=[{"role": "text", "content": f"line {i} " + "x" * (i % 50)}]))
           for i in range(2000)]
  (tmp_path / "many.jsonl").write_text("\n".join(lines) + "\n")
  serial = [records.encode(json.loads(line)) for line in lines]
  for _ in range(5):  # a shared file position failed about 4 passes in 5
    source = sources.JsonlSource(str(tmp_path / "many.jsonl"))
    with futures.ThreadPoolExecutor(16) as pool:
      assert list(pool.map(source.__getitem__, range(len(source)))) == serial


def test_jsonl_source_first_reads_race_safely(tmp_path):
  """Threads racing to open a fresh source's file: the handle that loses the race must not be
  closed under a thread still reading through it (that failed about 1 source in 100)."""
  lines = [json.dumps(dict(kind="text", messages=[{"role": "text", "content": f"line {i}"}])) for i in range(64)]
  (tmp_path / "few.jsonl").write_text("\n".join(lines) + "\n")
  serial = [records.encode(json.loads(line)) for line in lines]
  with futures.ThreadPoolExecutor(16) as pool:
    for _ in range(500):
      source = sources.JsonlSource(str(tmp_path / "few.jsonl"))
      assert list(pool.map(source.__getitem__, range(len(source)))) == serial


def _read_shard(path):
  reader = ArrayRecordReader(path)
  items = reader.read_all() if reader.num_records() else []
  reader.close()
  return list(items)


def test_convert_then_array_record_source(jsonl_data, tmp_path):
  root, expected = jsonl_data
  good = [want for status, want in expected if status == "ok"]
  summary = convert.convert(str(root / "data.jsonl"), str(tmp_path / "out/sft"), shards=3, image_root=str(root))
  assert summary["format"] == "jsonl" and summary["items"] == 13 and summary["records"] == 7 and summary["skipped"] == 6
  assert summary["skipped_by_reason"] == {"MalformedRecord": 3, "CorruptImage": 3}
  assert summary["kinds"] == {"caption": 2, "conversation": 1, "interleaved": 1, "multi_image": 1, "text": 2}
  # 13 non-blank lines, shard = index * 3 // 13: indices 0-4 | 5-8 | 9-12; the good lines
  # are the even indices, so 0, 2, 4 | 6, 8 | 10, 12.
  assert summary["records_per_shard"] == [3, 2, 2]
  files = sorted(os.listdir(tmp_path / "out"))
  assert files == ["sft-00000-of-00003.array_record", "sft-00001-of-00003.array_record",
                   "sft-00002-of-00003.array_record", "sft.index.json"]  # no temporaries left
  assert json.loads((tmp_path / "out/sft.index.json").read_text()) == summary

  shards = [_read_shard(str(tmp_path / "out" / name)) for name in summary["shards"]]
  assert [len(s) for s in shards] == [3, 2, 2]
  for source in (sources.ArrayRecordSource(str(tmp_path / "out/sft")),
                 sources.ArrayRecordSource(str(tmp_path / "out/sft-*.array_record")),
                 sources.ArrayRecordSource([str(tmp_path / "out" / n) for n in summary["shards"]])):
    assert len(source) == 7
    # Global indices address the shards' records disjointly, in shard order.
    assert [source[i] for i in range(7)] == [item for shard in shards for item in shard]
    assert len(set(source[i] for i in range(7))) == 7
  source = pickle.loads(pickle.dumps(source))
  for i, want in enumerate(good):
    _assert_same(records.decode(source[i]), want)
    assert records.decode(source[i], decode_images=False)["images"] == want["files"]  # embedded as is

  # Through grain, decoding in the map stage.
  ds = grain.MapDataset.source(source).map(records.decode_or_skip)
  assert [r["kind"] for r, reason in ds] == [w["kind"] for w in good]


def test_convert_in_parallel_writes_the_same_bytes(jsonl_data, tmp_path, capsys):
  """--num_workers converts shards in worker processes: shards and index equal the serial run's,
  and the log shows the progress."""
  root, _ = jsonl_data
  serial = convert.convert(str(root / "data.jsonl"), str(tmp_path / "a/sft"), shards=3, image_root=str(root))
  parallel = convert.convert(str(root / "data.jsonl"), str(tmp_path / "b/sft"), shards=3, image_root=str(root),
                             num_workers=2)
  assert parallel == serial and sorted(os.listdir(tmp_path / "b")) == sorted(os.listdir(tmp_path / "a"))
  for name in os.listdir(tmp_path / "a"):
    assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
  assert "convert: 13/13 items (100%)" in capsys.readouterr().err  # stderr is not a terminal here


def test_convert_more_shards_than_records_and_cli(jsonl_data, tmp_path):
  root, _ = jsonl_data
  lines = (root / "data.jsonl").read_text().splitlines()[:3]  # good, bad, good
  (tmp_path / "small.jsonl").write_text("\n".join(lines) + "\n")
  out = tmp_path / "ar" / "small"
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.convert", f"--jsonl={tmp_path / 'small.jsonl'}",
       f"--image_root={root}", f"--out={out}", "--shards=5"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  summary = json.loads(result.stdout)
  assert summary["records"] == 2 and summary["skipped"] == 1 and summary["records_per_shard"] == [1, 0, 0, 1, 0]
  source = sources.ArrayRecordSource(str(out))
  assert len(source) == 2 and [records.decode(source[i])["kind"] for i in range(2)] == ["caption", "conversation"]


def test_an_array_record_that_fails_to_decode_is_reported_with_its_shard_and_index(tmp_path):
  from tiny_setup import tiny_config

  from data_pipelines import mixture
  from data_pipelines import tokenizer as tokenizer_lib
  from data_pipelines.sequence import ExampleBuilder

  path = str(tmp_path / "sft-00000-of-00001.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  good = records.encode(_records()[0])
  for data in (good, b"not a record", good):
    writer.write(data)
  writer.close()
  source = sources.ArrayRecordSource(path)
  assert bytes(source[1]) == b"not a record" and pickle.loads(pickle.dumps(source[1])).where == f"{path} record 1"
  c = tiny_config()
  to_example = mixture.ToExample(ExampleBuilder.from_config(c, tokenizer_lib.load_tokenizer(c.model.llm.vocab_size)))
  assert "drop_note" not in to_example(source[0])
  bad = to_example(source.__getitems__([2, 1])[1])
  assert bad["skipped"] == 1 and bad["drop_note"].startswith(f"{path} record 1: MalformedRecord"), bad["drop_note"]


def test_convert_failure_leaves_nothing(jsonl_data, tmp_path, monkeypatch):
  root, _ = jsonl_data
  calls = []

  def explode(self, index):
    calls.append(index)
    if index == 4:
      raise RuntimeError("disk on fire")
    return records.encode(_records()[4])

  monkeypatch.setattr(sources.JsonlSource, "__getitem__", explode)
  with pytest.raises(RuntimeError, match="disk on fire"):
    convert.convert(str(root / "data.jsonl"), str(tmp_path / "sft"), shards=2)
  assert calls == [0, 1, 2, 3, 4] and os.listdir(tmp_path) == []
  with pytest.raises(FileNotFoundError, match="no ArrayRecord files"):
    sources.ArrayRecordSource(str(tmp_path / "sft"))


# --- tfds -----------------------------------------------------------------------------------


def test_tfds_to_record_on_plain_dicts():
  png = _png(_image(3, 3, 1))
  caption = sources.tfds_to_record({"image": png, "caption": b"A cat."}, dict(kind="caption", text="caption"))
  assert caption == dict(kind="caption", messages=[{"role": "text", "content": f"{M}A cat."}], images=[png],
                         category="", coords="none")
  vqa = sources.tfds_to_record(
      {"img": np.array([png, png], dtype=object), "q": np.array(b"Same?", dtype=object),
       "answers": np.array([b"yes", b"no"], dtype=object)},
      dict(kind="multi_image", image="img", question="q", answer="answers", category="general"))
  assert vqa["messages"] == [{"role": "user", "content": f"{M}{M}\nSame?"}, {"role": "assistant", "content": "yes"}]
  assert vqa["images"] == [png, png] and vqa["category"] == "general"
  placed = sources.tfds_to_record({"image": png, "t": f"before {M} after"}, dict(kind="interleaved", text="t"))
  assert placed["messages"][0]["content"] == f"before {M} after"  # markers already there: unchanged
  text = sources.tfds_to_record({"q": "hi", "a": "yo"}, dict(kind="text", image="", question="q", answer="a"))
  assert text["images"] == [] and records.encode(text)
  with pytest.raises(records.MalformedRecord, match="not UTF-8"):
    sources.tfds_to_record({"image": png, "c": b"\xff\xfe"}, dict(kind="caption", text="c"))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A tiny tfds dataset built here, in array_record format; nothing downloaded, no TensorFlow."""
  tfds = pytest.importorskip("tensorflow_datasets")
  tfds.disable_progress_bar()
  arrays = [_image(4 + i, 6 - i, 400 + i) for i in range(4)]

  class Mm15TinyVqa(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      image = tfds.features.Image(shape=(None, None, 3))
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": image, "pair": tfds.features.Sequence(image), "question": tfds.features.Text(),
          "answer": tfds.features.Text(), "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      # Images go in encoded (tfds would need TensorFlow to encode arrays).
      for i in range(4):
        yield i, {"image": io.BytesIO(_png(arrays[i])),
                  "pair": [io.BytesIO(_png(arrays[i])), io.BytesIO(_png(arrays[(i + 1) % 4]))],
                  "question": f"What is {i}?", "answer": f"It is {i}.", "caption": f"Picture {i}."}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  Mm15TinyVqa(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir, arrays


def test_tfds_source(tfds_dir):
  data_dir, arrays = tfds_dir
  vqa = sources.TfdsSource("mm15_tiny_vqa", "train", data_dir, fields=dict(
      kind="conversation", image="image", question="question", answer="answer", category="general"))
  assert len(vqa) == 4
  vqa = pickle.loads(pickle.dumps(vqa))
  got = sorted((records.decode(vqa[i]) for i in range(4)), key=lambda r: r["messages"][1]["content"])
  for i, record in enumerate(got):  # tfds shuffles the stored order; match by answer
    _assert_same(record, dict(kind="conversation", category="general", images=[arrays[i]], messages=[
        {"role": "user", "content": f"{M}\nWhat is {i}?"}, {"role": "assistant", "content": f"It is {i}."}]))
  pairs = sources.TfdsSource("mm15_tiny_vqa", "train", data_dir, fields=dict(
      kind="multi_image", image="pair", question="question", answer="answer"))
  record = records.decode(pairs[0])
  i = int(record["messages"][1]["content"][6])
  _assert_same(record, dict(kind="multi_image", images=[arrays[i], arrays[(i + 1) % 4]], messages=[
      {"role": "user", "content": f"{M}{M}\nWhat is {i}?"}, {"role": "assistant", "content": f"It is {i}."}]))
  captions = sources.TfdsSource("mm15_tiny_vqa", "train", data_dir, fields=dict(kind="caption", text="caption"))
  assert records.decode(captions[0])["messages"][0]["content"].startswith(f"{M}Picture ")
  # A mapping that cannot make a valid record is an error item, not a crash.
  wrong = sources.TfdsSource("mm15_tiny_vqa", "train", data_dir, fields=dict(kind="caption", image="pair",
                                                                             text="caption"))
  assert records.decode_or_skip(wrong[0])[1].startswith("MalformedRecord: tfds mm15_tiny_vqa/train[0]: images:")
  with pytest.raises(ValueError, match="'nope' is not a feature"):
    sources.TfdsSource("mm15_tiny_vqa", "train", data_dir, fields=dict(kind="caption", text="nope"))


def test_a_source_of_only_bad_records_stops_with_the_reasons(tmp_path, caplog):
  """The packer would wait forever for a usable example: the pipeline raises instead, naming the
  reasons with counts and the first records (file and line), and logs the first drops."""
  from tiny_setup import tiny_config

  import data_pipelines as dp

  (tmp_path / "bad.jsonl").write_text("".join('{"kind": "caption", "messages": [\n' for _ in range(50)))
  c = tiny_config()
  c.data.sources = {"bad": dict(kind="jsonl", weight=1.0, path=str(tmp_path / "bad.jsonl"))}
  ds = dp.make_train_dataset(c, dp.load_tokenizer(c.model.llm.vocab_size))
  with pytest.raises(RuntimeError, match=r"the last 1000 records were all dropped.*malformed 1000") as e:
    next(iter(ds))
  assert re.search(r"First dropped: MalformedRecord: bad.jsonl line \d+: bad JSON", str(e.value))
  assert len(re.findall(r"dropped a record \(malformed\): MalformedRecord: bad.jsonl line \d+", caplog.text)) == 5


def test_drop_guard_counts_runs_of_drops_only():
  from data_pipelines import packing, sequence

  guard = packing.DropGuard(limit=3)
  bad = dict(drop_reason=np.int32(sequence.MALFORMED), drop_note="x.jsonl line 2: bad JSON")
  good = dict(drop_reason=np.int32(0))
  for ex in (bad, bad, good, bad, bad, good):  # never 3 drops in a row
    assert "drop_note" not in guard(ex)
  guard(bad), guard(bad)
  with pytest.raises(RuntimeError, match="malformed 7"):
    guard(bad)


@pytest.mark.parametrize("rel", ["ABSOLUTE", "../outside.png", "img/../../outside.png"])
def test_image_paths_stay_under_the_image_root(tmp_path, rel):
  """A record naming a file outside its image root is a skipped record with the reason, unless
  the source allows absolute paths (and then only absolute ones)."""
  (tmp_path / "outside.png").write_bytes(_png(_image(4, 4, 1)))
  rel = str(tmp_path / "outside.png") if rel == "ABSOLUTE" else rel
  (tmp_path / "data").mkdir()
  line = json.dumps({"kind": "conversation", "images": [rel],
                     "messages": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]})
  (tmp_path / "data" / "d.jsonl").write_text(line + "\n")
  item = sources.JsonlSource(str(tmp_path / "data" / "d.jsonl"))[0]
  record, reason = records.decode_or_skip(item)
  assert record is None and "d.jsonl line 1: images[0]" in reason and "image root" in reason, reason
  if rel.startswith("/"):
    item = sources.JsonlSource(str(tmp_path / "data" / "d.jsonl"), allow_absolute_paths=True)[0]
    record, reason = records.decode_or_skip(item)
    assert reason is None and record["images"][0].shape == (4, 4, 3)
  cell = {"bytes": None, "path": rel}
  with pytest.raises(records.MalformedRecord, match="image root"):
    corpus_formats.image_bytes(cell, str(tmp_path / "data"), "images[0]")


def test_convert_of_a_file_without_one_good_record_is_an_error(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"kind": "nope"}\n[1]\n')
  with pytest.raises(ValueError, match=r"none of its 2 items is a usable record .*first: \["):
    convert.convert(str(tmp_path / "bad.jsonl"), str(tmp_path / "out" / "x"), shards=2)
  assert not list((tmp_path / "out").glob("x*"))  # no shards, no index


def test_a_corrupt_image_reason_says_what_failed_without_object_reprs():
  with pytest.raises(records.CorruptImage) as e:
    records.decode_image(b"not an image at all")
  assert "cannot decode image (19 bytes)" in str(e.value) and "BytesIO" not in str(e.value), str(e.value)
