"""Device mesh (data, fsdp, tensor), logical-axis rules, parameter and batch shardings.

The mesh uses Auto axis types (`jax.sharding.Mesh` semantics): parameters and batches are
placed with explicit NamedShardings at the jit boundary, the model's activations are
constrained by their logical names (`ActivationLayout`, installed by the train and eval
steps) and XLA's partitioner propagates the rest. (`jax.make_mesh` alone would default to
Explicit axes, under which every op must agree on shardings.)

This is FSDP (ZeRO-3): parameters and optimizer moments are split along `embed` over `fsdp`,
activations along their rows over (data, fsdp), so XLA all-gathers each layer's weights for
its matmuls and reduce-scatters their gradients; `tensor` splits heads, MLP and vocabulary.

Parameters name their dimensions with `logical_axes` metadata and activations with
`models.partitioning` names; `LOGICAL_AXIS_RULES` is the one table mapping both to mesh axes. A dimension that a mesh axis does not divide (e.g.
SmolLM2's 9 heads on tensor=2) is replicated along that axis with a logged warning, or refused
with a ValueError when `on_indivisible="error"`.
"""

import dataclasses
import logging
import math
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from im_jax.models import partitioning as act

MESH_AXES = ("data", "fsdp", "tensor")
# The rows of a batch are split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
# logical dimension name -> mesh axis (or axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # Activations: rows split like the batch; heads, MLP and vocabulary as their weights.
    (act.BATCH, BATCH_AXES),
    (act.LENGTH, None),
    (act.EMBED, None),
    (act.HEADS, "tensor"),
    (act.KV_HEADS, "tensor"),
    (act.HEAD_DIM, None),
    (act.MLP, "tensor"),
    (act.VOCAB, "tensor"),
)

OnIndivisible = Literal["replicate", "error"]
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; exactly one may be -1 to take the remaining devices."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  on_indivisible: OnIndivisible = "replicate"

  def __post_init__(self):
    for axis in MESH_AXES:  # the fields are the mesh.* config keys
      if not (getattr(self, axis) >= 1 or getattr(self, axis) == -1):
        raise ValueError(f"{axis} must be >= 1 or -1, got {getattr(self, axis)}")

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills a single -1 entry; raises a clear error when sizes and devices disagree."""
  shape = tuple(int(s) for s in shape)
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  fixed = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are not "
                       f"divisible by the fixed axes' product {fixed}")
    shape = tuple(num_devices // fixed if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"but {num_devices} are available")
  return shape


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default all); jax.make_mesh orders them for the topology."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(config.shape, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    *, rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
                    on_indivisible: OnIndivisible = "replicate",
                    name: str = "array", warn: bool = True) -> PartitionSpec:
  """PartitionSpec for an array whose dimensions carry logical names.

  Mesh axes of size 1 are dropped; an axis already used by an earlier dimension is not
  reused; an axis that does not divide the dimension is replicated (warning) or refused.
  """
  if logical_axes is None:
    return PartitionSpec()
  if len(logical_axes) != len(shape):
    raise ValueError(f"{name}: logical_axes {tuple(logical_axes)} do not match shape "
                     f"{tuple(shape)}")
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for logical, size in zip(logical_axes, shape):
    if logical is not None and logical not in table:
      raise ValueError(f"{name}: logical axis {logical!r} has no sharding rule; known: "
                       f"{sorted(table)}")
    kept = []
    for axis in _as_tuple(table.get(logical)):
      n = mesh.shape[axis]
      if n == 1 or axis in used:
        continue
      ways = n * math.prod(mesh.shape[a] for a in kept)
      if size % ways:
        message = (f"{name}: dimension {logical!r} of size {size} is not divisible by mesh "
                   f"axis {axis!r} (total {ways} ways)")
        if on_indivisible == "error":
          raise ValueError(message + "; choose mesh sizes that divide it, or "
                           "on_indivisible='replicate'")
        if warn:
          _log.warning("%s; replicating it along %r", message, axis)
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def state_shardings(state: Any, mesh: Mesh, *,
                    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
                    on_indivisible: OnIndivisible = "replicate") -> Any:
  """NamedShardings for an (abstract) nnx.State, from each Variable's `logical_axes`.

  The result has the state's structure with each Variable replaced by its sharding, a valid
  prefix for jit's in/out_shardings. Variables without `logical_axes` are replicated.
  """

  def one(path, variable):
    spec = logical_to_spec(getattr(variable, "logical_axes", None), variable.shape, mesh,
                           rules=rules, on_indivisible=on_indivisible, name=_path_str(path))
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def sharding_fn(mesh: Mesh, *, rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
                on_indivisible: OnIndivisible = "replicate"
                ) -> Callable[[Sequence[str | None] | None, Sequence[int]], NamedSharding]:
  """`(logical_axes, shape) -> NamedSharding`: where model loaders place each parameter, the
  same place `state_shardings` gives it in the train state."""
  return lambda axes, shape: NamedSharding(mesh, logical_to_spec(
      axes, shape, mesh, rules=rules, on_indivisible=on_indivisible))


@dataclasses.dataclass(frozen=True)
class ActivationLayout:
  """The `models.partitioning.Layout` of a mesh: activations laid out by the rules table.

  Indivisible dimensions (SmolLM2's 9 heads on tensor=2) are replicated silently: the
  parameters' sharding already warned about them.
  """

  mesh: Mesh
  rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES

  def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    return logical_to_spec(logical_axes, shape, self.mesh, rules=self.rules, warn=False)

  def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, self.spec(logical_axes, x.shape)))


def batch_spec(mesh: Mesh, *, micro_batched: bool) -> PartitionSpec:
  """Rows over (data, fsdp); a leading micro-batch axis (grad accumulation) is not split."""
  rows = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
  return PartitionSpec(None, rows) if micro_batched else PartitionSpec(rows)


def batch_sharding(mesh: Mesh, *, micro_batched: bool) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh, micro_batched=micro_batched))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, *,
                 micro_batches: int | None = None) -> dict[str, jax.Array]:
  """Forms the global batch from this process's rows (`[local_rows, T]` numpy arrays).

  Every process passes only its own slice; `jax.make_array_from_process_local_data`
  assembles the global array. With `micro_batches=k` the rows are reshaped to
  `[k, local_rows / k, T]` for a train step with k-step gradient accumulation; with None
  the batch stays `[rows, T]` (evaluation).
  """
  sharding = batch_sharding(mesh, micro_batched=micro_batches is not None)
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    if micro_batches is not None:
      if value.shape[0] % micro_batches:
        raise ValueError(f"{value.shape[0]} local rows of {key!r} do not split into "
                         f"{micro_batches} micro-batches")
      value = value.reshape(micro_batches, value.shape[0] // micro_batches, *value.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
