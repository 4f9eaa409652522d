"""The ahead-of-time pod planner (mm15_jax/plan/) on the tiny model.

TPU chips come from libtpu's compile-only topology devices: they need no TPU backend, so they
work in this process although conftest sets JAX_PLATFORMS=cpu.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from mm15_jax import configs
from mm15_jax import sharding as shd
from mm15_jax.plan import chips as chips_lib
from mm15_jax.plan import estimate
from mm15_jax.plan import main as plan_main
from mm15_jax.plan import report as report_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "tiny.py")
GiB = 2**30
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the test extra)")

# On the tiny model XLA's count of the whole step exceeds the 6N + attention formula by what the
# formula leaves out (norms, softmax, AdamW, the loss): a few percent.
FLOPS_TOLERANCE = 0.10


def tiny(batch_size=8, vit_depth=2):
  c = configs.load_experiment(TINY)
  c.train.batch_size = batch_size  # a multiple of the 4 data shards of a 4-chip slice
  c.model.vit.depth = vit_depth
  return c


def parse(argv):
  """The CLI's flags, parsed into a fresh FlagValues (overrides are read from `argv`)."""
  fv = flags.FlagValues()
  plan_main.define_flags(fv, argv)
  fv(argv)
  return fv


@pytest.fixture(scope="module")
def v5p_report():
  # Stacks of different depths (2 decoder, 3 encoder layers), so the probe's split between them counts.
  chip = chips_lib.tpu_chip("v5p:2x2x1")
  return estimate.plan(tiny(vit_depth=3), chips_lib.tpu_devices("v5p:2x2x1"), chip, "v5p:2x2x1", name="tiny")


@needs_libtpu
def test_tiny_fits_a_v5p_slice_with_its_state_counted(v5p_report):
  r = v5p_report
  assert r["device_kind"] == "TPU v5" and r["chips"] == 4 and r["mesh"]["data"] == 4
  assert r["hbm_bytes_per_chip"] == 95 * GiB
  assert r["fits"] is True and 0 < r["bytes_per_chip"] <= r["hbm_bytes_per_chip"]
  # data=4, fsdp=1: every chip holds all float32 params and both Adam moments (12 bytes each),
  # and its quarter of the batch (hand count from batch.py's schema).
  b, l, t, s, k = 2, 256, 16, 32, 4
  batch = b * l * 4 * 5 + b * t * s * s * 3 + b * t * k * 4
  assert r["argument_bytes"] >= 12 * r["params"] + batch
  assert r["alias_bytes"] >= 12 * r["params"]  # the donated state is written in place
  assert r["bytes_per_chip"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
                                 + r["code_bytes"])


@needs_libtpu
def test_flops_are_per_chip_and_count_every_layer(v5p_report):
  r = v5p_report
  # Hand count of the formula: decoder 164,160 params less the 512 x 64 input embedding, 2 layers of
  # 4 heads of 16, 256 tokens; 8 rows of 16 tiles of 4x4 patches; encoder 6,784 + 3 layers of 8,544
  # params, width 32; connector 12,944.
  vit = 6784 + 3 * 8544
  per_token = 6 * (164160 - 512 * 64) + 12 * 2 * 4 * 16 * 256
  per_tile = 6 * vit * 16 + 12 * 3 * 32 * 16**2 + 6 * 12944 * 16
  model = 8 * 256 * per_token + 8 * 16 * per_tile
  assert r["params"] == 164160 + vit + 12944 and r["model_flops_per_step"] == model
  # Per chip x 4 chips matches the global formula; read as global it would be 4x off.
  assert r["flops_per_step"] == pytest.approx(model, rel=FLOPS_TOLERANCE)
  # XLA's own count of the step compiled with both layer stacks unrolled (no loop), a reference
  # independent of the probe arithmetic. The probe's stacks hold 4 layers, so what grows with
  # the stacked params outside the layers (AdamW) is counted as layer work: about 1% here.
  c = tiny(vit_depth=3)
  c.model.scan_unroll = 3
  mesh = shd.make_mesh(c.mesh, chips_lib.tpu_devices("v5p:2x2x1"))
  unrolled = estimate.compile_step(c, mesh)[1].cost_analysis()
  unrolled = unrolled[0] if isinstance(unrolled, list) else unrolled
  assert r["flops_per_step"] == pytest.approx(4 * unrolled["flops"], rel=0.03)
  # The step compiled with scans, as XLA reports it, counts one layer of each stack only.
  assert r["xla_as_reported"]["flops_per_chip"] < 0.8 * unrolled["flops"]
  assert r["step_time_source"] == "xla_cost_model" and r["estimated_step_s"] > 0
  assert r["estimated_mfu"] == pytest.approx(model / (r["estimated_step_s"] * 4 * 459e12))


@needs_libtpu
def test_flops_count_every_chunk_of_the_fused_loss(v5p_report):
  """With train.loss_chunk=32 the LM head is a loop of 8 chunks that XLA counts once: the plan
  adds the other 7 by formula, so the step's FLOPs stay those of the one-chunk step (256)."""
  c = tiny(vit_depth=3)
  c.train.loss_chunk = 32
  r = estimate.plan(c, chips_lib.tpu_devices("v5p:2x2x1"), chips_lib.tpu_chip("v5p:2x2x1"), "v5p:2x2x1")
  head = 6 * 8 * 256 * 64 * 512  # batch, tokens, d, vocab: per step, over the 4 chips
  assert estimate.head_chunks_left_out(c, 4) == pytest.approx(head * 7 / 8 / 4)
  assert r["flops_per_step"] == pytest.approx(v5p_report["flops_per_step"], rel=0.01)
  assert r["xla_as_reported"]["flops_per_chip"] < v5p_report["xla_as_reported"]["flops_per_chip"] - head / 8 / 4


@needs_libtpu
def test_a_cost_analysis_below_the_model_flops_gives_no_step_time(monkeypatch):
  # A step computes at least the model's FLOPs. When XLA's count falls short (the 30B plan with
  # remat "proj_offload" counted 0.75x), the plan keeps its memory but estimates no time, and the
  # sweep does not rank it by a speed it cannot have.
  monkeypatch.setattr(estimate, "probe_flops", lambda *args: 1.0)
  r = estimate.plan(tiny(), chips_lib.tpu_devices("v5p:2x2x1"), chips_lib.tpu_chip("v5p:2x2x1"), "v5p:2x2x1")
  assert r["fits"] and r["bytes_per_chip"] > 0
  assert r["flops_per_step"] is r["estimated_step_s"] is r["estimated_mfu"] is None
  assert any("less than the step must compute" in n for n in r["notes"])
  assert "MFU at most" not in report_lib.format_report(r)


@needs_libtpu
def test_moe_plans_count_the_routed_rows_not_the_worst_case_buffer():
  """Dropless MoE with expert parallelism: each chip's grouped-matmul buffer holds every chip's rows
  (the worst case) and the kernel's cost estimate, which XLA adds up, is sized by it. The plan
  counts the rows routed there, so the step's FLOPs match the same model without expert
  parallelism (where the buffer is exactly the routed rows), not 4x its expert work."""
  def moe_plan(**mesh):
    c = configs.load_experiment(os.path.join(ROOT, "experiments", "tiny_moe.py"))
    c.train.batch_size = 8
    c.mesh.update(mesh)
    assert c.model.moe.impl == "auto"  # megablox on TPU
    return estimate.plan(c, chips_lib.tpu_devices("v5p:2x2x1"), chips_lib.tpu_chip("v5p:2x2x1"), "v5p:2x2x1",
                         keep={"mesh.data", "mesh.expert"})

  no_ep, ep = moe_plan(data=4, expert=1), moe_plan(data=1, expert=4)
  assert no_ep["mesh"]["expert"] == 1 and ep["mesh"]["expert"] == 4
  kernels = [n for n in ep["notes"] if "never computed" in n]
  assert kernels and not [n for n in no_ep["notes"] if "never computed" in n]
  # As compiled, XLA counts the expert-parallel step's kernels on 4x the rows: far more FLOPs ...
  assert ep["xla_as_reported"]["flops_per_chip"] > 1.5 * no_ep["xla_as_reported"]["flops_per_chip"]
  # ... the plan the same work (the exchange's sort and scatter over the larger buffer: a little more).
  assert ep["flops_per_step"] == pytest.approx(no_ep["flops_per_step"], rel=0.03)
  assert ep["model_flops_per_step"] == no_ep["model_flops_per_step"]


def test_grouped_matmul_flops_follow_the_call_graph():
  """A kernel in a function called from three places runs three times; only megablox's count."""
  def kernel(flops):  # as Pallas writes its backend config into the lowered module
    return ('%k = stablehlo.custom_call @tpu_custom_call(%a) {backend_config = "{\\22cost_estimate\\22: '
            f'{{\\0A\\22bytes_accessed\\22:10,\\0A\\22flops\\22:{flops},\\0A\\22transcendentals\\22:0}}}}"}}')
  text = "\n".join([
      "module @jit_step {",
      "  func.func public @main(%arg0: tensor<4xf32>) -> tensor<4xf32> {",
      "    %0 = call @gmm(%arg0) : x", "    %1 = call @gmm(%0) : x", "    %2 = func.call @tgmm(%1) : x",
      "    %3 = call @attention(%2) : x", "    %4 = call @gmm(%3) : x",
      "  }",
      "  func.func private @gmm(%arg0: tensor<4xf32>) -> tensor<4xf32> {",
      "    %0 = call @helper(%arg0) : x", "    " + kernel(100),
      "  }",
      "  func.func private @tgmm(%arg0: tensor<4xf32>) -> tensor<4xf32> {",
      "    " + kernel(7),
      "  }",
      "  func.func private @helper(%arg0: tensor<4xf32>) -> tensor<4xf32> {",
      "    " + kernel(1000),  # inside gmm: megablox's too
      "  }",
      "  func.func private @attention(%arg0: tensor<4xf32>) -> tensor<4xf32> {",
      "    " + kernel(50000),  # another Pallas kernel: its estimate is its own business
      "  }",
      "}"])
  assert estimate.grouped_matmul_flops(text) == 3 * (100 + 1000) + 7


@needs_libtpu
def test_cli_json_and_a_case_that_does_not_fit(capsys):
  argv = ["plan", f"--config={TINY}", "--config.train.batch_size=4", "--topology=v5e:2x2",
          "--device_memory_gib=0.01", "--noprobe", "--json"]
  reports = plan_main.execute(parse(argv))
  printed = json.loads(capsys.readouterr().out.strip())
  assert printed == json.loads(json.dumps(reports[0]))
  for key in ("config", "topology", "fits", "bytes_per_chip", "hbm_bytes_per_chip", "flops_per_step",
              "estimated_step_s", "estimated_mfu", "model_flops_per_step", "mesh", "device_kind"):
    assert key in printed, key
  assert printed["device_kind"] == "TPU v5 lite" and printed["batch_size"] == 4
  assert printed["hbm_bytes_per_chip"] == pytest.approx(0.01 * GiB)
  assert printed["bytes_per_chip"] > 0.01 * GiB and printed["fits"] is False
  # Without the probe XLA's count covers one layer per stack: no FLOPs, and the report says why.
  assert printed["flops_per_step"] is None and any("once" in n for n in printed["notes"])


@needs_libtpu
def test_a_step_xla_refuses_for_memory_is_reported_as_not_fitting():
  # float32 logits of a 2^20-token vocabulary, 4096 tokens per chip: 16 GiB of temporaries alone.
  c = tiny(batch_size=64)
  c.model.llm.vocab_size = 2**20
  r = estimate.plan(c, chips_lib.tpu_devices("v5e:2x2"), chips_lib.tpu_chip("v5e:2x2"), "v5e:2x2", probe=False)
  assert r["fits"] is False and r["flops_per_step"] is None
  assert 4096 * 2**20 * 4 <= r["bytes_per_chip"] and "RESOURCE_EXHAUSTED" in r["notes"][-1]
  assert "DOES NOT FIT" in report_lib.format_report(r)


@needs_libtpu
def test_sweep_keeps_going_past_a_case_that_does_not_split(capsys):
  # 4 sequences do not split over the 8 data shards of either slice: error rows, before any compile.
  argv = ["plan", "--sweep", f"--config={TINY}", "--config.train.batch_size=4", "--topologies=v5p:2x2x2,v4:2x2x2",
          "--remat=none,full"]
  reports = plan_main.execute(parse(argv))
  assert [(r["topology"], r["remat"]) for r in reports] == [
      ("v5p:2x2x2", "none"), ("v5p:2x2x2", "full"), ("v4:2x2x2", "none"), ("v4:2x2x2", "full")]
  assert all("train.batch_size" in r["error"] and "use a multiple of 8" in r["error"] for r in reports)
  captured = capsys.readouterr()
  assert f"{TINY} remat=full: none of those planned" in captured.out
  progress = [line for line in captured.err.splitlines() if line.startswith("plan --sweep:")]
  assert [line.split()[2] for line in progress] == ["1/4", "2/4", "3/4", "4/4"]  # one line per case, no repeat


def test_accelerator_types_count_cores_or_chips():
  # Cloud TPU names: v4 and v5p slices by TensorCores (2 per chip), v5e and v6e by chips.
  assert chips_lib.accelerator_type("v5p:4x4x4", 64) == "v5p-128"
  assert chips_lib.accelerator_type("v4:2x2x1", 4) == "v4-8"
  assert chips_lib.accelerator_type("v5e:16x16", 256) == "v5litepod-256"
  assert chips_lib.accelerator_type("v6e:2x2", 4) == "v6e-4"


@needs_libtpu
def test_hardware_rules_apply_as_in_the_trainer():
  c = tiny(batch_size=8)
  c.hardware_rules = ((r"^TPU v5$", {"train.batch_size": 16}), (r"^v5litepod-4$", {"train.batch_size": 4}))
  devices, chip = chips_lib.tpu_devices("v5e:2x2"), chips_lib.tpu_chip("v5e:2x2")
  r = estimate.plan(c, devices, chip, "v5e:2x2", probe=False)
  assert r["batch_size"] == 4 and any("hardware rule 1" in n for n in r["notes"])
  assert c.train.batch_size == 8  # the caller's config is not changed


def test_smallest_fitting_topology():
  rows = [dict(config="a", remat="full", topology="v5p:2x2x2", chips=8, fits=True),
          dict(config="a", remat="full", topology="v5p:2x2x1", chips=4, fits=False),
          dict(config="a", remat="full", topology="v5p:2x2x4", chips=16, fits=True),
          dict(config="a", remat="dots", topology="v5p:2x2x4", chips=16, fits=False),
          dict(config="a", remat="dots", topology="v5p:4x4x4", fits=False, error="mesh")]
  assert report_lib.smallest_fitting(rows) == {("a", "full"): "v5p:2x2x2", ("a", "dots"): None}


def test_best_remat_is_the_fastest_that_fits_and_names_its_slice():
  GiB = chips_lib.GiB
  row = lambda remat, gib, mfu, fits=True, topology="v5p:4x4x4", chips=64, config="a": dict(
      config=config, remat=remat, topology=topology, chips=chips, fits=fits, bytes_per_chip=gib * GiB,
      estimated_mfu=mfu, estimated_step_s=1.0 if mfu else None, hbm_bytes_per_chip=95 * GiB, temp_bytes=1)
  # The 1B sweep on v5p-128 (benchmarks/RESULTS.md): proj is the fastest and fits.
  rows = [row("full", 42.9, 0.350), row("qkv", 45.9, 0.353), row("proj", 56.3, 0.363),
          row("none", 130.0, 0.40, fits=False)]
  best = report_lib.best_remat(rows)
  assert best[("a", "v5p:4x4x4")]["remat"] == "proj"
  # Within MFU_TIE (half a point) the smaller memory wins: qkv's 0.3 points do not pay for 3 GiB.
  assert report_lib.best_remat(rows[:2])[("a", "v5p:4x4x4")]["remat"] == "full"
  # Nothing fits; no estimates (--noprobe): the least memory.
  assert report_lib.best_remat([row("dots", 99.0, None, fits=False)]) == {("a", "v5p:4x4x4"): None}
  assert report_lib.best_remat([row("qkv", 50.0, None), row("full", 40.0, None)])[("a", "v5p:4x4x4")]["remat"] == "full"
  # The rule to paste names the Cloud TPU slice type the trainer matches ($TPU_ACCELERATOR_TYPE), per slice.
  assert report_lib.hardware_rule(best[("a", "v5p:4x4x4")]) == 'hardware_rules: (r"^v5p-128$", {"model.remat": "proj"})'
  two_slices = row("qkv", 50.0, 0.3, topology="2x v5p:2x2x1", chips=8)
  assert report_lib.hardware_rule(two_slices) == 'hardware_rules: (r"^v5p-8$", {"model.remat": "qkv"})'
  assert report_lib.hardware_rule(row("full", 50.0, 0.3, topology="8 GPUs", chips=8)) == ""
  table = report_lib.format_sweep(rows)
  assert 'a on v5p:4x4x4: proj  hardware_rules: (r"^v5p-128$", {"model.remat": "proj"})' in table
  # A config name longer than the column still has a space before the remat.
  long_name = "experiments/mm15_1b_moe.py:cpt"
  lines = report_lib.format_sweep([row("full", 88.1, 0.381, config=long_name)]).splitlines()
  assert lines[1].split()[:2] == [long_name, "full"] and lines[0].index("remat") == lines[1].index("full")


def test_sweep_sizes_are_sibling_experiments_with_the_same_overrides():
  argv = ["plan", "--sweep", f"--config={ROOT}/experiments/mm15_1b.py:sft", "--config.train.batch_size=64",
          "--sizes=3b,1b_moe", "--topologies=v5p:2x2x1"]
  loaded = plan_main._sweep_configs(parse(argv))
  experiments = os.path.join(ROOT, "experiments")
  assert [spec for spec, _ in loaded] == [f"{experiments}/mm15_3b.py:sft", f"{experiments}/mm15_1b_moe.py:sft"]
  assert [c.train.batch_size for _, c in loaded] == [64, 64]
  assert [c.stage for _, c in loaded] == ["sft", "sft"]
  assert loaded[0][1].model.llm.d_model == 3072 and loaded[1][1].model.moe.num_experts == 64


@pytest.mark.parametrize("topology", ["v9:2x2", "v5p", "v5p:4x4x8x2", "h100:8"])
def test_unknown_topology_is_a_clear_error(topology):
  with pytest.raises(ValueError, match=r"--topology=.*GENERATION.*v5p:4x4x8"):
    chips_lib.tpu_chip(topology)


@needs_libtpu
def test_topology_libtpu_cannot_build_is_a_clear_error():
  with pytest.raises(ValueError, match=r"--topology='v5p:3x3x3': libtpu could not build it .*whole hosts"):
    chips_lib.tpu_devices("v5p:3x3x3")


@needs_libtpu
def test_config_that_does_not_fit_the_chips_fails_before_compiling():
  devices = chips_lib.tpu_devices("v5p:2x2x1")
  chip = chips_lib.tpu_chip("v5p:2x2x1")
  with pytest.raises(ValueError, match=r"train.batch_size / train.grad_accum = 6 .* 4 batch shards"):
    estimate.plan(tiny(batch_size=6), devices, chip, "v5p:2x2x1")
  c = tiny()
  c.mesh = dict(data=-1, fsdp=1, tensor=3, expert=1)
  with pytest.raises(ValueError, match=r"v5p:2x2x1 \(4 chips\): config.mesh"):
    estimate.plan(c, devices, chip, "v5p:2x2x1")


def test_gpu_plan_on_simulated_devices():
  assert len(jax.devices()) == 8  # conftest
  chip = chips_lib.Chip("GPU (simulated)", 80 * GiB, 989e12, simulated=True)
  r = estimate.plan(tiny(), chips_lib.simulated_devices(8), chip, "8 GPUs", name="tiny")
  assert r["chips"] == 8 and r["mesh"]["data"] == 8 and r["fits"] is True
  assert 12 * r["params"] <= r["bytes_per_chip"] <= 80 * GiB
  assert any("approximation" in n for n in r["notes"])
  # No cost model on CPU: step time is compiled FLOPs per chip at the peak.
  assert r["step_time_source"] == "flops/peak"
  assert r["estimated_step_s"] == pytest.approx(r["flops_per_step"] / 8 / 989e12)
  assert r["flops_per_step"] == pytest.approx(r["model_flops_per_step"], rel=FLOPS_TOLERANCE)
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
    chips_lib.simulated_devices(16)


def test_gpu_cli_reruns_itself_with_enough_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run(
      [sys.executable, "-m", "mm15_jax.plan", f"--config={TINY}", "--config.train.batch_size=4", "--devices=2",
       "--device_memory_gib=80", "--device_peak_tflops=989", "--noprobe", "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["chips"] == 2 and report["mesh"]["data"] == 2 and report["fits"] is True
  assert np.isclose(report["hbm_bytes_per_chip"], 80 * GiB)


@needs_libtpu
def test_two_slice_plan_crosses_slices_only_on_the_data_axis(capsys):
  """A multi-slice TPU topology: 2 slices of v5p:2x2x1 with config.mesh_dcn.data=2 (data parallel
  across slices over DCN, fsdp within each slice)."""
  f = parse([
      "plan", f"--config={TINY}", "--topology=v5p:2x2x1", "--json", "--noprobe", "--config.train.batch_size=8",
      "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh_dcn.data=2"])
  (r,) = plan_main.execute(f)
  assert r["chips"] == 8 and r["topology"] == "2x v5p:2x2x1"
  assert r["mesh"]["data"] == 2 and r["mesh"]["fsdp"] == 4 and r["fits"] is True
  devices = chips_lib.tpu_devices("v5p:2x2x1", 2)
  assert sorted({d.slice_index for d in devices}) == [0, 1]
  config = tiny()
  config.mesh, config.mesh_dcn = dict(data=1, fsdp=4, tensor=1, expert=1), dict(data=2, fsdp=1, tensor=1, expert=1)
  mesh = shd.mesh_for_config(config, devices)
  # Each data row of the mesh is one slice: fsdp (the frequent all-gathers) stays on ICI.
  for row in range(2):
    assert {d.slice_index for d in np.asarray(mesh.devices)[row].ravel()} == {row}
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fits"] is True
