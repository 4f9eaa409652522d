"""Mesh construction, logical-axis mapping, per-hardware rules and the errors users see."""

import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from mm15_jax import configs
from mm15_jax import sharding as shd
from mm15_jax.hardware_rules import apply_hardware_rules
from mm15_jax.train.config_checks import check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_fills_minus_one_axis():
  mesh = shd.make_mesh(dict(data=2, fsdp=-1, tensor=2, expert=1))
  assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2, expert=1)


def test_mesh_size_mismatch_names_field_and_fix():
  with pytest.raises(ValueError, match=r"config.mesh: .* = 6 .* 8 devices .*--config.mesh"):
    shd.make_mesh(dict(data=3, fsdp=2, tensor=1, expert=1))


def test_mesh_unknown_axis():
  with pytest.raises(ValueError, match="unknown axes"):
    shd.make_mesh(dict(data=8, pipeline=1))


def test_logical_to_mesh_skips_used_and_trivial_axes():
  mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2, expert=1))
  rules = configs.DEFAULT_RULES
  # Activations: batch takes data and fsdp, so embed (-> fsdp) stays replicated.
  assert shd.logical_to_mesh(("batch", "length", "embed"), rules, mesh) == P(("data", "fsdp"), None, None)
  # Params: embed -> fsdp, mlp -> tensor; expert axis has size 1 and is dropped.
  assert shd.logical_to_mesh(("layers", "embed", "mlp"), rules, mesh) == P(None, "fsdp", "tensor")
  assert shd.logical_to_mesh(("vocab", "embed"), rules, mesh) == P("tensor", "fsdp")


def test_divisibility_error_names_param_and_fix():
  mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=8, expert=1))
  spec = shd.logical_to_mesh(("embed", "heads"), configs.DEFAULT_RULES, mesh)
  with pytest.raises(ValueError, match=r"q_proj.*dimension 4 .*size 8"):
    shd.check_divisible((64, 4), spec, mesh, "param q_proj", "change config.mesh")


def test_constrain_is_noop_without_rules():
  x = jax.numpy.ones((4, 4))
  assert shd.constrain(x, ("batch", "embed")) is x


# Hardware rules: per device kind (strings as jax reports them) and topology.

RULES = (
    (r"^TPU v5$", {"mesh.fsdp": -1, "mesh.data": 1, "train.batch_size": 512}),  # v5p reports "TPU v5"
    (r"^TPU v5 lite$", {"train.batch_size": 256}),
    (r"v6e-256", {"train.grad_accum": 4}),  # a topology (TPU_ACCELERATOR_TYPE)
    (r"H100|H200", {"mesh.fsdp": 8, "mesh.data": 1, "mesh_dcn.data": 2, "train.lr": 1, "model.remat": "dots"}),
    (r"TPU", {"train.grad_accum": 2}),  # every other TPU; the rules above match first
)


def rules_config(rules=RULES):
  c = configs.base()
  c.hardware_rules = rules
  return c


def changed_fields(before, after, prefix=""):
  """{dotted field: new value} where `after` differs from `before`, walked independently of the rules."""
  out = {}
  for key in before:
    a, b = before[key], after[key]
    if isinstance(a, dict):
      out.update(changed_fields(a, b, f"{prefix}{key}."))
    elif a != b or type(a) is not type(b):
      out[prefix + key] = b
  return out


@pytest.mark.parametrize("kind, topology, expected", [
    ("TPU v5", "", {"mesh.fsdp": -1, "mesh.data": 1, "train.batch_size": 512}),
    ("TPU v5 lite", "v5litepod-256", {"train.batch_size": 256}),
    ("TPU v6 lite", "v6e-256", {"train.grad_accum": 4}),
    ("TPU v6 lite", "v6e-8", {"train.grad_accum": 2}),
    ("NVIDIA H100 80GB HBM3", "", {"mesh.fsdp": 8, "mesh.data": 1, "mesh_dcn.data": 2, "train.lr": 1.0,
                                   "model.remat": "dots"}),
    ("NVIDIA H200", "", {"mesh.fsdp": 8, "mesh.data": 1, "mesh_dcn.data": 2, "train.lr": 1.0, "model.remat": "dots"}),
    ("cpu", "", {}),
])
def test_first_matching_hardware_rule_is_applied(kind, topology, expected):
  config = rules_config()
  before = config.to_dict()
  lines = []
  out = apply_hardware_rules(config, kind, topology, report=lines.append)
  assert changed_fields(before, out.to_dict()) == expected
  assert config.to_dict() == before  # the input is not modified
  assert isinstance(out.train.lr, float)  # an int for a float field becomes a float
  assert len(lines) == 1 and (("none matches" in lines[0]) == (not expected)), lines


def test_fields_set_on_the_command_line_win_over_a_rule():
  out = apply_hardware_rules(rules_config(), "TPU v5", keep={"train.batch_size"})
  assert out.train.batch_size == configs.base().train.batch_size and out.mesh.fsdp == -1


def test_fields_tied_to_an_overridden_field_follow_it():
  config = rules_config()
  config.eval.batches = config.train.get_ref("batch_size") // 2
  out = apply_hardware_rules(config, "TPU v5")
  assert (out.train.batch_size, out.eval.batches) == (512, 256)
  assert config.eval.batches == configs.base().train.batch_size // 2


def test_no_rules_is_silent_and_changes_nothing():
  lines = []
  out = apply_hardware_rules(configs.base(), "cpu", report=lines.append)
  assert out.to_dict() == configs.base().to_dict() and lines == []


@pytest.mark.parametrize("rule, message", [
    ((r"H100", {"train.batchsize": 8}), r"hardware_rules\[1\] \('H100'\): 'train.batchsize' is not a config field; "
                                        r"did you mean 'train.batch_size'"),
    ((r"H100", {"trian.lr": 1e-3}), r"'trian.lr' is not a config field; did you mean 'train'"),
    ((r"H100", {"train.batch_size": "512"}), r"train.batch_size='512' is a str, but the field holds a int"),
    ((r"H100", {"model.remat": True}), r"model.remat=True is a bool, but the field holds a str"),
    ((r"H100", {"mesh": dict(fsdp=8)}), r"'mesh' is a group of fields; override them one by one, e.g. 'mesh.data'"),
    ((r"H100(", {"mesh.fsdp": 8}), r"hardware_rules\[1\] \('H100\('\): not a regular expression"),
    ((r"H100", "mesh.fsdp=8"), r"hardware_rules\[1\] = .*a rule is \(regex, \{dotted field: value\}\)"),
])
def test_bad_hardware_rules_name_the_rule_and_field(rule, message):
  # The bad rule is second and never matches "cpu": every rule is checked, not only the matching one.
  config = rules_config(((r"^TPU v5$", {"train.batch_size": 512}), rule))
  with pytest.raises(ValueError, match=message):
    apply_hardware_rules(config, "cpu")
  with pytest.raises(ValueError, match=message):
    check_config(config, paths=False)


def test_trainer_applies_hardware_rules_before_training(tmp_path):
  """`python -m mm15_jax.train` with a rule for this host's "cpu"; training itself is stubbed out."""
  experiment = tmp_path / "rules.py"
  experiment.write_text(
      "from mm15_jax import configs\n\n\n"
      "def get_config(arg=None):\n"
      "  c = configs.base()\n"
      "  c.hardware_rules = ((r'^TPU', {'train.batch_size': 512}),\n"
      "                      (r'^cpu$', {'train.batch_size': 4, 'train.lr': 0.5}))\n"
      "  return c\n")
  script = (
      "import sys\n"
      "from mm15_jax.train import loop, main\n"
      "loop.train_and_evaluate = lambda c, w, progress: print('TRAINS', c.train.batch_size, c.train.lr)\n"
      "sys.argv = ['train', f'--config={sys.argv[1]}', '--workdir=unused', '--config.train.lr=0.25']\n"
      "main.run()\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  out = subprocess.run([sys.executable, "-c", script, str(experiment)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "hardware rule 1 ('^cpu$') matches 'cpu'" in out.stdout
  assert "kept from the command line: train.lr" in out.stdout
  assert "TRAINS 4 0.25" in out.stdout, out.stdout
