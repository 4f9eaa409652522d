"""Per-hardware overrides, so one experiment file serves TPU v5p, v6e and H100 clusters.

  c.hardware_rules = (
      (r"^TPU v5$", {"mesh.fsdp": -1, "train.batch_size": 512}),  # v5p reports "TPU v5"
      (r"H100|H200", {"mesh.fsdp": 8, "mesh_dcn.data": 4, "model.attention_impl": "cudnn"}),
  )

A rule is (regex, {dotted field: value}). The first rule whose regex is found (`re.search`)
in the device kind (`jax.devices()[0].device_kind`: "TPU v5", "TPU v5 lite", "TPU v6 lite",
"NVIDIA H100 80GB HBM3", "cpu") or in the topology wins. Anchor TPU patterns: "TPU v5" is
also found in "TPU v5 lite". The trainer passes `$TPU_ACCELERATOR_TYPE` (e.g. "v5p-128",
set on Cloud TPU VMs) as the topology, and fields set on the command line win over a rule.
"""

import copy
import difflib
import re
from collections.abc import Mapping

from ml_collections import ConfigDict

from mm15_jax import configs


def matching_rule(rules, device_kind: str, topology: str = "") -> tuple[int, str, dict] | None:
  """(index, pattern, overrides) of the first rule matching the hardware, or None."""
  for i, (pattern, overrides) in enumerate(rules):
    if re.search(pattern, device_kind) or (topology and re.search(pattern, topology)):
      return i, pattern, overrides
  return None


def apply_hardware_rules(config, device_kind: str, topology: str = "", *, keep=(), report=None):
  """A copy of `config` with the overrides of the first rule matching the hardware applied.

  keep: dotted fields the user set explicitly (command line); a rule does not override them.
  report: called with one line saying which rule matched and what it changed (e.g. `print`).
  """
  errors = rule_errors(config)
  if errors:
    raise ValueError("invalid config.hardware_rules:\n  " + "\n  ".join(errors))
  config = copy.deepcopy(config)  # keeps field references: fields tied to an overridden one follow it
  rules = config.hardware_rules
  match = matching_rule(rules, device_kind, topology)
  if match is None:
    if report and rules:
      report(f"hardware rules: none matches device kind {device_kind!r} / topology {topology!r}")
    return config
  index, pattern, overrides = match
  applied, kept = {}, []
  for field, value in overrides.items():
    if field in keep:
      kept.append(field)
      continue
    old = config[field]
    configs.set_field(config, field, float(value) if isinstance(old, float) else
                      tuple(value) if isinstance(old, tuple) else value)
    applied[field] = value
  if report:
    note = f"; kept from the command line: {', '.join(kept)}" if kept else ""
    report(f"hardware rule {index} ({pattern!r}) matches {device_kind!r}: {applied}{note}")
  return config


def rule_errors(config) -> list[str]:
  """What is wrong with `config.hardware_rules`, each naming the rule, the field and a fix."""
  errors = []
  for i, rule in enumerate(config.hardware_rules):
    where = f"config.hardware_rules[{i}]"
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and isinstance(rule[1], Mapping)):
      errors.append(f"{where} = {rule!r}: a rule is (regex, {{dotted field: value}}), "
                    "e.g. ('H100', {'mesh.fsdp': 8})")
      continue
    pattern, overrides = rule
    where = f"{where} ({pattern!r})"
    try:
      re.compile(pattern)
    except re.error as e:
      errors.append(f"{where}: not a regular expression: {e}")
    for field, value in overrides.items():
      problem = _field_problem(config, field, value)
      if problem:
        errors.append(f"{where}: {problem}")
  return errors


def _field_problem(config, field, value) -> str | None:
  if not isinstance(field, str):
    return f"field {field!r} must be a dotted name such as 'train.batch_size'"
  parts = field.split(".")
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, ConfigDict) or part not in node:
      known = list(node.keys()) if isinstance(node, ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=1)
      hint = f"; did you mean {'.'.join(parts[:depth] + close)!r}?" if close else ""
      return f"{field!r} is not a config field{hint}"
    node = node[part]
  if isinstance(node, ConfigDict):
    return f"{field!r} is a group of fields; override them one by one, e.g. '{field}.{next(iter(node.keys()), 'x')}'"
  if not _same_type(node, value):
    return f"{field}={value!r} is a {type(value).__name__}, but the field holds a {type(node).__name__} ({node!r})"
  return None


def _same_type(old, new) -> bool:
  if old is None:
    return True
  if isinstance(old, bool) or isinstance(new, bool):
    return isinstance(old, bool) and isinstance(new, bool)
  if isinstance(old, float):
    return isinstance(new, (int, float))
  if isinstance(old, (tuple, list)):
    return isinstance(new, (tuple, list))
  return isinstance(new, type(old))
