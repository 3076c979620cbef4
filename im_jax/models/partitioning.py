"""Logical names for activation dimensions, and the hook that turns them into shardings.

Models name the dimensions of their activations as they name those of their parameters
(`constrain(x, ("act_batch", "act_length", "act_embed"))`) and know nothing of meshes. Whoever
traces the model under a mesh installs the mapping for that trace:

    with partitioning.activation_sharding(fn):  # fn(x, logical_axes) -> x
      loss = loss_fn(model, batch)

The trainer's `fn` applies `jax.lax.with_sharding_constraint` from its one logical-axis rules
table (train/sharding.py). Without the constraints XLA propagates the parameters' FSDP
sharding (hidden dimension split) onto the activations and every device holds every row; with
them the rows stay split from the embedding to the loss and weights are gathered per layer.
Outside the context (tests, decoding) `constrain` returns `x` unchanged.
"""

import contextlib
import contextvars
from typing import Callable, Iterator, Sequence

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

ConstrainFn = Callable[[jax.Array, Sequence[str | None]], jax.Array]

_current: contextvars.ContextVar[ConstrainFn | None] = contextvars.ContextVar(
    "im_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(fn: ConstrainFn | None) -> Iterator[None]:
  """Within the block, `constrain` calls `fn(x, logical_axes)` (None: no constraints)."""
  token = _current.set(fn)
  try:
    yield
  finally:
    _current.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Asks for `x` to be laid out by its dimensions' logical names (identity by default)."""
  fn = _current.get()
  if fn is None:
    return x
  if len(logical_axes) != x.ndim:
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {x.shape}")
  return fn(x, logical_axes)
