"""The paper's KL-to-base baseline: per-token KL to a frozen reference model, fused with CE.

Each token that carries loss gets `CE_t + beta * KL_t`, weighted and normalised as the CE
alone (`loss.loss_sums`), where p is the trained model and q the reference (base) model:

  full:         KL_t = sum_v p_v (log p_v - log q_v), KL(model || base) over the vocabulary;
  target_token: KL_t = log p(y_t) - log q(y_t), the release's one-sample estimate. Its
                gradient is that of log p(y_t), so the objective is (1 - beta) CE + a constant.

The reference is a second model (the starting parameters, frozen: `step.TrainState.reference`)
run in the same step on the clean embeddings (no NEFTune noise) and given no gradient. With
LoRA it is the trained model itself with its adapters switched off (`BaseOf`): the frozen base
weights are the starting model, so no copy is held.

`chunked_ce_and_kl` computes CE_t and KL_t in one scan over sequence chunks, like
`loss.chunked_cross_entropy`: neither model's [B, T, V] logits exist at once. The forward keeps
each position's two log-normalisers and KL; the hand-written backward recomputes a chunk's
logits (the reference's only for `full`) and forms, with g the cotangents of CE and KL,
  d/d logits = (p - onehot) g_ce + g_kl * (full: p (log p - log q - KL_t); target: onehot - p).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from im_jax.models import lora
from im_jax.train import loss as loss_lib
from im_jax.train.loss import Batch, KLType, LossConfig


class BaseOf:
  """`model` with its LoRA adapters off: the base it started from, sharing its weights."""

  def __init__(self, model: Any):
    self.model = model

  def embed(self, tokens: jax.Array) -> jax.Array:
    return self.model.embed(tokens)  # embeddings carry no adapter

  def hidden_states(self, *args) -> jax.Array:
    with lora.disabled():
      return self.model.hidden_states(*args)

  def output_embedding(self) -> jax.Array:
    return self.model.output_embedding()


def reference_hidden(reference: Any, batch: Batch) -> jax.Array:
  """The reference model's final hidden states on the clean batch, without gradient."""
  hidden = reference.hidden_states(reference.embed(batch["tokens"]), batch["positions"],
                                   batch["segment_ids"])
  return jax.lax.stop_gradient(hidden)


def ce_and_kl(model: Any, hidden: jax.Array, reference: Any, batch: Batch,
              config: LossConfig) -> tuple[jax.Array, jax.Array]:
  """Per-token CE and KL [B, T] of `model` (whose final `hidden` states are given).

  `reference` None: the model must carry LoRA adapters, and its base is the reference.
  """
  if reference is None:
    if not lora.adapters(model):
      raise ValueError("loss.kl_to_base > 0 needs a reference model (TrainState.reference) "
                       "or LoRA adapters")
    reference = BaseOf(model)
  return chunked_ce_and_kl(hidden, model.output_embedding(), reference_hidden(reference, batch),
                           jax.lax.stop_gradient(reference.output_embedding()),
                           batch["targets"], config.chunk_size, config.kl_type)


def chunked_ce_and_kl(hidden: jax.Array, output_embedding: jax.Array, ref_hidden: jax.Array,
                      ref_output_embedding: jax.Array, targets: jax.Array, chunk_size: int,
                      kl_type: KLType) -> tuple[jax.Array, jax.Array]:
  """(CE, KL) per token [B, T], never holding more than [B, chunk, V] logits per model.

  Gradients flow to `hidden` and `output_embedding` only; the reference gets zeros.
  """
  if kl_type not in loss_lib.KL_TYPES:
    raise ValueError(f"kl_type must be one of {loss_lib.KL_TYPES}, got {kl_type!r}")
  length = hidden.shape[1]
  n, (hidden, ref_hidden, targets) = loss_lib.pad_to_chunks(chunk_size, hidden, ref_hidden,
                                                            targets)
  ce, kl = _fused(hidden, output_embedding, ref_hidden, ref_output_embedding, targets, n,
                  kl_type)
  return ce[:, :length], kl[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(hidden, w, ref_hidden, ref_w, targets, n, kl_type):
  return _fused_fwd(hidden, w, ref_hidden, ref_w, targets, n, kl_type)[0]


def _fused_fwd(hidden, w, ref_hidden, ref_w, targets, n, kl_type):
  to_chunks = loss_lib.to_chunks

  def body(carry, xs):
    h, rh, t = xs
    logits = loss_lib.project_logits(h, w)
    ref_logits = loss_lib.project_logits(rh, ref_w)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    ref_log_z = jax.nn.logsumexp(ref_logits, axis=-1)
    ce = log_z - loss_lib.target_logit(logits, t)
    if kl_type == "full":
      log_p = logits - log_z[..., None]
      log_q = ref_logits - ref_log_z[..., None]
      kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    else:  # log p(y) - log q(y) = CE_ref - CE
      kl = (ref_log_z - loss_lib.target_logit(ref_logits, t)) - ce
    return carry, (ce, kl, log_z, ref_log_z)

  # log_z, ref_log_z and kl stay chunked ([n, B, chunk]) for the backward scan.
  _, (ce, kl, log_z, ref_log_z) = jax.lax.scan(
      body, None, (to_chunks(hidden, n), to_chunks(ref_hidden, n), to_chunks(targets, n)))
  # target_token's backward needs nothing of the reference: do not keep its hidden states.
  keep_ref = kl_type == "full"
  residuals = (hidden, w, ref_hidden if keep_ref else None, ref_w if keep_ref else None,
               targets, log_z, ref_log_z, kl)
  return (loss_lib.from_chunks(ce), loss_lib.from_chunks(kl)), residuals


def _fused_bwd(n, kl_type, residuals, g):
  hidden, w, ref_hidden, ref_w, targets, log_z, ref_log_z, kl = residuals
  g_ce, g_kl = g
  vocab = w.shape[-1]
  to_chunks = loss_lib.to_chunks

  def body(dw, xs):
    h, rh, t, lz, rlz, kl_c, gce, gkl = xs
    logits = loss_lib.project_logits(h, w)
    log_p = logits - lz[..., None]
    p = jnp.exp(log_p)
    one_hot = jax.nn.one_hot(t, vocab, dtype=jnp.float32)
    if kl_type == "full":
      log_q = loss_lib.project_logits(rh, ref_w) - rlz[..., None]
      dlogits = ((p - one_hot) * gce[..., None]
                 + p * (log_p - log_q - kl_c[..., None]) * gkl[..., None])
    else:
      dlogits = (p - one_hot) * (gce - gkl)[..., None]
    dlogits = dlogits.astype(w.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dlogits, w, preferred_element_type=jnp.float32)
    dw = dw + jnp.einsum("bcd,bcv->dv", h, dlogits, preferred_element_type=jnp.float32)
    return dw, dh.astype(hidden.dtype)

  # The reference's hidden states ride along only for `full` (a dummy [n] otherwise).
  ref_chunks = to_chunks(ref_hidden, n) if ref_hidden is not None else jnp.zeros((n,))
  xs = (to_chunks(hidden, n), ref_chunks, to_chunks(targets, n), log_z, ref_log_z,
        kl, to_chunks(g_ce, n), to_chunks(g_kl, n))
  dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
  # The reference is frozen: None is JAX's zero cotangent.
  return loss_lib.from_chunks(dh), dw.astype(w.dtype), None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
