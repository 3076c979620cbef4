"""Block-skipping attention for packed rows in plain XLA (any backend).

Why: a packed row of T tokens holds many short conversations, so most of the dense path's
T x T scores are masked (~15% are live for rows of 512-2048 tokens with 32-1024-token
segments). This path cuts the row into blocks and computes only the (q block, kv block)
pairs that can hold a live score, flash-attention style, with a custom backward over the
same pairs.

- Which pairs: segments are contiguous runs of one id and positions increase along a segment
  (as packing produces), so a query sees only kv at or before its own index, back to the
  start of its segment. q block i needs kv blocks from the block holding the earliest segment
  start among its real tokens up to i; blocks of padding (id 0) need none. Inside a computed
  pair the exact dense mask applies (same segment, not padding, kv position <= q position),
  so results equal the dense path's; the assumption only decides what is skipped.
- The pairs form a work list (static length: every causal pair of every row; dynamic count),
  run by a loop with a data-dependent trip count, one pair a step over all heads (a KV head's
  query group folded into the block length, as the dense path does). The loops are never
  differentiated: a `jax.custom_vjp` supplies the flash backward over the same list.
- Scores, softmax statistics and accumulators are float32; the output is in q's dtype; rows
  that see nothing (padding) are exactly 0. Lengths not a multiple of the block are padded
  with id 0 inside.
- Self-attention only (q and kv share segment ids and positions). Under a mesh (the trainer's
  `partitioning.current()` layout) it runs per device in a `shard_map`, as splash does.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from im_jax.models import partitioning as P

# CPU, SmolLM2 layer fwd+bwd: 4 x 512 in 22 / 24 / 33 / 36 ms at blocks 32 / 64 / 128 / 256;
# 1 x 2048 within 10% of 60 ms at all four.
BLOCK = 64


class WorkList(NamedTuple):
  """The pairs to compute, `count` of them first, as indices into the flattened blocks
  `[B * nb]` of q and of k/v (the rest of the static-length arrays is unused)."""

  q: jax.Array  # int32 [B * nb * (nb + 1) / 2]: every causal pair of every row
  kv: jax.Array
  count: jax.Array  # int32 scalar


def work_list(segment_ids: jax.Array, block: int) -> WorkList:
  """The (row, q block, kv block) pairs holding a live score; `segment_ids` `[B, T]`, T a
  multiple of `block`."""
  b, t = segment_ids.shape
  nb = t // block
  idx = jnp.arange(t, dtype=jnp.int32)
  new = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  start = jax.lax.cummax(jnp.where(new, idx, 0), axis=1)  # index of each token's segment start
  start = jnp.where(segment_ids != 0, start, t)  # padding needs nothing
  first = jnp.min(start.reshape(b, nb, block), axis=-1)  # [B, nb]
  # Every causal candidate (i, j <= i) of every row, flattened over (row, candidate).
  ci, cj = (jnp.asarray(a, jnp.int32) for a in np.tril_indices(nb))
  valid = ((first[:, ci] < t) & (cj[None] >= first[:, ci] // block)).reshape(-1)
  rows = jnp.repeat(jnp.arange(b, dtype=jnp.int32), ci.size) * nb
  order = jnp.argsort(~valid, stable=True)  # live pairs first
  return WorkList((rows + jnp.tile(ci, b))[order], (rows + jnp.tile(cj, b))[order],
                  jnp.sum(valid, dtype=jnp.int32))


def pair_count(segment_ids: jax.Array, block: int = BLOCK) -> jax.Array:
  """How many (row, q block, kv block) pairs the path computes for these rows (`[B, T]`,
  padded to a multiple of `block` as the path pads them)."""
  return work_list(_pad_to(segment_ids, block, 1), block).count


def _pad_to(x, block, axis):
  pad = -x.shape[axis] % block
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _get(x, idx, at):
  """Block `x[idx[at]]`, keeping a leading axis of 1."""
  return jax.lax.dynamic_slice_in_dim(x, idx[at], 1)


def _add(x, idx, at, value):
  """`x[idx[at]] += value`."""
  return jax.lax.dynamic_update_slice_in_dim(x, _get(x, idx, at) + value, idx[at], 0)


def _scores(qb, kb, seg_q, pos_q, seg_k, pos_k, scale, groups):
  """Float32 scores `[1, K, G*bq, bk]` of one pair, -inf where the dense mask is False."""
  s = jnp.einsum("pkmd,pknd->pkmn", qb, kb, preferred_element_type=jnp.float32) * scale
  mask = ((seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] != 0)
          & (pos_k[:, None, :] <= pos_q[:, :, None]))  # [1, bq, bk]
  p, kh, m, n = s.shape
  s = jnp.where(mask[:, None, None], s.reshape(p, kh, groups, m // groups, n), -jnp.inf)
  return s.reshape(p, kh, m, n)


def _pair_scores(qf, kf, seg, pos, work, at, scale, groups):
  q, kv = work.q, work.kv
  return _scores(_get(qf, q, at), _get(kf, kv, at), _get(seg, q, at), _get(pos, q, at),
                 _get(seg, kv, at), _get(pos, kv, at), scale, groups)


def _forward(qf, kf, vf, seg, pos, work, scale, groups):
  """Online softmax over the pairs: output (q's dtype) and logsumexp `[B*nb, K, G*bq]`."""
  acc = jnp.zeros(qf.shape, jnp.float32)
  mx = jnp.full(qf.shape[:-1], -jnp.inf, jnp.float32)  # running max
  den = jnp.zeros(qf.shape[:-1], jnp.float32)  # running sum of exp(score - max)

  def step(at, carry):
    acc, mx, den = carry
    i = work.q[at]
    sc = _pair_scores(qf, kf, seg, pos, work, at, scale, groups)
    m_old = _get(mx, work.q, at)
    m_new = jnp.maximum(m_old, jnp.max(sc, axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing seen yet
    probs = jnp.exp(sc - m_safe[..., None])
    alpha = jnp.exp(m_old - m_safe)
    d = alpha * _get(den, work.q, at) + jnp.sum(probs, axis=-1)
    a = alpha[..., None] * _get(acc, work.q, at) + jnp.einsum(
        "pkmn,pknd->pkmd", probs.astype(vf.dtype), _get(vf, work.kv, at),
        preferred_element_type=jnp.float32)
    put = jax.lax.dynamic_update_slice_in_dim
    return put(acc, a, i, 0), put(mx, m_new, i, 0), put(den, d, i, 0)

  acc, mx, den = jax.lax.fori_loop(0, work.count, step, (acc, mx, den))
  seen = den > 0
  safe = jnp.where(seen, den, 1.0)
  out = jnp.where(seen[..., None], acc / safe[..., None], 0.0)
  return out.astype(qf.dtype), jnp.where(seen, mx + jnp.log(safe), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attend(qf, kf, vf, seg, pos, work, scale, groups):
  return _forward(qf, kf, vf, seg, pos, work, scale, groups)[0]


def _attend_fwd(qf, kf, vf, seg, pos, work, scale, groups):
  out, lse = _forward(qf, kf, vf, seg, pos, work, scale, groups)
  return out, (qf, kf, vf, seg, pos, work, out, lse)


def _attend_bwd(scale, groups, res, dout):
  """Flash backward over the same pairs: P = exp(S - lse), dV_j += P^T dO_i,
  dS = P * (dO_i V_j^T - D_i) with D = rowsum(dO * O), dQ_i += dS K_j, dK_j += dS^T Q_i."""
  qf, kf, vf, seg, pos, work, out, lse = res
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def step(at, carry):
    dq, dk, dv = carry
    q, kv = work.q, work.kv
    qb, kb, vb, dob = _get(qf, q, at), _get(kf, kv, at), _get(vf, kv, at), _get(dout, q, at)
    # P and dS as [kv, q]: dV and dK then contract a matmul's inner dimension, not the q rows
    # of an untransposed P (which ran at half speed on CPU: 128-blocks fwd+bwd 50 -> 30 ms).
    st = jnp.swapaxes(_pair_scores(qf, kf, seg, pos, work, at, scale, groups), 2, 3)
    pt = jnp.exp(st - _get(lse, q, at)[:, :, None, :])  # [1, K, bk, G*bq]
    dv_b = jnp.einsum("pknm,pkmd->pknd", pt.astype(dout.dtype), dob,
                      preferred_element_type=jnp.float32)
    dpt = jnp.einsum("pknd,pkmd->pknm", vb, dob, preferred_element_type=jnp.float32)
    dst = (pt * (dpt - _get(delta, q, at)[:, :, None, :])).astype(qf.dtype)
    dq_b = jnp.einsum("pknm,pknd->pkmd", dst, kb, preferred_element_type=jnp.float32) * scale
    dk_b = jnp.einsum("pknm,pkmd->pknd", dst, qb, preferred_element_type=jnp.float32) * scale
    return _add(dq, q, at, dq_b), _add(dk, kv, at, dk_b), _add(dv, kv, at, dv_b)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dq, dk, dv = jax.lax.fori_loop(0, work.count, step, (zeros(qf), zeros(kf), zeros(vf)))
  return dq.astype(qf.dtype), dk.astype(kf.dtype), dv.astype(vf.dtype), None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _per_device(q, k, v, segment_ids, positions, *, scale, block):
  """q `[B, T, H, hd]`, k/v `[B, T, K, hd]`, segment_ids/positions `[B, T]` on one device."""
  b, t, h, hd = q.shape
  kh = k.shape[2]
  g = h // kh
  q, k, v, segment_ids, positions = (_pad_to(x, block, 1)
                                     for x in (q, k, v, segment_ids, positions))
  nb = q.shape[1] // block
  # Flattened blocks: q `[B*nb, K, G*block, hd]` (a block's rows ordered (group, position)),
  # k/v `[B*nb, K, block, hd]`, ids and positions `[B*nb, block]`.
  qf = q.reshape(b, nb, block, kh, g, hd).transpose(0, 1, 3, 4, 2, 5)
  qf = qf.reshape(b * nb, kh, g * block, hd)
  kf, vf = (x.reshape(b, nb, block, kh, hd).transpose(0, 1, 3, 2, 4).reshape(b * nb, kh, block, hd)
            for x in (k, v))
  seg, pos = segment_ids.reshape(b * nb, block), positions.reshape(b * nb, block)
  out = _attend(qf, kf, vf, seg, pos, work_list(segment_ids, block), scale, g)
  out = out.reshape(b, nb, kh, g, block, hd).transpose(0, 1, 4, 2, 3, 5)
  return out.reshape(b, nb * block, h, hd)[:, :t]


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                      positions: jax.Array, *, scale: float, block: int = BLOCK) -> jax.Array:
  """Self-attention over packed rows (see the module docstring); `[B, T, H, hd]` out.

  q `[B, T, H, hd]`, k/v `[B, T, K, hd]`, segment_ids/positions `[B, T]` shared by q and kv.
  """
  run = functools.partial(_per_device, scale=scale, block=block)
  layout = P.current()
  if layout is None:
    return run(q, k, v, segment_ids, positions)
  # Rows as the layout splits them; heads over `tensor` only when it divides the KV heads.
  kv_spec = layout.spec((P.BATCH, P.LENGTH, P.KV_HEADS, P.HEAD_DIM), k.shape)
  heads = kv_spec[2] if len(kv_spec) > 2 else None
  rows = kv_spec[0] if len(kv_spec) > 0 else None
  qkv, ids = PartitionSpec(rows, None, heads, None), PartitionSpec(rows)
  return jax.shard_map(run, mesh=layout.mesh, in_specs=(qkv, qkv, qkv, ids, ids),
                       out_specs=qkv, check_vma=False)(q, k, v, segment_ids, positions)
