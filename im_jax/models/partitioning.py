"""Logical names for activation dimensions, and the hook that turns them into shardings.

Models name the dimensions of their activations as they name those of their parameters
(`constrain(x, ("act_batch", "act_length", "act_embed"))`) and know nothing of meshes. Whoever
traces the model under a mesh installs the mapping for that trace:

    with partitioning.activation_layout(layout):  # a Layout: mesh, spec(), constrain()
      loss = loss_fn(model, batch)

The trainer's layout applies `jax.lax.with_sharding_constraint` from its one logical-axis
rules table (train/sharding.py). Without the constraints XLA propagates the parameters' FSDP
sharding (hidden dimension split) onto the activations and every device holds every row; with
them the rows stay split from the embedding to the loss and weights are gathered per layer.
Outside the context (tests, decoding) `constrain` returns `x` unchanged.
"""

import contextlib
import contextvars
from typing import Iterator, Protocol, Sequence

import jax

# Activation dimensions (parameters use "vocab", "embed", "heads", ... without the prefix).
BATCH = "act_batch"
LENGTH = "act_length"
EMBED = "act_embed"
HEADS = "act_heads"
KV_HEADS = "act_kv_heads"
HEAD_DIM = "act_head_dim"
MLP = "act_mlp"
VOCAB = "act_vocab"


class Layout(Protocol):
  """How the current trace lays activations out over a mesh (the trainer's rules table)."""

  mesh: jax.sharding.Mesh

  def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int]
           ) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of an activation with these logical dimensions."""

  def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`x` laid out as `spec` says (`jax.lax.with_sharding_constraint`)."""


_current: contextvars.ContextVar[Layout | None] = contextvars.ContextVar(
    "im_jax_activation_layout", default=None)


@contextlib.contextmanager
def activation_layout(layout: Layout | None) -> Iterator[None]:
  """Within the block, `constrain` and `current` use `layout` (None: no constraints)."""
  token = _current.set(layout)
  try:
    yield
  finally:
    _current.reset(token)


def current() -> Layout | None:
  """The layout of the trace in progress: kernels that run per device (splash attention)
  take their mesh and per-device specs from it."""
  return _current.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Asks for `x` to be laid out by its dimensions' logical names (identity by default)."""
  layout = _current.get()
  if layout is None:
    return x
  if len(logical_axes) != x.ndim:
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {x.shape}")
  return layout.constrain(x, logical_axes)
