"""Float32 cross-entropy on packed rows, returned as sums so accumulation stays exact.

Every loss here is a `(numerator, denominator)` pair plus metric sums. A train step sums
each of them over all micro-batches (and devices) of an optimizer step and divides once,
so gradient accumulation, data parallelism and packing never change the loss.

Normalisations (`LossConfig.normalization`):
  token:    numerator = sum_t w_t * CE_t, denominator = sum_t w_t.
  sequence: numerator = sum over segments s of (sum_{t in s} w_t CE_t) / (sum_{t in s} w_t),
            denominator = number of segments with positive weight.
            Each example (segment of a packed row) counts equally: the paper's per-example
            mean followed by the mean over examples (docs/paper.md, Paper recipes).

Metric sums are unweighted and independent of the loss mode, per target-kind group:
output (assistant + eos) and instruction (system + user), so IT and IM runs compare on the
same footing. Each group is reduced two ways:
  `output_loss`:             pooled over tokens: sum of CE over the group's tokens / their count;
  `output_loss_per_example`: each example's mean CE over its group tokens, averaged over the
                             examples that have any: the paper's held-out measure (its loss
                             script: batch size 1, one mean per example). It is the `sequence`
                             reduction with the group's tokens as weights.

With the KL-to-base term (`LossConfig.kl_to_base`, train/kl.py) a per-token KL joins the
numerator under the same weights and normalisation, and `kl` reports it alone.
"""

import dataclasses
import functools
import math
from typing import Literal, Mapping

import jax
import jax.numpy as jnp

from im_jax.data.kinds import INSTRUCTION_KINDS, OUTPUT_KINDS
from im_jax.models import partitioning as act

Normalization = Literal["token", "sequence"]
KLType = Literal["full", "target_token"]  # see train/kl.py
KL_TYPES = ("full", "target_token")
Batch = Mapping[str, jax.Array]
LossSums = dict[str, jax.Array]

# Keys of the sums every loss function returns; the step sums them over micro-batches.
NUMERATOR = "numerator"
DENOMINATOR = "denominator"
KL_NUMERATOR = "kl_numerator"  # only with a KL term: its part of NUMERATOR, before beta
METRIC_SUM_KEYS = ("output_ce_sum", "output_tokens", "instruction_ce_sum", "instruction_tokens",
                   "output_example_mean_sum", "output_examples",
                   "instruction_example_mean_sum", "instruction_examples")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """How the per-token cross-entropy is reduced."""

  normalization: Normalization = "sequence"  # the paper's averaging; "token" also offered
  # Sequence positions per cross-entropy chunk; 0 computes full [B, T, V] logits at once.
  # With chunking only [B, chunk, V] logits exist at a time (forward and backward).
  chunk_size: int = 0
  # beta of the KL-to-base term (train/kl.py): each token's loss is CE + beta * KL, weighted
  # and normalised as the CE alone is; 0 = off (no reference model at all).
  kl_to_base: float = 0.0
  kl_type: KLType = "full"  # full: KL over the vocabulary | target_token: log p - log p_base
  # The names of a mixture's sources (several only): rows carry 1-based `source_ids` and the
  # per-example group losses are also reported per source (`source_sums`).
  sources: tuple[str, ...] = ()
  # Per source (aligned with `sources`; empty: all 1): how many examples each example of that
  # source counts as in the loss (`@example_weight=` in the mixture syntax). Under `sequence`
  # an example's mean is scaled by it and the denominator counts it; under `token` its
  # tokens' weights are. The metrics never are.
  example_weights: tuple[float, ...] = ()

  def __post_init__(self):
    if self.normalization not in ("token", "sequence"):
      raise ValueError(f"normalization must be 'token' or 'sequence', got "
                       f"{self.normalization!r}")
    if self.chunk_size < 0:
      raise ValueError(f"chunk_size must be >= 0, got {self.chunk_size}")
    if not (math.isfinite(self.kl_to_base) and self.kl_to_base >= 0):
      raise ValueError(f"kl_to_base must be a finite number >= 0, got {self.kl_to_base}")
    if self.kl_type not in KL_TYPES:
      raise ValueError(f"kl_type must be one of {', '.join(KL_TYPES)}, got {self.kl_type!r}")
    if self.kl_type == "target_token" and self.kl_to_base >= 1:
      # CE_t + beta (log p(y_t) - log p_base(y_t)) = (1 - beta) CE_t + a constant.
      raise ValueError(f"kl_to_base={self.kl_to_base} with kl_type=target_token leaves "
                       "(1 - beta) x the cross-entropy to train on: use beta < 1 or kl_type=full")


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token CE in float32: [..., V] logits, [...] int targets -> [...]."""
  logits = logits.astype(jnp.float32)
  return jax.nn.logsumexp(logits, axis=-1) - target_logit(logits, targets)


def target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
  # A one-hot contraction rather than a gather: XLA fuses it into the reduction and it
  # partitions cleanly when the vocabulary axis is sharded.
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
  return jnp.sum(logits * one_hot, axis=-1)


def project_logits(hidden: jax.Array, output_embedding: jax.Array) -> jax.Array:
  """[B, T, D] hidden states @ [D, V] output embedding -> float32 logits."""
  logits = jnp.einsum("btd,dv->btv", hidden, output_embedding,
                      preferred_element_type=jnp.float32)
  return act.constrain(logits, (act.BATCH, act.LENGTH, act.VOCAB))


def chunked_cross_entropy(hidden: jax.Array, output_embedding: jax.Array, targets: jax.Array,
                          chunk_size: int) -> jax.Array:
  """Per-token CE [B, T] from hidden states, never holding more than [B, chunk, V] logits.

  A scan over sequence chunks (`chunk_size` <= 0: one chunk, the whole sequence) with a
  hand-written backward pass: the forward keeps only each position's log-normaliser; the
  backward recomputes a chunk's logits and forms (softmax - one_hot) * g in one pass. Besides
  bounding memory for 128k vocabularies this does fewer passes over the logits than autodiff
  of `cross_entropy`, which it equals (tested).
  """
  length = hidden.shape[1]
  n, (hidden, targets) = pad_to_chunks(chunk_size, hidden, targets)
  ce = _fused_ce(hidden, output_embedding, targets, n)
  return ce[:, :length]


def ce_and_numerator(hidden: jax.Array, output_embedding: jax.Array, targets: jax.Array,
                     token_grads: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """(per-token CE [B, T] for metrics, the loss numerator sum_t token_grads_t * CE_t).

  `token_grads` [B, T] is d numerator / d CE_t (`numerator_token_grads`): the numerator is
  linear in the CE, so it depends on the batch alone and is known before the backward pass.
  That lets the forward form the numerator's gradients (hidden states and output embedding)
  chunk by chunk while each chunk's logits are at hand; the backward only scales them. Three
  passes of the [D, V] matmul instead of `chunked_cross_entropy`'s four (its backward
  recomputes the logits): a quarter of the cross-entropy's FLOPs, on any backend. The CE
  returned carries no gradient, so the numerator is the only way to differentiate the loss.
  """
  length = hidden.shape[1]
  n, (hidden, targets, token_grads) = pad_to_chunks(chunk_size, hidden, targets,
                                                    token_grads.astype(jnp.float32))
  ce, numerator = _ce_numerator(hidden, output_embedding, targets, token_grads, n)
  return jax.lax.stop_gradient(ce[:, :length]), numerator


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ce_numerator(hidden, w, targets, token_grads, n):
  ce = _fused_ce_fwd(hidden, w, targets, n)[0]  # no gradient asked for: the forward alone
  return ce, jnp.sum(ce * token_grads)


def _ce_numerator_fwd(hidden, w, targets, token_grads, n):
  def body(dw, xs):
    h, t, tg = xs
    logits = project_logits(h, w)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    dh, dw_chunk = _backprop_logits(logits, log_z, t, tg, h, w)
    return dw + dw_chunk, (log_z - target_logit(logits, t), dh.astype(hidden.dtype))

  xs = (to_chunks(hidden, n), to_chunks(targets, n), to_chunks(token_grads, n))
  dw, (ce, dh) = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
  ce = from_chunks(ce)
  return (ce, jnp.sum(ce * token_grads)), (from_chunks(dh), dw.astype(w.dtype), ce)


def _ce_numerator_bwd(n, residuals, cotangents):
  del n
  dh, dw, ce = residuals
  # The CE output's cotangent is zero: `ce_and_numerator` stops its gradient.
  _, g = cotangents
  return (dh * g).astype(dh.dtype), (dw * g).astype(dw.dtype), None, ce * g


_ce_numerator.defvjp(_ce_numerator_fwd, _ce_numerator_bwd)


def pad_to_chunks(chunk_size: int, *xs: jax.Array) -> tuple[int, list[jax.Array]]:
  """(number of chunks, `xs` [B, T, ...] padded on T to a multiple of the chunk length).

  `chunk_size` <= 0: one chunk. Padded positions are computed, then dropped by the caller.
  """
  length = xs[0].shape[1]
  chunk = length if chunk_size <= 0 else min(chunk_size, length)
  pad = -length % chunk
  if pad:
    xs = [jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) for x in xs]
  return (length + pad) // chunk, list(xs)


def to_chunks(x: jax.Array, n: int) -> jax.Array:
  """[B, T, ...] -> [n, B, T / n, ...] (the scan axis first)."""
  return x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]).swapaxes(0, 1)


def from_chunks(x: jax.Array) -> jax.Array:
  return x.swapaxes(0, 1).reshape(x.shape[1], -1, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_ce(hidden, w, targets, n):
  return _fused_ce_fwd(hidden, w, targets, n)[0]


def _fused_ce_fwd(hidden, w, targets, n):
  def body(carry, xs):
    h, t = xs
    logits = project_logits(h, w)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return carry, (log_z - target_logit(logits, t), log_z)

  _, (ce, log_z) = jax.lax.scan(body, None, (to_chunks(hidden, n), to_chunks(targets, n)))
  return from_chunks(ce), (hidden, w, targets, log_z)


def _fused_ce_bwd(n, residuals, g):
  hidden, w, targets, log_z = residuals

  def body(dw, xs):
    h, t, lz, gc = xs
    dh, dw_chunk = _backprop_logits(project_logits(h, w), lz, t, gc, h, w)
    return dw + dw_chunk, dh.astype(hidden.dtype)

  xs = (to_chunks(hidden, n), to_chunks(targets, n), log_z, to_chunks(g, n))
  dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
  return from_chunks(dh), dw.astype(w.dtype), None


def _backprop_logits(logits, log_z, targets, g, h, w):
  """Float32 (d/dh, d/dw) of sum_t g_t CE_t for one chunk: (softmax - one_hot) * g, in one pass."""
  one_hot = jax.nn.one_hot(targets, w.shape[-1], dtype=jnp.float32)
  dlogits = ((jnp.exp(logits - log_z[..., None]) - one_hot) * g[..., None]).astype(w.dtype)
  dh = jnp.einsum("bcv,dv->bcd", dlogits, w, preferred_element_type=jnp.float32)
  return dh, jnp.einsum("bcd,bcv->dv", h, dlogits, preferred_element_type=jnp.float32)


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


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


def numerator_token_grads(batch: Batch, normalization: Normalization,
                          example_weights: tuple[float, ...] = ()) -> jax.Array:
  """d numerator / d CE_t [B, T] float32 for `ce_and_numerator`.

  The numerator is linear in the per-token CE, so its gradient depends on the batch alone:
  the loss weights (token), or each weight over its example's weight sum (sequence).
  """
  weights, segments = _loss_weights(batch), batch["segment_ids"]
  scale = _example_scale(batch, example_weights)
  return jax.grad(lambda ce: _normalized(ce, weights, segments, normalization, scale)[0])(
      jnp.zeros(weights.shape, jnp.float32))


def _example_scale(batch: Batch, example_weights: tuple[float, ...]) -> jax.Array | None:
  """Each token's example weight, from its row's 1-based `source_ids`; None when all are 1."""
  if not example_weights or all(w == 1.0 for w in example_weights):
    return None
  table = jnp.asarray((1.0,) + tuple(example_weights), jnp.float32)  # id 0: padding
  return table[batch["source_ids"]]


def _loss_weights(batch: Batch) -> jax.Array:
  # The contract puts no weight on padding; zero it anyway so a stray weight cannot leak.
  return jnp.where(batch["segment_ids"] > 0, batch["loss_weights"].astype(jnp.float32), 0.0)


def loss_sums(ce: jax.Array, batch: Batch, normalization: Normalization,
              kl: jax.Array | None = None, kl_to_base: float = 0.0,
              numerator: jax.Array | None = None, sources: tuple[str, ...] = (),
              example_weights: tuple[float, ...] = ()) -> LossSums:
  """Reduces per-token CE [B, T] to the numerator, denominator and metric sums.

  With a per-token `kl` [B, T] (train/kl.py) the numerator is that of CE + kl_to_base * KL:
  the KL weighted and normalised as the CE (the same denominator); KL_NUMERATOR holds its
  own numerator for the `kl` metric. `numerator`: the CE's numerator as `ce_and_numerator`
  formed it (differentiable; its `ce` then serves the metrics and denominator only).
  `sources`: a mixture's source names, whose per-example sums join (`source_sums`);
  `example_weights`: theirs (`LossConfig.example_weights`).
  """
  ce = ce.astype(jnp.float32)
  weights, segments = _loss_weights(batch), batch["segment_ids"]
  scale = _example_scale(batch, example_weights)
  ce_numerator, denominator = _normalized(ce, weights, segments, normalization, scale)
  numerator = ce_numerator if numerator is None else numerator
  kinds = batch["target_kinds"]
  real = segments > 0
  sums = {NUMERATOR: numerator, DENOMINATOR: denominator}
  if kl is not None:
    sums[KL_NUMERATOR] = _normalized(kl.astype(jnp.float32), weights, segments,
                                     normalization, scale)[0]
    sums[NUMERATOR] = numerator + kl_to_base * sums[KL_NUMERATOR]
  for group, kinds_of_group in (("output", OUTPUT_KINDS), ("instruction", INSTRUCTION_KINDS)):
    mask = _kind_mask(kinds, kinds_of_group) & real
    sums[f"{group}_ce_sum"] = jnp.sum(jnp.where(mask, ce, 0.0))
    sums[f"{group}_tokens"] = jnp.sum(mask.astype(jnp.float32))
    means, examples = per_example_means(ce, mask.astype(jnp.float32), segments)
    sums[f"{group}_example_mean_sum"], sums[f"{group}_examples"] = means, examples
  if sources:
    sums.update(source_sums(ce, batch, sources))
  return sums


def source_sums(ce: jax.Array, batch: Batch, sources: tuple[str, ...]) -> LossSums:
  """`{group}_example_mean_sum/NAME` and `{group}_examples/NAME` of each source's examples
  (rows carry its 1-based id in `source_ids`): the group sums restricted to one source, so
  they add up over micro-batches, devices and eval batches as the totals do."""
  real = batch["segment_ids"] > 0
  out = {}
  for group, kinds_of_group in (("output", OUTPUT_KINDS), ("instruction", INSTRUCTION_KINDS)):
    mask = _kind_mask(batch["target_kinds"], kinds_of_group) & real
    for index, name in enumerate(sources, start=1):
      mine = (mask & (batch["source_ids"] == index)).astype(jnp.float32)
      means, examples = per_example_means(ce, mine, batch["segment_ids"])
      out[f"{group}_example_mean_sum/{name}"], out[f"{group}_examples/{name}"] = means, examples
  return out


def _normalized(values: jax.Array, weights: jax.Array, segments: jax.Array,
                normalization: Normalization, scale: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """(numerator, denominator) of per-token `values` under `normalization`; `scale`: each
  token's example weight (`_example_scale`), None for 1."""
  if normalization == "token":
    scaled = weights if scale is None else weights * scale
    return jnp.sum(scaled * values), jnp.sum(scaled)
  if normalization == "sequence":
    return per_example_means(values, weights, segments, scale)
  raise ValueError(f"unknown loss normalization {normalization!r}")


def per_example_means(ce: jax.Array, weights: jax.Array, segments: jax.Array,
                      scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum over examples of each example's weighted mean CE, examples with positive weight).

  Examples are the segments of packed rows (never split across rows), so the pair sums
  exactly over micro-batches, devices and eval batches. With `scale` (constant within an
  example) each example counts as its scale, in both sums.
  """
  seg_num = segment_sums(weights * ce, segments)[:, 1:]
  seg_den = segment_sums(weights, segments)[:, 1:]
  counted = seg_den > 0
  safe_den = jnp.where(counted, seg_den, 1.0)
  if scale is None:
    per_example = jnp.where(counted, 1.0, 0.0)
  else:  # the weighted mean of a constant is that constant
    per_example = jnp.where(counted, segment_sums(weights * scale, segments)[:, 1:] / safe_den,
                            0.0)
  means = jnp.sum(per_example * seg_num / safe_den)
  return means, jnp.sum(per_example)


def finalize(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Turns summed (over micro-batches/steps) sums into means; empty groups give 0."""

  def ratio(num, den):
    return jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0.0)

  out = {
      "loss": ratio(sums[NUMERATOR], sums[DENOMINATOR]),
      "loss_denominator": sums[DENOMINATOR],
      "output_loss": ratio(sums["output_ce_sum"], sums["output_tokens"]),
      "output_tokens": sums["output_tokens"],
      "instruction_loss": ratio(sums["instruction_ce_sum"], sums["instruction_tokens"]),
      "instruction_tokens": sums["instruction_tokens"],
      "output_loss_per_example": ratio(sums["output_example_mean_sum"],
                                       sums["output_examples"]),
      "output_examples": sums["output_examples"],
      "instruction_loss_per_example": ratio(sums["instruction_example_mean_sum"],
                                            sums["instruction_examples"]),
      "instruction_examples": sums["instruction_examples"],
  }
  if KL_NUMERATOR in sums:  # `loss` is then CE + beta * KL; `kl` the KL alone, same weights
    out["kl"] = ratio(sums[KL_NUMERATOR], sums[DENOMINATOR])
  for key in sums:  # a mixture's sources (`source_sums`)
    group, slash, name = key.partition("_example_mean_sum/")
    if slash:
      out[f"{group}_loss_per_example/{name}"] = ratio(sums[key], sums[f"{group}_examples/{name}"])
      out[f"{group}_examples/{name}"] = sums[f"{group}_examples/{name}"]
  return out
