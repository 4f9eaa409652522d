"""Parameters per component and bytes per chip: `python -m mm15_jax.tools.summary --config=FILE [--json]`.

Nothing is allocated: the model is built abstractly and its shardings are worked out
arithmetically for the config's mesh, so a 30B config summarises on a laptop.
"""

import json
import math
import types

from absl import flags
from ml_collections import config_flags

from mm15_jax import cli, modes

COMPONENTS = modes.values(modes.Component)


def summarize(config, devices: int) -> dict:
  """Param counts and per-chip bytes of params (param_dtype) and AdamW moments (float32)."""
  import jax
  import numpy as np

  from mm15_jax import sharding as shd
  from mm15_jax.models import build
  from mm15_jax.train.flops import param_counts

  _, _, logical, shapes = build.model_parts(config)
  mesh = types.SimpleNamespace(shape=shd.mesh_sizes(config.mesh, devices, dcn=config.mesh_dcn))
  param_bytes = np.dtype(config.model.param_dtype).itemsize
  out = {"mesh": mesh.shape}
  per_chip = 0.0
  for name in COMPONENTS:
    leaves = jax.tree.leaves(shapes[name])
    axes = jax.tree.leaves(logical[name], is_leaf=lambda x: isinstance(x, tuple))
    count = sum(math.prod(x.shape) for x in leaves)
    shard_elems = sum(
        math.prod(x.shape)
        / math.prod(shd.axis_size(e, mesh) for e in shd.logical_to_mesh(a, config.sharding_rules, mesh))
        for x, a in zip(leaves, axes))
    chip = shard_elems * (param_bytes + 8)  # params + two float32 Adam moments
    per_chip += chip
    out[name] = {"params": int(count), "bytes_per_chip": int(chip)}
  out["total"] = {"params": int(sum(out[c]["params"] for c in COMPONENTS)), "bytes_per_chip": int(per_chip)}
  moe = config.model.moe
  counts = param_counts(shapes, logical, moe.top_k, moe.num_experts)
  out["active"] = {"params": counts["active"]}  # per token: top_k of num_experts experts
  return out


def format_table(summary: dict) -> str:
  lines = [f"mesh: {summary['mesh']}", f"{'component':<12}{'params':>18}{'GiB/chip (params+Adam)':>26}"]
  for name in COMPONENTS + ("total",):
    row = summary[name]
    lines.append(f"{name:<12}{row['params']:>18,}{row['bytes_per_chip'] / 2**30:>26.3f}")
  if summary["active"]["params"] != summary["total"]["params"]:
    lines.append(f"{'active':<12}{summary['active']['params']:>18,}   (per token)")
  return "\n".join(lines)


def _define_flags():
  """Flags are defined when the tool runs, not at import, so tests may import several tools."""
  config_flags.DEFINE_config_file("config", None, cli.CONFIG_HELP, lock_config=True)
  flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
  flags.DEFINE_integer("devices", 0, "Devices filling a -1 mesh axis (default: the visible ones).")


def main(argv):
  del argv
  from mm15_jax import distributed

  distributed.initialize()  # several processes: the devices of all of them fill the mesh
  import jax
  devices = flags.FLAGS.devices or jax.device_count()
  summary = summarize(flags.FLAGS.config, devices)
  if distributed.is_main():
    print(json.dumps(summary) if flags.FLAGS.json else format_table(summary))


def run():
  from mm15_jax import distributed

  distributed.define_flags()
  _define_flags()
  cli.run(main, __doc__, required=["config"])


if __name__ == "__main__":
  run()
