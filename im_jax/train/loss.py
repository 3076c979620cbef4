"""Float32 cross-entropy on packed rows, returned as sums so accumulation stays exact.

Every loss here is a `(numerator, denominator)` pair plus metric sums. A train step sums
each of them over all micro-batches (and devices) of an optimizer step and divides once,
so gradient accumulation, data parallelism and packing never change the loss.

Normalisations (`LossConfig.normalization`):
  token:    numerator = sum_t w_t * CE_t, denominator = sum_t w_t.
  sequence: numerator = sum over segments s of (sum_{t in s} w_t CE_t) / (sum_{t in s} w_t),
            denominator = number of segments with positive weight.
            Each example (segment of a packed row) counts equally: the paper's per-example
            mean followed by the mean over examples (docs/paper.md).

Metric sums are unweighted and independent of the loss mode, per target-kind group:
output (assistant + eos) and instruction (system + user), so IT and IM runs compare on the
same footing.
"""

import dataclasses
from typing import Literal, Mapping

import jax
import jax.numpy as jnp

from im_jax.data.kinds import INSTRUCTION_KINDS, OUTPUT_KINDS

Normalization = Literal["token", "sequence"]
Batch = Mapping[str, jax.Array]
LossSums = dict[str, jax.Array]

# Keys of the sums every loss function returns; the step sums them over micro-batches.
NUMERATOR = "numerator"
DENOMINATOR = "denominator"
METRIC_SUM_KEYS = ("output_ce_sum", "output_tokens", "instruction_ce_sum", "instruction_tokens")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """How the per-token cross-entropy is reduced."""

  normalization: Normalization = "sequence"  # the paper's averaging; "token" also offered
  # Sequence positions per cross-entropy chunk; 0 computes full [B, T, V] logits at once.
  # With chunking only [B, chunk, V] logits exist at a time (forward and backward).
  chunk_size: int = 0

  def __post_init__(self):
    if self.normalization not in ("token", "sequence"):
      raise ValueError(f"loss normalization must be 'token' or 'sequence', got "
                       f"{self.normalization!r}")
    if self.chunk_size < 0:
      raise ValueError(f"loss chunk_size must be >= 0, got {self.chunk_size}")


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token CE in float32: [..., V] logits, [...] int targets -> [...]."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  # A one-hot contraction rather than a gather: XLA fuses it into the reduction and it
  # partitions cleanly when the vocabulary axis is sharded.
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
  return log_z - jnp.sum(logits * one_hot, axis=-1)


def project_logits(hidden: jax.Array, output_embedding: jax.Array) -> jax.Array:
  """[B, T, D] hidden states @ [D, V] output embedding -> float32 logits."""
  return jnp.einsum("btd,dv->btv", hidden, output_embedding,
                    preferred_element_type=jnp.float32)


def chunked_cross_entropy(hidden: jax.Array, output_embedding: jax.Array, targets: jax.Array,
                          chunk_size: int) -> jax.Array:
  """Per-token CE without materialising [B, T, V] logits: a scan over sequence chunks.

  Each chunk's logits are recomputed in the backward pass (jax.checkpoint), so the peak is
  one [B, chunk_size, V] block in both directions. Equal to the unchunked computation.
  """
  batch, length, dim = hidden.shape
  if chunk_size <= 0 or chunk_size >= length:
    return cross_entropy(project_logits(hidden, output_embedding), targets)
  pad = -length % chunk_size  # padded positions are computed, then dropped
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = (length + pad) // chunk_size
  hidden_chunks = hidden.reshape(batch, n, chunk_size, dim).swapaxes(0, 1)
  target_chunks = targets.reshape(batch, n, chunk_size).swapaxes(0, 1)

  @jax.checkpoint
  def body(carry, xs):
    h, t = xs
    return carry, cross_entropy(project_logits(h, output_embedding), t)

  _, ce = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
  return ce.swapaxes(0, 1).reshape(batch, length + pad)[:, :length]


def segment_sums(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Per-row sums by segment id: [B, T] values, [B, T] ids -> [B, T + 1] (index = id).

  A row of length T holds at most T segments, so T + 1 slots (0 = padding) always suffice;
  no separate max-segments bound is needed.
  """
  slots = segment_ids.shape[-1] + 1
  return jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=slots))(
      values, segment_ids)


def _kind_mask(kinds: jax.Array, group: tuple[int, ...]) -> jax.Array:
  mask = jnp.zeros(kinds.shape, dtype=bool)
  for kind in group:
    mask = mask | (kinds == int(kind))
  return mask


def loss_sums(ce: jax.Array, batch: Batch, normalization: Normalization) -> LossSums:
  """Reduces per-token CE [B, T] to the numerator, denominator and metric sums."""
  ce = ce.astype(jnp.float32)
  weights = batch["loss_weights"].astype(jnp.float32)
  segments = batch["segment_ids"]
  # The contract puts no weight on padding; zero it anyway so a stray weight cannot leak.
  weights = jnp.where(segments > 0, weights, 0.0)
  weighted = weights * ce
  if normalization == "token":
    numerator, denominator = jnp.sum(weighted), jnp.sum(weights)
  elif normalization == "sequence":
    seg_num = segment_sums(weighted, segments)[:, 1:]
    seg_den = segment_sums(weights, segments)[:, 1:]
    counted = seg_den > 0
    numerator = jnp.sum(jnp.where(counted, seg_num / jnp.where(counted, seg_den, 1.0), 0.0))
    denominator = jnp.sum(counted.astype(jnp.float32))
  else:
    raise ValueError(f"unknown loss normalization {normalization!r}")
  kinds = batch["target_kinds"]
  real = segments > 0
  out = _kind_mask(kinds, OUTPUT_KINDS) & real
  inst = _kind_mask(kinds, INSTRUCTION_KINDS) & real
  return {
      NUMERATOR: numerator,
      DENOMINATOR: denominator,
      "output_ce_sum": jnp.sum(jnp.where(out, ce, 0.0)),
      "output_tokens": jnp.sum(out.astype(jnp.float32)),
      "instruction_ce_sum": jnp.sum(jnp.where(inst, ce, 0.0)),
      "instruction_tokens": jnp.sum(inst.astype(jnp.float32)),
  }


def finalize(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Turns summed (over micro-batches/steps) sums into means; empty groups give 0."""

  def ratio(num, den):
    return jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0.0)

  return {
      "loss": ratio(sums[NUMERATOR], sums[DENOMINATOR]),
      "loss_denominator": sums[DENOMINATOR],
      "output_loss": ratio(sums["output_ce_sum"], sums["output_tokens"]),
      "output_tokens": sums["output_tokens"],
      "instruction_loss": ratio(sums["instruction_ce_sum"], sums["instruction_tokens"]),
      "instruction_tokens": sums["instruction_tokens"],
  }
