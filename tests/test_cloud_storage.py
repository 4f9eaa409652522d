"""Workdirs and data in a bucket (gs://), against a GCS emulator on 127.0.0.1 (gcs_emulator.py).

The journey: the quick-start config trained with --workdir=gs://BUCKET/run on a mixture whose
JSONL + images and Parquet sources are in the bucket, stopped by SIGTERM and relaunched, keeping
a best checkpoint, then loaded with load_model("gs://BUCKET/run"), exported and imported.
The reference is the same run, uninterrupted, in a local folder: the same losses at every
step and the same params. Data sources in the bucket read the same items as the local files.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath
from gcs_emulator import running
from test_multiprocess import ROOT, finish, single_process
from test_web_sources import _sources, corpus  # noqa: F401  (corpus: a fixture)

from data_pipelines import sources, storage
from mm15_jax import checkpoint as ckpt_lib
from mm15_jax import checkpoint_integrity as integrity
from mm15_jax import inference, run_record

STEPS = 6
RUN = [f"--config.train.steps={STEPS}", "--config.checkpoint.every=2", "--config.eval.every=2",
       "--config.eval.best_metric=loss", "--config.train.warmup_steps=2", "--config.profile.steps=(4, 5)"]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  with running("mm15-test", str(tmp_path_factory.mktemp("emulator"))) as url:
    yield url


def rows(workdir, kind=None):
  text = storage.read_text(storage.join(workdir, "metrics.jsonl"))
  return [r for r in map(json.loads, filter(str.strip, text.splitlines())) if r.get("kind") == kind]


def test_storage_in_a_bucket(bucket):
  root = f"{bucket}/storage"
  for name in ("a-1.jsonl", "a-2.jsonl", "b.txt", "sub/c.png"):
    storage.write_text_atomic(f"{root}/{name}", name)
  assert storage.glob(f"{root}/a-*.jsonl") == [f"{root}/a-1.jsonl", f"{root}/a-2.jsonl"]
  assert storage.glob(f"{root}/sub/*.png") == [f"{root}/sub/c.png"] and storage.glob(f"{root}/x*") == []
  assert storage.listdir(root) == ["a-1.jsonl", "a-2.jsonl", "b.txt", "sub"]
  assert storage.isdir(f"{root}/sub") and storage.isfile(f"{root}/b.txt") and not storage.exists(f"{root}/none")
  assert storage.read_text(f"{root}/b.txt") == "b.txt" and storage.dirname(f"{root}/b.txt") == root
  # A bucket has no appends: the file is rewritten whole, keeping what an earlier run wrote.
  for lines in (["1\n", "2\n"], ["3\n"]):
    log = storage.Appender(f"{root}/log.jsonl")
    for line in lines:
      log.write(line)
      log.flush()
    log.close()
  assert storage.read_text(f"{root}/log.jsonl") == "1\n2\n3\n"
  # Uploads are rate-limited (a long run would re-upload its history each step), forced on request.
  log = storage.Appender(f"{root}/log.jsonl", upload_every_s=3600)
  log.write("4\n")
  log.flush()  # the first upload is due at once
  log.write("5\n")
  log.flush()
  assert storage.read_text(f"{root}/log.jsonl") == "1\n2\n3\n4\n"
  log.flush(force=True)
  assert storage.read_text(f"{root}/log.jsonl") == "1\n2\n3\n4\n5\n"
  log.write("6\n")
  log.close()
  assert storage.read_text(f"{root}/log.jsonl").endswith("5\n6\n")
  storage.rmtree(f"{root}/sub")
  assert not storage.exists(f"{root}/sub/c.png")
  with pytest.raises(ValueError, match=r"config.data.sources.ocr.paths='gs://.*GCS FUSE"):
    storage.local_only(["/local/a", f"{root}/x.array_record"], "config.data.sources.ocr.paths")


def test_array_record_in_a_bucket_is_refused_with_the_fix(bucket):
  with pytest.raises(ValueError, match="mount the bucket with GCS FUSE"):
    sources.ArrayRecordSource(f"{bucket}/data/sft-*.array_record")


def _upload(local_root, remote_root):
  for folder, _, files in os.walk(local_root):
    for name in files:
      path = os.path.join(folder, name)
      (epath.Path(remote_root) / os.path.relpath(path, local_root)).write_bytes(epath.Path(path).read_bytes())


def _corpus_in_bucket(bucket, root) -> str:
  remote = f"{bucket}/corpus"
  if not storage.exists(f"{remote}/llava.jsonl"):
    _upload(str(root), remote)
  return remote


@pytest.mark.parametrize("which", range(4))
def test_parquet_webdataset_and_jsonl_sources_read_the_bucket_as_local_files(bucket, corpus, which):  # noqa: F811
  """Each source over the corpus uploaded to the bucket gives the local source's items, byte for byte."""
  root, _ = corpus
  remote = epath.Path(_corpus_in_bucket(bucket, root))
  (name, local, _), (_, in_bucket, _) = _sources(root)[which], _sources(remote)[which]
  assert len(in_bucket) == len(local) > 0
  assert [in_bucket[i] for i in range(len(local))] == [local[i] for i in range(len(local))]
  jsonl_local, jsonl_bucket = sources.JsonlSource(str(root / f"{name}.jsonl")), sources.JsonlSource(
      str(remote / f"{name}.jsonl"))
  assert jsonl_bucket.image_root == str(remote)
  assert [jsonl_bucket[i] for i in range(len(jsonl_local))] == [jsonl_local[i] for i in range(len(jsonl_local))]


def _sources_flag(root) -> str:
  """The built-in QA task beside a JSONL + images source and a Parquet source under root."""
  return "--config.data.sources=" + repr({
      "qa": dict(kind="builtin", weight=0.6),
      "llava": dict(kind="jsonl", weight=0.2, path=f"{root}/llava.jsonl", eval_path=f"{root}/llava.jsonl"),
      "obelics": dict(kind="parquet", weight=0.2, paths=f"{root}/obelics-*.parquet",
                      eval_paths=f"{root}/obelics-*.parquet")})


@pytest.fixture(scope="module")
def bucket_run(bucket, corpus, tmp_path_factory):  # noqa: F811
  """(bucket workdir, local reference workdir, outputs of the stopped and the relaunched run).
  Both train on the same mixture: its JSONL and Parquet sources local for the reference, in the
  bucket for the bucket run."""
  root, _ = corpus
  remote = _corpus_in_bucket(bucket, root)
  local = str(tmp_path_factory.mktemp("reference"))
  code, out = finish(single_process(f"--workdir={local}", *RUN, _sources_flag(root)))
  assert code == 0, out[-3000:]
  workdir = f"{bucket}/run"
  run = [*RUN, _sources_flag(remote)]
  proc = single_process(f"--workdir={workdir}", *run)
  deadline = time.time() + 600
  while not (storage.exists(storage.join(workdir, "metrics.jsonl")) and rows(workdir)):
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() < deadline, "no training step logged in the bucket"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  code, stopped = finish(proc)
  assert code == 0, stopped[-3000:]
  code, resumed = finish(single_process(f"--workdir={workdir}", *run))
  assert code == 0, resumed[-3000:]
  return workdir, local, stopped, resumed


def _by_step(rows_):
  return {r["step"]: r for r in rows_}  # a relaunch logs the steps after its checkpoint again


def test_a_bucket_run_stops_and_resumes_exactly(bucket_run):
  workdir, local, stopped, resumed = bucket_run
  assert "preempted: saved step" in stopped
  saved = int(stopped.split("preempted: saved step")[1].split()[0].rstrip(";"))
  assert saved < STEPS and f"resumed from step {saved}" in resumed
  got, want = _by_step(rows(workdir)), _by_step(rows(local))
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s]["loss"] for s in sorted(got)], [want[s]["loss"] for s in sorted(want)],
                             rtol=1e-6)
  evals, reference = _by_step(rows(workdir, "eval")), _by_step(rows(local, "eval"))
  for source in ("llava", "obelics", "qa"):  # every source was read (from the bucket) and evaluated
    assert evals[STEPS][f"{source}/loss"] == pytest.approx(reference[STEPS][f"{source}/loss"], rel=1e-6)
  assert ckpt_lib.latest_step(storage.join(workdir, "checkpoints")) == STEPS
  for step in storage.listdir(storage.join(workdir, "checkpoints")):  # each saved step verifies
    assert integrity.step_problem(storage.join(workdir, "checkpoints", step)) is None, step
  assert [p.name for p in epath.Path(workdir, "tensorboard").iterdir()]  # the event file was uploaded
  # The profiler writes to a local folder; the trace is uploaded when it stops.
  local_traces = storage.glob(f"{local}/profile/plugins/profile/*/*.xplane.pb")
  traces = storage.glob(f"{workdir}/profile/plugins/profile/*/*.xplane.pb")
  assert len(traces) == len(local_traces) == 1 and storage.read_bytes(traces[0])[:16]
  config = run_record.load_config(workdir)
  assert config.train.steps == STEPS and config.eval.best_metric == "loss"


def test_a_bucket_run_keeps_its_best_checkpoint(bucket_run):
  workdir, *_ = bucket_run
  evals = _by_step(rows(workdir, "eval"))
  best = json.loads(storage.read_text(storage.join(workdir, "best", "best.json")))
  step = min(evals, key=lambda s: evals[s]["loss"])
  assert best["step"] == step and best["value"] == pytest.approx(evals[step]["loss"])
  assert storage.listdir(storage.join(workdir, "best")) == sorted(["best.json", str(step)])


def test_load_model_from_the_bucket_gives_the_reference_params(bucket_run):
  workdir, local, *_ = bucket_run
  got, want = inference.load_model(workdir).params, inference.load_model(local).params
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)), got, want)


def test_export_and_import_through_the_bucket(bucket_run, tmp_path):
  """The bucket run exported to the bucket (float32) holds the local reference's export, byte for
  byte; imported back from the bucket into the bucket, its decoder equals the run's."""
  from mm15_jax.convert import exporter, importer

  workdir, local, *_ = bucket_run
  exported = f"{workdir}_hf"
  exporter.run_export(workdir, exported, dtype="float32", max_shard_bytes=100_000)
  exporter.run_export(local, str(tmp_path / "hf"), dtype="float32", max_shard_bytes=100_000)
  names = sorted(os.listdir(tmp_path / "hf"))
  assert storage.listdir(exported) == names and "model.safetensors.index.json" in names
  for name in names:
    assert storage.read_bytes(storage.join(exported, name)) == (tmp_path / "hf" / name).read_bytes(), name
  imported = f"{workdir}_imported"
  summary = importer.run_import("llm", exported, imported)
  assert summary["source"] == exported and storage.exists(storage.join(imported, "config.py"))
  config = run_record.load_config(imported)
  assert config.init.llm_from == imported
  model = inference.load_model(workdir)
  again = ckpt_lib.load_param_parts({}, {"llm": jax.tree.map(lambda a: a, model.params["llm"])}, {"llm": imported})
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)), again["llm"],
               model.params["llm"])


def test_listings_written_by_another_process_are_seen(bucket):
  root = f"{bucket}/listing"
  storage.write_text_atomic(f"{root}/1/a", "a")
  assert storage.listdir(root) == ["1"]
  subprocess.run([sys.executable, "-c", f"from data_pipelines import storage; storage.write_text_atomic({root!r} + "
                  "'/2/a', 'a')"], check=True, cwd=ROOT)
  storage.forget_listings(root)
  assert storage.listdir(root) == ["1", "2"]


def test_a_damaged_step_in_a_bucket_is_set_aside_whole(bucket):
  step = f"{bucket}/quarantine/checkpoints/4"
  for name, text in (("params/a", "1"), ("train/b/c", "22"), ("_CHECKPOINT_METADATA", "{}")):
    storage.write_text_atomic(f"{step}/{name}", text)
  integrity.write_checksums(step)
  storage.write_text_atomic(f"{step}/train/b/c", "23")
  notes = []
  assert integrity.good_steps(f"{bucket}/quarantine/checkpoints", notes.append, quarantine=True) == []
  assert "train/b/c fails its checksum" in notes[0] and "set aside as 4.bad-0" in notes[0]
  assert not storage.exists(step) and storage.read_text(f"{step}.bad-0/train/b/c") == "23"

