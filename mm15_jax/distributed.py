"""Several JAX processes (jax.distributed): start-up for the command-line entry points, and
reading device values that span processes.

Entry points (train, evaluation, generate, video) call `define_flags()` at import, for
--coordinator_address, --num_processes and --process_id, and `initialize()` first thing in
main: it starts jax.distributed when those are given (launch/local.sh) or MM15_DISTRIBUTED=1
(TPU pods, GKE, SLURM: jax reads the rest from the environment).
"""

import os

import jax
import numpy as np
from absl import flags
from absl import logging as absl_logging
from jax.experimental import multihost_utils


def define_flags() -> None:
  """The multi-host flags; a second call (another entry point imported too) does nothing."""
  if "coordinator_address" in flags.FLAGS:
    return
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs (jax.distributed).")
  flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")


def initialize() -> None:
  """jax.distributed.initialize when asked for (module docstring); before any other use of jax."""
  fl = flags.FLAGS
  if fl.coordinator_address or os.environ.get("MM15_DISTRIBUTED") == "1":
    jax.distributed.initialize(fl.coordinator_address, fl.num_processes, fl.process_id)
    prefix_log_lines(jax.process_index())


class _ProcessPrefix(absl_logging.PythonFormatter):
  def __init__(self, index: int):
    super().__init__()
    self._prefix = f"[process {index}] "

  def format(self, record):
    return self._prefix + super().format(record)


def prefix_log_lines(index: int) -> None:
  """Warnings and errors name their process: several processes share a job's log. (Process 0
  alone prints results and progress.)"""
  absl_logging.get_absl_handler().setFormatter(_ProcessPrefix(index))


def _local(x) -> bool:
  """Whether this process can read all of x by itself."""
  return not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated


def host_value(tree):
  """jax.device_get of a pytree whose arrays may span processes: those this process does not
  hold whole are gathered from every process (a collective: every process must call this
  with the same arrays). With one process, jax.device_get itself (np.asarray for one array)."""
  if isinstance(tree, jax.Array) and _local(tree):  # decoding's case, once per run: no extra work
    return np.asarray(tree)
  if all(_local(x) for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return jax.tree.map(lambda x: jax.device_get(x) if _local(x) else multihost_utils.process_allgather(x, tiled=True),
                      tree)


def from_main(value: int) -> int:
  """Process 0's integer, on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def is_main() -> bool:
  """Process 0: the one that writes reports and prints results."""
  return jax.process_index() == 0
