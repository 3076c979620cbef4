"""Attention for packed rows: causal by position, never across segments.

One function serves training (S == T) and, later, decoding with a KV cache (S != T): the
mask is built from explicit segment ids and positions of both sides, never from array indices.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from im_jax.models import blocked_attention, partitioning, splash

Implementation = Literal["auto", "xla", "splash", "cudnn", "blocked"]
IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn", "blocked")


# `auto` picks blocked on CPU for self-attention over rows at least this long: 1.07x the
# dense path's train step at 4 x 512 (SmolLM2), more at 2048 (docs/benchmarks.md); shorter
# rows have too few blocks to skip.
BLOCKED_MIN_LENGTH = 256


def resolve_implementation(implementation: str, q_length: int | None = None,
                           kv_length: int | None = None) -> str:
  """`auto`: splash where the trace's devices are TPUs; blocked on CPUs for self-attention
  over rows of BLOCKED_MIN_LENGTH or more; else xla. cuDNN is never picked (unverified
  without a GPU), nor blocked on GPUs (unmeasured there)."""
  if implementation != "auto":
    return implementation
  layout = partitioning.current()
  platform = (layout.mesh.devices.flat[0].platform if layout is not None
              else jax.default_backend())
  if platform == "tpu":
    return "splash"
  if (platform == "cpu" and q_length is not None and q_length == kv_length
      and q_length >= BLOCKED_MIN_LENGTH):
    return "blocked"
  return "xla"


def attention_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
) -> jax.Array:
  """Boolean mask `[B, T, S]`: same segment, not padding, and kv_pos <= q_pos."""
  same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  real = (q_segment_ids[:, :, None] != 0) & (kv_segment_ids[:, None, :] != 0)
  causal = kv_positions[:, None, :] <= q_positions[:, :, None]
  return same & real & causal


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    scale: float | None = None,
    implementation: Implementation = "xla",
) -> jax.Array:
  """Grouped-query attention over packed rows.

  Args:
    q: `[B, T, H, hd]` queries (RoPE already applied).
    k: `[B, S, K, hd]` keys, K divides H (query head h reads kv head h // (H // K), as
      transformers' `repeat_kv` does).
    v: `[B, S, K, hd]` values.
    q_segment_ids, kv_segment_ids: `[B, T]`, `[B, S]` int; 0 marks padding.
    q_positions, kv_positions: `[B, T]`, `[B, S]` int positions within each segment.
    scale: logit scale, default `hd ** -0.5`.
    implementation: "xla" (plain einsums, runs everywhere), "splash" (the Pallas TPU kernel,
      self-attention only: q and kv share segment ids; interpreted off TPU, see splash.py),
      "cudnn" (`jax.nn.dot_product_attention` with the same dense mask; GPU only, not yet
      verified on a GPU: the mask layout is tested through that function's XLA path),
      "blocked" (plain XLA that skips the (q block, kv block) pairs holding no live score;
      self-attention only, see blocked_attention.py) or "auto" (splash on TPUs, blocked on
      CPUs for rows of BLOCKED_MIN_LENGTH or more, else xla).

  Returns:
    `[B, T, H, hd]` in q's dtype. Rows that may attend to nothing (padding) are exactly 0.
  """
  b, t, h, hd = q.shape
  kv_heads = k.shape[2]
  if h % kv_heads:
    raise ValueError(f"query heads {h} not divisible by kv heads {kv_heads}")
  scale = hd**-0.5 if scale is None else scale
  implementation = resolve_implementation(implementation, q.shape[1], k.shape[1])
  if implementation == "splash":
    if q.shape[1] != k.shape[1]:
      raise ValueError("splash attention is self-attention over one packed row (T == S)")
    return splash.splash_attention(q, k, v, q_segment_ids, scale=scale)
  if implementation == "blocked":
    if q.shape[1] != k.shape[1]:
      raise ValueError("blocked attention is self-attention over one packed row (T == S); "
                       "use xla with a KV cache")
    return blocked_attention.blocked_attention(q, k, v, q_segment_ids, q_positions, scale=scale)
  mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)
  any_visible = jnp.any(mask, axis=-1)  # [B, T]

  if implementation == "cudnn":
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale, implementation="cudnn")
  elif implementation == "xla":
    out = _xla_attention(q, k, v, mask, scale)
  else:
    raise ValueError(f"unknown attention implementation {implementation!r}")
  return jnp.where(any_visible[:, :, None, None], out, 0).astype(q.dtype)


def _xla_attention(q, k, v, mask, scale):
  """Dense GQA attention as two batched matmuls over (row, kv head).

  A kv head's query group is folded into the query length ([B, K, G*T, hd]), so both
  products and their gradients are plain 3-D batched matmuls: the grouped 5-D einsums
  they replace ran at a third of the matmul rate on CPU, their backward worse.
  """
  b, t, h, hd = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  groups = h // kv_heads
  qh = q.reshape(b, t, kv_heads, groups, hd).transpose(0, 2, 3, 1, 4)
  qh = qh.reshape(b, kv_heads, groups * t, hd)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, hd]
  # Scores and softmax in float32 whatever the compute dtype.
  logits = jnp.einsum("bkmd,bksd->bkms", qh, kh, preferred_element_type=jnp.float32) * scale
  m = jnp.broadcast_to(mask[:, None, None], (b, kv_heads, groups, t, s))
  # A finite fill keeps fully masked rows finite (uniform) instead of NaN; they are zeroed
  # by the caller.
  logits = jnp.where(m.reshape(b, kv_heads, groups * t, s), logits,
                     jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkms,bksd->bkmd", probs.astype(v.dtype), vh)
  return out.reshape(b, kv_heads, groups, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)
