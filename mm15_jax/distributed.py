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
import orbax.checkpoint as ocp
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


# How long a process waits for the others to compile a program before its first run.
COMPILE_BARRIER_TIMEOUT_S = 3600


class CompiledTogether:
  """A jitted function whose first call compiles it on this process, then waits (the
  coordination service's barrier, no collective) until every process has compiled it too.

  On CPU, jax's cross-process collectives (gloo) give up when the processes reach a new group
  of devices more than 30 s apart, and on a busy host one process can compile a train step that
  much later than another: the faster one's first step then fails ("Gloo context initialization
  failed"). Compiled on both first, the processes start the program together. With one process,
  the function itself."""

  _barriers = 0  # each barrier's key is new (processes build these in the same order)

  def __init__(self, jitted, name: str):
    self.jitted, self.name, self.waited = jitted, name, jax.process_count() == 1

  def __call__(self, *args):
    if not self.waited:
      self.jitted.lower(*args).compile()  # the jit's cache keeps it: the call below reuses it
      CompiledTogether._barriers += 1
      key = f"mm15 compiled {self.name} {CompiledTogether._barriers}"
      ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=COMPILE_BARRIER_TIMEOUT_S * 1000)
      self.waited = True
    return self.jitted(*args)
