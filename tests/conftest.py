"""Tests run on CPU with 8 simulated devices and a persistent compilation cache."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs reads this when imported: without it, its first bucket access waits ~60 s on a gRPC
# probe the test emulator (gcs_emulator.py) does not answer.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after the environment is set)
from absl import flags  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/mm15_jax/jax_test_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# grain reads absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
