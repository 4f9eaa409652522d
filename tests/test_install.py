"""What an install brings: every third-party module the package imports is declared (setup.py),
the optional ones only where they are used, with an error naming the extra when missing."""

import ast
import os
import subprocess
import sys
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = {"mm15_jax", "data_pipelines"}
# Imported only by the code that needs them (README, "Quick start"), each named by its extra.
OPTIONAL = {"pyarrow": "parquet", "tensorflow_datasets": "tfds", "gcsfs": "gcp", "google": "gcp",
            "wandb": "wandb", "libtpu": "test", "torch": "test", "transformers": "test", "tokamax": "gpu"}


def _imported_top_level_modules() -> set[str]:
  names = set()
  for package in OURS:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith(".py"):
          with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
          for node in ast.walk(tree):
            if isinstance(node, ast.Import):
              names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
              names.add(node.module.split(".")[0])
  return {n for n in names if n not in OURS and n not in sys.stdlib_module_names and n != "__future__"}


def _requirement_name(requirement: str) -> str:
  for stop in "<>=!~[; ":
    requirement = requirement.split(stop)[0]
  return requirement.lower().replace("_", "-")


def test_every_imported_module_is_declared():
  requires = metadata.requires("mm15_jax") or []
  core = {_requirement_name(r) for r in requires if "extra ==" not in r}
  extras = {_requirement_name(r) for r in requires if "extra ==" in r}
  distributions = metadata.packages_distributions()
  undeclared = []
  for module in sorted(_imported_top_level_modules()):
    names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
    declared = core if module not in OPTIONAL else core | extras
    if not names & declared:
      undeclared.append((module, sorted(names)))
  assert not undeclared, f"imported but not in setup.py: {undeclared}"
  assert "chex" not in core  # declared once, never imported


def test_the_package_works_without_the_optional_sources(tmp_path):
  """No pyarrow and no tensorflow-datasets: the trainer's modules import, and a Parquet or tfds
  source says which extra to install."""
  code = """
import sys
sys.modules["pyarrow"] = None
sys.modules["tensorflow_datasets"] = None
import mm15_jax.train.loop, data_pipelines.sources as s
sources = ((lambda: s.ParquetSource(sys.argv[1]), "parquet"), (lambda: s.TfdsSource("x", "train", fields={}), "tfds"))
for make, extra in sources:
  try:
    make()
  except ImportError as e:
    assert f"mm15_jax[{extra}]" in str(e), e
  else:
    raise AssertionError(extra)
print("ok")
"""
  (tmp_path / "x.parquet").write_bytes(b"PAR1")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.parquet")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.stdout.strip().endswith("ok"), (out.stdout + out.stderr)[-3000:]


def test_the_users_compilation_cache_is_kept(monkeypatch, tmp_path):
  import jax

  from mm15_jax import cli

  before = jax.config.jax_compilation_cache_dir
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
  jax.config.update("jax_compilation_cache_dir", str(tmp_path))
  try:
    cli.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path)
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
