"""Per-device memory of a compiled step: what the trainer logs and `im_jax.plan` reports.

The compiler's `memory_analysis()` gives argument, output, alias, temporary and code bytes for
one device; the state's split into parameters and optimizer moments comes from the shardings
(bytes of each array's shard on one device), so no array needs to exist.
"""

import dataclasses
import logging
import math
from typing import Any

import jax

log = logging.getLogger(__name__)
GiB = 2**30
WARN_FRACTION = 0.9


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of arrays or ShapeDtypeStructs with shardings.

  Takes the largest shard (uneven splits are padded); arrays without a sharding count whole.
  """
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = tuple(leaf.shape)
    sh = getattr(leaf, "sharding", None)
    if sh is not None:
      shape = sh.shard_shape(shape)
    total += math.prod(shape) * jax.numpy.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes per device of one compiled train step (arguments are donated: state in place)."""

  params: int
  optimizer: int
  reference: int  # the frozen KL reference model (loss.kl_to_base > 0), else 0
  batch: int
  arguments: int  # state + batch, as the compiler counts them
  outputs: int
  aliased: int  # outputs written into donated arguments
  temporaries: int  # activations, gradients, collectives' buffers
  code: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  def as_dict(self) -> dict[str, int]:
    return {**dataclasses.asdict(self), "total": self.total}


def step_memory(compiled: Any, state: Any, batch: Any) -> StepMemory:
  """From a `jax.stages.Compiled` train step and its (abstract) state and batch."""
  m = compiled.memory_analysis()
  return StepMemory(
      params=shard_bytes((state.params, state.frozen)), optimizer=shard_bytes(state.opt_state),
      reference=shard_bytes(getattr(state, "reference", None)),
      batch=shard_bytes(batch), arguments=int(m.argument_size_in_bytes),
      outputs=int(m.output_size_in_bytes), aliased=int(m.alias_size_in_bytes),
      temporaries=int(m.temp_size_in_bytes), code=int(m.generated_code_size_in_bytes))


def device_memory_limit(device: jax.Device) -> int | None:
  """Bytes the runtime lets one device use (GPU/TPU), or None where it does not say (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - compile-only and some CPU devices raise
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def describe(mem: StepMemory, limit: int | None) -> str:
  reference = f"reference {mem.reference / GiB:.2f}, " if mem.reference else ""
  parts = (f"params {mem.params / GiB:.2f}, optimizer {mem.optimizer / GiB:.2f}, {reference}"
           f"temporaries {mem.temporaries / GiB:.2f}, batch {mem.batch / GiB:.3f}")
  of = f" of {limit / GiB:.2f} GiB ({mem.total / limit:.0%})" if limit else ""
  return f"compiled train step: {mem.total / GiB:.2f} GiB per device{of} ({parts} GiB)"


def log_step_memory(train_step: Any, state: Any, batch: Any, mesh: jax.sharding.Mesh
                    ) -> StepMemory:
  """Compiles the train step ahead of its first call (jit reuses the executable), logs its
  per-device memory, and warns above 90% of the device's memory."""
  with jax.set_mesh(mesh):
    compiled = train_step.jitted.lower(state, batch).compile()
  mem = step_memory(compiled, state, batch)
  limit = device_memory_limit(mesh.devices.flat[0])
  log.info("%s", describe(mem, limit))
  if limit and mem.total > WARN_FRACTION * limit:
    log.warning("the train step needs %.0f%% of device memory: it may run out; try "
                "model.remat_policy=full, a smaller micro-batch (train.grad_accum) or "
                "loss.chunk_size (python -m im_jax.plan shows each option)",
                100 * mem.total / limit)
  return mem
