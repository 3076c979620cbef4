"""Multi-host runs: start JAX's multi-controller runtime before any other JAX use.

Every host (process) runs the same command. `initialize()` connects the processes through
`jax.distributed.initialize`, from the first of these that is set:

1. explicit settings: the options `--coordinator_address --num_processes --process_id` of
   the commands that take them (`add_arguments`: `python -m im_jax.train`), else the
   environment variables `IM_JAX_COORDINATOR`, `IM_JAX_NUM_PROCESSES`, `IM_JAX_PROCESS_ID`;
2. a cluster JAX detects by itself: Cloud TPU VMs and pod slices (metadata server), SLURM
   (`srun`), Open MPI, Kubernetes JobSets;
3. nothing: a single process, no coordinator.

`IM_JAX_DISTRIBUTED=off` skips step 2 (e.g. a one-off script inside a SLURM allocation).
When several processes share CPUs (tests, or CPU clusters) the CPU collectives are set to gloo:
without it a cross-process CPU computation has no way to communicate.

After it, `jax.process_index()` / `jax.process_count()` tell each process its place: process 0
writes logs, reports and exports; every process reads its own data shard and takes part in
every collective (train steps, checkpoint saves and restores, gathers for export).
"""

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

ENV_COORDINATOR = "IM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "IM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "IM_JAX_PROCESS_ID"
ENV_DISTRIBUTED = "IM_JAX_DISTRIBUTED"  # "off": no cluster auto-detection
ENV_HEARTBEAT = "IM_JAX_HEARTBEAT_TIMEOUT"  # seconds before a silent peer fails the job
ENV_INIT_TIMEOUT = "IM_JAX_INIT_TIMEOUT"  # seconds to wait for all processes to connect



def add_arguments(parser: Any) -> None:
  """The multi-process options, on an argparse parser of a command that starts JAX."""
  group = parser.add_argument_group(
      "multi-process runs", "Every host runs the same command. Unset: the environment, else "
      "the cluster's own\ndetection (docs/multihost.md).")
  group.add_argument("--coordinator_address", metavar="HOST:PORT",
                     help=f"process 0's address (or ${ENV_COORDINATOR})")
  group.add_argument("--num_processes", type=int, metavar="N",
                     help=f"number of processes (or ${ENV_NUM_PROCESSES})")
  group.add_argument("--process_id", type=int, metavar="I",
                     help=f"this process's index in [0, N) (or ${ENV_PROCESS_ID})")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Explicit multi-process settings; all three are needed."""

  coordinator_address: str
  num_processes: int
  process_id: int

  def __post_init__(self):
    if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"process_id {self.process_id} is not in [0, {self.num_processes})")
    if ":" not in self.coordinator_address:
      raise ValueError(f"coordinator address {self.coordinator_address!r} is not host:port")


def explicit_settings(flag_values: Mapping[str, Any] | None = None,
                      environ: Mapping[str, str] | None = None) -> Settings | None:
  """Settings from the options (`add_arguments`; `vars(args)` will do), else environment
  variables; None when neither sets any.

  Each of the three values is taken from its option if given, else its variable; a partial
  set is an error (a process that silently ran alone would train on one shard of the data).
  """
  flag_values = {} if flag_values is None else flag_values
  environ = os.environ if environ is None else environ
  raw = {
      "coordinator_address": flag_values.get("coordinator_address") or environ.get(
          ENV_COORDINATOR) or None,
      "num_processes": flag_values.get("num_processes"),
      "process_id": flag_values.get("process_id"),
  }
  for key, var in (("num_processes", ENV_NUM_PROCESSES), ("process_id", ENV_PROCESS_ID)):
    if raw[key] is None and environ.get(var, "") != "":
      try:
        raw[key] = int(environ[var])
      except ValueError:
        raise ValueError(f"${var}={environ[var]!r} is not an integer") from None
  given = [k for k, v in raw.items() if v is not None]
  if not given:
    return None
  if len(given) < len(raw):
    missing = sorted(set(raw) - set(given))
    raise ValueError(f"multi-process settings are incomplete: {given} given, {missing} missing "
                     f"(options --{' --'.join(raw)}, or ${ENV_COORDINATOR}, "
                     f"${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID})")
  return Settings(**raw)


def _timeouts(environ: Mapping[str, str]) -> dict[str, int]:
  out = {}
  if environ.get(ENV_HEARTBEAT):
    out["heartbeat_timeout_seconds"] = int(environ[ENV_HEARTBEAT])
  if environ.get(ENV_INIT_TIMEOUT):
    out["initialization_timeout"] = int(environ[ENV_INIT_TIMEOUT])
  return out


def _use_gloo() -> None:
  # Only the CPU client reads this; it must be set before the first backend starts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(settings: Settings | None = None) -> None:
  """Connects this process to the others (see the module docstring); call it once, first.

  A single process with nothing configured returns without starting anything.
  """
  if jax.distributed.is_initialized():
    return
  environ = os.environ
  settings = settings or explicit_settings()
  timeouts = _timeouts(environ)
  if settings is not None:
    if settings.num_processes > 1:
      _use_gloo()
    jax.distributed.initialize(settings.coordinator_address, settings.num_processes,
                               settings.process_id, **timeouts)
  elif environ.get(ENV_DISTRIBUTED, "").lower() in ("off", "0", "false"):
    return
  else:
    _use_gloo()  # harmless when the cluster turns out to be GPUs or TPUs
    try:
      jax.distributed.initialize(**timeouts)  # JAX's own cluster detection
    except ValueError as e:
      if "should be defined" not in str(e):  # anything but "no cluster found"
        raise
      log.debug("no cluster detected: single process")
      return
  log.info("process %d of %d (%d local / %d global devices)", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
  """True on the one process that writes files meant to exist once (logs, exports)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Blocks until every process reaches the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def fetchable(tree: Any) -> Any:
  """Makes every leaf readable on this process; all processes must call it together.

  An array sharded across processes (a parameter split over hosts by fsdp) cannot be fetched
  by any one of them (`jax.device_get` raises); `process_allgather` assembles it on every
  process, one leaf at a time, as numpy: a full host copy of those leaves per process. Leaves
  this process can already fetch (everything, in a single-process run) are returned as they
  are, so a single-process export still copies one parameter at a time.
  """
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return x

  return jax.tree.map(one, tree)
