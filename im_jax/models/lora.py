"""LoRA adapters for multi-dimensional kernels: y = W x + (alpha / r) * B A dropout(x).

A `Dense` kernel here is `[*in_dims, *out_dims]` (q: `[embed, heads, head_dim]`, o:
`[heads, head_dim, embed]`), so an adapter is A `[*in_dims, r]` and B `[r, *out_dims]`: the
2-D LoRA over the flattened in/out dims, each factor sharded along its base weight's logical
axes (the rank dimension is replicated). `nnx.LoRA` cannot do this: it is 2-D only.

Adapters are `nnx.LoRAParam`s, initialised as LoRA (and PEFT) do: A uniform in
+-1/sqrt(fan_in) (kaiming-uniform with a = sqrt(5)), B zero, always float32 whatever the base's
dtype. `nnx.LoRAParam` subclasses `nnx.Param`: code that selects `nnx.Param` gets adapters
too, so select `nnx.LoRAParam` first (see `TRAINABLE`/`FROZEN` in train/step.py).

Two trace-time switches, set around a forward pass:
- `disabled()`: run the base model alone (e.g. a KL reference: the same weights, no copy);
- `dropout_rng(key)`: the key LoRA dropout draws from (training only; none: no dropout).
"""

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Config name -> the module attribute path (inside a decoder layer) of the adapted Dense.
TARGETS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
DEFAULT_TARGETS = tuple(TARGETS)
ATTR = "lora"  # the adapter's attribute on the adapted Dense: paths end .../lora/{a,b}

_disabled = contextvars.ContextVar("lora_disabled", default=False)
_dropout_key = contextvars.ContextVar("lora_dropout_key", default=None)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0  # 0: no adapters
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  dropout: float = 0.0

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"rank must be >= 0, got {self.rank}")
    if not (math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"alpha must be > 0, got {self.alpha}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ValueError(f"targets {','.join(self.targets)!r}: give distinct names among "
                       f"{','.join(TARGETS)}")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
  """'q,v' -> ('q', 'v') (the config key is a comma-separated string)."""
  return tuple(t.strip() for t in text.split(",") if t.strip())


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Within: every adapter is skipped, so the model computes the base model's outputs."""
  token = _disabled.set(True)
  try:
    yield
  finally:
    _disabled.reset(token)


@contextlib.contextmanager
def dropout_rng(key: jax.Array | None) -> Iterator[None]:
  """Within: LoRA dropout (if configured) draws from `key`; None turns it off."""
  token = _dropout_key.set(key)
  try:
    yield
  finally:
    _dropout_key.reset(token)


def current_dropout_rng() -> jax.Array | None:
  return _dropout_key.get()


def _a_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Adapter(nnx.Module):
  """The A and B factors of one `Dense` kernel (`stack`: a leading `layers` dim, for scan)."""

  def __init__(self, shape: Sequence[int], axes: Sequence[str | None], n_in: int,
               config: LoraConfig, salt: int, *, rngs: nnx.Rngs, stack: int | None = None):
    r = config.rank
    in_shape, out_shape = tuple(shape[:n_in]), tuple(shape[n_in:])
    in_axes, out_axes = tuple(axes[:n_in]), tuple(axes[n_in:])
    lead, lead_axes = ((stack,), ("layers",)) if stack is not None else ((), ())
    a = _a_init(math.prod(in_shape))(rngs.params(), (*lead, *in_shape, r), jnp.float32)
    self.a = nnx.LoRAParam(a, logical_axes=(*lead_axes, *in_axes, None))
    self.b = nnx.LoRAParam(jnp.zeros((*lead, r, *out_shape), jnp.float32),
                           logical_axes=(*lead_axes, None, *out_axes))
    self.n_in, self.scale, self.dropout, self.salt = n_in, config.scale, config.dropout, salt

  def __call__(self, x: jax.Array, dtype) -> jax.Array | None:
    """The adapter's addition to the kernel's output, or None while `disabled()`."""
    if _disabled.get():
      return None
    key = _dropout_key.get()
    if self.dropout > 0 and key is not None:
      keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt), 1.0 - self.dropout,
                                  x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    h = jnp.tensordot(x.astype(dtype), self.a[...].astype(dtype), axes=self.n_in)
    return jnp.tensordot(h, self.b[...].astype(dtype), axes=1) * jnp.asarray(self.scale, dtype)


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float,
                  stacked: bool) -> jax.Array:
  """W + scale * A B over the flattened in/out dims, in float32 (or wider)."""
  lead = 1 if stacked else 0
  r = a.shape[-1]
  a2 = a.reshape(*a.shape[:lead], -1, r).astype(jnp.float32)
  b2 = b.reshape(*b.shape[:lead], r, -1).astype(jnp.float32)
  delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
  return kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32)) + scale * delta


def adapters(model_or_state: Any) -> dict[tuple, tuple[Any, Any]]:
  """Dense path (e.g. ('layers', 'attn', 'q_proj')) -> (A, B) variables, for every adapter."""
  state = model_or_state
  if isinstance(state, nnx.Module):
    state = nnx.state(state, nnx.LoRAParam)
  flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
  return {p[:-2]: (v, flat[(*p[:-2], ATTR, "b")]) for p, v in flat.items()
          if len(p) >= 2 and p[-2:] == (ATTR, "a")}


def merged_state(model: nnx.Module, scale: float) -> nnx.State:
  """The model's base parameters with every adapter folded into its kernel (no adapters)."""
  base = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam))))
  base = {k: v for k, v in base.items() if isinstance(v, nnx.Param)}
  for path, (a, b) in adapters(model).items():
    kernel = base[(*path, "kernel")]
    stacked = (a.get_metadata().get("logical_axes") or (None,))[0] == "layers"
    base[(*path, "kernel")] = kernel.replace(
        merged_kernel(kernel[...], a[...], b[...], scale, stacked))
  return nnx.from_flat_state(base)
