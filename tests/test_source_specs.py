"""The specs of config.data.sources: one builder per kind, every key checked, and the same key
names (`paths`, `eval_paths`) for every file kind, JSONL's old names still read with a warning.
"""

import json
import os
import pickle
import re

import ml_collections
import pytest

from data_pipelines import mixture, records, sources
from mm15_jax import configs
from mm15_jax.train.config_checks import check_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ml_collections.ConfigDict(dict(seed=0))  # what the file kinds read of a config: nothing required


def _jsonl(path, texts):
  lines = [dict(kind="text", messages=[{"role": "text", "content": text}]) for text in texts]
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  return str(path)


def _texts(source):
  return [records.decode(source[i])["messages"][0]["content"] for i in range(len(source))]


@pytest.fixture
def files(tmp_path):
  return _jsonl(tmp_path / "a.jsonl", ["a0", "a1"]), _jsonl(tmp_path / "b.jsonl", ["b0", "b1", "b2"])


def test_every_kind_the_docs_name_has_a_builder_and_its_keys():
  with open(os.path.join(REPO, "README.md")) as f:
    documented = set(re.findall(r'dict\(kind="(\w+)"', f.read()))
  assert documented == set(sources.KINDS) == set(sources.SPEC_KEYS)
  assert set(re.findall(r'dict\(kind="(\w+)"', mixture.__doc__)) == set(sources.KINDS)
  for kind, keys in sources.SPEC_KEYS.items():
    assert callable(sources.KINDS[kind]) and {"kind", "weight"} <= set(keys), kind
  file_kinds = {"array_record", "jsonl", "parquet", "webdataset"}
  assert all({"paths", "eval_paths"} <= set(sources.SPEC_KEYS[kind]) for kind in file_kinds)


@pytest.mark.parametrize("kind, typo, suggested", [
    ("jsonl", "eval_pths", "eval_paths"),
    ("parquet", "image_roots", "image_root"),
    ("webdataset", "feilds", "fields"),
    ("array_record", "path", "paths"),  # only JSONL had `path`
    ("tfds", "eval_splits", "eval_split"),
    ("builtin", "tasks", "task"),
])
def test_an_unknown_key_is_named_with_the_closest_key(kind, typo, suggested):
  spec = dict(kind=kind, weight=1.0, paths="/nonexistent/x", **{typo: "y"})
  if kind in ("tfds", "builtin"):
    del spec["paths"]
  # Refused before any file is read (the paths do not exist).
  with pytest.raises(ValueError, match=rf"config\.data\.sources\.src\.{typo}: not a key of kind='{kind}' "
                                       rf"\(did you mean '{suggested}'\?\); its keys are \["):
    mixture.make_source("src", spec, CONFIG, "train")


def test_a_key_of_another_kind_lists_the_keys():
  with pytest.raises(ValueError, match=r"sources\.chat\.layout: not a key of kind='webdataset'; its keys are "
                                       r"\['eval_paths', 'fields', 'kind', 'paths', 'weight'\]"):
    sources.validate_spec("chat", dict(kind="webdataset", paths="x.tar", layout="interleaved"))


def test_an_unknown_kind_names_the_kinds_and_the_closest():
  with pytest.raises(ValueError, match=r"config\.data\.sources\.x\.kind='parqet': expected one of \['builtin', "
                                       r".*'webdataset'\] \(did you mean 'parquet'\?\)"):
    mixture.make_source("x", dict(kind="parqet", paths="/nonexistent/x"), CONFIG, "train")


def test_jsonl_paths_are_a_file_a_list_or_a_glob(files, tmp_path):
  a, b = files
  one = mixture.make_source("mine", dict(kind="jsonl", paths=a, eval_paths=b), CONFIG, "train")
  assert isinstance(one, sources.JsonlSource) and _texts(one) == ["a0", "a1"]
  assert _texts(mixture.make_source("mine", dict(kind="jsonl", paths=a, eval_paths=b), CONFIG, "eval")) == [
      "b0", "b1", "b2"]
  both = mixture.make_source("mine", dict(kind="jsonl", paths=[b, a]), CONFIG, "train")  # in the order named
  assert isinstance(both, sources.JsonlFiles) and _texts(both) == ["b0", "b1", "b2", "a0", "a1"]
  assert _texts(pickle.loads(pickle.dumps(both))) == _texts(both)  # grain's worker processes
  with pytest.raises(IndexError):
    both[5]
  glob = mixture.make_source("mine", dict(kind="jsonl", paths=str(tmp_path / "*.jsonl")), CONFIG, "train")
  assert _texts(glob) == ["a0", "a1", "b0", "b1", "b2"]
  with pytest.raises(ValueError, match=r"config\.data\.sources\.mine: kind='jsonl' needs eval_paths"):
    mixture.make_source("mine", dict(kind="jsonl", paths=a), CONFIG, "eval")


def test_jsonl_old_key_names_still_work_and_warn(files, caplog):
  a, b = files
  spec = dict(kind="jsonl", weight=1.0, path=a, eval_path=b)
  assert _texts(mixture.make_source("mine", spec, CONFIG, "train")) == ["a0", "a1"]
  assert "config.data.sources.mine.path is deprecated: name it paths" in caplog.text
  assert _texts(mixture.make_source("mine", spec, CONFIG, "eval")) == ["b0", "b1", "b2"]
  assert "config.data.sources.mine.eval_path is deprecated: name it eval_paths" in caplog.text


@pytest.mark.parametrize("old, new", [("path", "paths"), ("eval_path", "eval_paths")])
def test_jsonl_old_and_new_name_together_is_an_error(files, old, new):
  a, b = files
  with pytest.raises(ValueError, match=rf"config\.data\.sources\.mine: give {new} only, not both {new} and {old}"):
    mixture.make_source("mine", {"kind": "jsonl", "paths": a, old: b, new: b}, CONFIG, "train")


def test_a_config_with_several_jsonl_files_mixes(files):
  from tiny_setup import tiny_config

  a, b = files
  c = tiny_config()
  c.data.sources = {"mine": dict(kind="jsonl", weight=1.0, paths=[a, b], eval_paths=[b])}  # ConfigDict specs
  assert [records.decode(mixture.mixed_records(c, "eval")[i])["messages"][0]["content"] for i in range(4)] == [
      "b0", "b1", "b2", "b0"]  # eval is read in order, repeated
  train = mixture.mixed_records(c, "train")
  assert {records.decode(train[i])["messages"][0]["content"] for i in range(5)} == {"a0", "a1", "b0", "b1", "b2"}


def test_the_config_check_names_a_misspelled_source_key_before_anything_runs():
  c = configs.load_experiment(os.path.join(REPO, "experiments", "tiny.py"))
  c.data.sources["refer"]["wieght"] = 0.5
  with pytest.raises(ValueError, match=r"invalid config:\n  config\.data\.sources\.refer\.wieght: not a key of "
                                       r"kind='builtin' \(did you mean 'weight'\?\)"):
    check_config(c, paths=False)
