"""The packages import downwards only: modes at the bottom, then data and foundations, the
models, checkpoints, inference, evaluation, training and conversion, and the command-line
tools on top. Every import statement counts, also one inside a function, so a cycle cannot
hide behind a local import."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mm15_jax", "data_pipelines")

# Each unit's layer; a unit imports only units of its own layer or below. A unit is a
# subpackage (mm15_jax.train), a top-level module (mm15_jax.configs) or all of data_pipelines.
LAYERS = (
    ("mm15_jax.modes",),
    ("data_pipelines", "mm15_jax.sharding", "mm15_jax.distributed", "mm15_jax.configs", "mm15_jax.batch",
     "mm15_jax.hardware_rules", "mm15_jax.launch_commands", "mm15_jax.checkpoint_integrity",
     "mm15_jax.run_record", "mm15_jax.cli"),
    ("mm15_jax.models",),
    ("mm15_jax.checkpoint",),
    ("mm15_jax.inference",),
    ("mm15_jax.evaluation",),
    ("mm15_jax.train", "mm15_jax.convert"),
    ("mm15_jax.plan", "mm15_jax.tools"),
)
LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def project_modules() -> dict:
  """Dotted module name -> file, for every .py file of the packages."""
  out = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          out[module.removesuffix(".__init__")] = path
  return out


def unit_of(module: str) -> str:
  parts = module.split(".")
  if parts[0] == "data_pipelines":
    return "data_pipelines"
  if len(parts) > 1 and os.path.isdir(os.path.join(ROOT, *parts[:2])):
    return ".".join(parts[:2])
  return module


def imported(path: str, module: str, modules: dict, text: str | None = None):
  """(line, project module) for each import in the file (or in `text`, read as that file),
  function-local ones included."""
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(open(path).read() if text is None else text, path)):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the file's package upwards
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name and name != "mm15_jax":  # the top package's __init__ holds nothing
        yield node.lineno, name


def import_edges():
  modules = project_modules()
  for module, path in modules.items():
    for line, target in imported(path, module, modules):
      if unit_of(target) != unit_of(module):
        yield module, line, target


def test_every_unit_has_a_layer():
  units = {unit_of(m) for m in project_modules()} - {"mm15_jax"}
  assert units <= set(LAYER_OF), f"add these to LAYERS: {sorted(units - set(LAYER_OF))}"


def test_no_upward_import():
  upward = [f"{module}:{line} imports {target} (layer {LAYER_OF[unit_of(target)]} > {LAYER_OF[unit_of(module)]})"
            for module, line, target in import_edges()
            if LAYER_OF.get(unit_of(target), 0) > LAYER_OF.get(unit_of(module), 0)]
  assert not upward, "\n".join(upward)


def strongly_connected(graph: dict) -> list:
  """Tarjan's components with more than one node."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in graph.get(node, ()):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while True:
        top = stack.pop()
        on_stack.discard(top)
        component.append(top)
        if top == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in list(graph):
    if node not in index:
      visit(node)
  return found


@pytest.mark.parametrize("level", ["unit", "module"])
def test_no_import_cycle(level):
  graph = {}
  for module, _, target in import_edges() if level == "unit" else all_module_edges():
    a, b = (unit_of(module), unit_of(target)) if level == "unit" else (module, target)
    if a != b:
      graph.setdefault(a, set()).add(b)
  assert strongly_connected(graph) == []


def all_module_edges():
  modules = project_modules()
  for module, path in modules.items():
    for line, target in imported(path, module, modules):
      # a package's __init__ importing its own modules (re-exports) is not a cycle
      if not module.startswith(target + ".") and not target.startswith(module + ".") and \
          target != module.rpartition(".")[0]:
        yield module, line, target


def test_the_check_sees_an_upward_local_import():
  """A function-local import of training code from the models is reported."""
  path = os.path.join(ROOT, "mm15_jax", "models", "vit.py")
  text = open(path).read() + "\n\ndef _probe():\n  from mm15_jax.train import step  # noqa: F401\n"
  found = [target for _, target in imported(path, "mm15_jax.models.vit", project_modules(), text)]
  assert "mm15_jax.train.step" in found
  assert LAYER_OF[unit_of("mm15_jax.train.step")] > LAYER_OF[unit_of("mm15_jax.models.vit")]
