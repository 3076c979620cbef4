"""Block-skipping attention (`attention_impl="blocked"`) against the dense XLA path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from im_jax.models import attention, blocked_attention
from im_jax.models.llama import Llama, LlamaConfig


def _layouts(t: int, block: int, seed: int = 0) -> list[list[int]]:
  """Segment lengths of each row (the rest of the row is padding)."""
  rng = np.random.default_rng(seed)
  short = []
  while sum(short) < t - t // 8:
    short.append(int(rng.integers(1, t // 16)))
  short[-1] -= sum(short) - (t - t // 8)
  return [
      short,  # many short segments crossing block boundaries, then padding
      [7, t // 2 + 5, t // 4 - 20],  # one over several blocks, then padding
      _fit([block, block // 2, block // 2, block + 9], t),  # starting at block starts
      [t],  # the whole row one segment
      [],  # all padding
  ]


def _fit(lengths, t):
  """`lengths` cut to fill at most `t` positions."""
  out = []
  for n in lengths:
    n = min(n, t - sum(out))
    if n:
      out.append(n)
  return out


def _packed(layouts, t):
  seg = np.zeros((len(layouts), t), np.int32)
  pos = np.zeros((len(layouts), t), np.int32)
  for r, lengths in enumerate(layouts):
    assert sum(lengths) <= t
    at = 0
    for s, n in enumerate(lengths, start=1):
      seg[r, at:at + n], pos[r, at:at + n] = s, np.arange(n)
      at += n
  return jnp.asarray(seg), jnp.asarray(pos)


def _qkv(b, t, h, k, hd, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(b, t, n, hd)), dtype) for n in (h, k, k))


@functools.partial(jax.jit, static_argnames=("impl", "block"))
def _run(q, k, v, seg, pos, impl, block=None):
  """Outputs and the gradients of a non-linear function of them."""
  def f(q, k, v):
    if impl == "blocked":
      out = blocked_attention.blocked_attention(q, k, v, seg, pos, scale=q.shape[-1]**-0.5,
                                                block=block)
    else:
      out = attention.attention(q, k, v, seg, seg, pos, pos, implementation=impl)
    return jnp.sum(jnp.sin(out.astype(jnp.float32))), out
  (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


@pytest.mark.parametrize("t, block, h, kv_heads", [
    (256, 64, 6, 2),  # GQA
    (256, 128, 6, 6),  # MHA
    (512, 128, 6, 2),
    (512, 64, 4, 4),
    (200, 64, 6, 2),  # not a multiple of the block: padded inside
])
def test_matches_xla_outputs_and_gradients(t, block, h, kv_heads):
  seg, pos = _packed(_layouts(t, block, seed=t + block), t)
  q, k, v = _qkv(seg.shape[0], t, h, kv_heads, 16, seed=block)
  out_x, grads_x = _run(q, k, v, seg, pos, "xla")
  out_b, grads_b = _run(q, k, v, seg, pos, "blocked", block)
  np.testing.assert_allclose(out_b, out_x, rtol=1e-5, atol=1e-5)
  for gb, gx in zip(grads_b, grads_x):
    np.testing.assert_allclose(gb, gx, rtol=1e-5, atol=1e-5)
  padding = np.asarray(seg) == 0
  assert not np.any(np.asarray(out_b)[padding])  # exactly 0
  assert not np.any(np.asarray(grads_b[0])[padding])


def test_dispatch_through_attention():
  t = 200
  seg, pos = _packed(_layouts(t, 64)[:2], t)
  q, k, v = _qkv(2, t, 4, 2, 16)
  np.testing.assert_allclose(
      attention.attention(q, k, v, seg, seg, pos, pos, implementation="blocked"),
      attention.attention(q, k, v, seg, seg, pos, pos, implementation="xla"), atol=1e-5)
  with pytest.raises(ValueError, match="self-attention"):
    attention.attention(q[:, :1], k, v, seg[:, :1], seg, pos[:, :1], pos,
                        implementation="blocked")


def test_no_leak_across_segments_or_from_later_tokens():
  """A segment's queries, keys and values change no output or gradient of any other segment
  (bitwise), and a token changes no earlier token's output."""
  t, block = 256, 64
  seg, pos = _packed(_layouts(t, block), t)
  q, k, v = _qkv(seg.shape[0], t, 6, 2, 16)
  out1, grads1 = _run(q, k, v, seg, pos, "blocked", block)
  # Row 1's long segment (indices 7..139: blocks 0-2), then row 0's 5th segment.
  for row, s in ((1, 2), (0, 5)):
    inside = np.asarray(seg[row]) == s
    change = jnp.asarray(inside)[None, :, None, None] & (jnp.arange(seg.shape[0]) == row)[
        :, None, None, None]
    q2, k2, v2 = (jnp.where(change, x * -3.0 + 1.0, x) for x in (q, k, v))
    out2, grads2 = _run(q2, k2, v2, seg, pos, "blocked", block)
    others = np.ones(seg.shape, bool)
    others[row] = ~inside
    np.testing.assert_array_equal(np.asarray(out1)[others], np.asarray(out2)[others])
    for g1, g2 in zip(grads1, grads2):
      np.testing.assert_array_equal(np.asarray(g1)[others], np.asarray(g2)[others])
    assert not np.array_equal(np.asarray(out1)[row, inside], np.asarray(out2)[row, inside])
  # Causality: changing tokens from 100 on in row 1 (inside the long segment) leaves 0..99.
  later = (jnp.arange(t) >= 100)[None, :, None, None] & (jnp.arange(seg.shape[0]) == 1)[
      :, None, None, None]
  q3, k3, v3 = (jnp.where(later, x + 1.0, x) for x in (q, k, v))
  out3 = blocked_attention.blocked_attention(q3, k3, v3, seg, pos, scale=0.25, block=block)
  out1 = blocked_attention.blocked_attention(q, k, v, seg, pos, scale=0.25, block=block)
  np.testing.assert_array_equal(np.asarray(out3)[1, :100], np.asarray(out1)[1, :100])
  np.testing.assert_array_equal(np.asarray(out3)[:1], np.asarray(out1)[:1])
  assert not np.array_equal(np.asarray(out3)[1, 100:140], np.asarray(out1)[1, 100:140])


def test_bfloat16_within_its_precision():
  t, block = 256, 64
  seg, pos = _packed(_layouts(t, block), t)
  q, k, v = _qkv(seg.shape[0], t, 6, 2, 16, jnp.bfloat16)
  ref, ref_grads = _run(*(x.astype(jnp.float32) for x in (q, k, v)), seg, pos, "xla")
  out, grads = _run(q, k, v, seg, pos, "blocked", block)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2)
  for g, gr in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), gr, atol=6e-2, rtol=6e-2)


def test_skips_pairs_with_no_live_score():
  """The pairs computed for a known layout, and for random ones exactly the block pairs
  holding a live score."""
  t, block = 256, 64  # 4 blocks: 10 causal pairs a row
  seg, _ = _packed([
      [64, 136],  # q blocks 0, 1: one pair each; 2: kv 1-2; 3: kv 1-3 -> 7
      [t],  # 10
      [32] * 8,  # each q block only its own -> 4
      [],  # padding -> 0
  ], t)
  assert int(blocked_attention.pair_count(seg, block)) == 7 + 10 + 4 + 0
  for blk in (32, 64, 128):
    seg, pos = _packed(_layouts(t, blk, seed=blk), t)
    mask = np.asarray(attention.attention_mask(seg, seg, pos, pos))
    nb = t // blk
    live = mask.reshape(-1, nb, blk, nb, blk).any(axis=(2, 4))
    assert int(blocked_attention.pair_count(seg, blk)) == live.sum() < nb * (nb + 1) // 2 * 5


def test_model_logits_and_gradients_equal_xla():
  """A tiny Llama (layers scanned and rematerialised) gives the xla model's logits and
  gradients."""
  t = 160
  seg, pos = _packed([[3, 40, 90], [70, 17, 60], [t]], t)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 512, seg.shape), jnp.int32)
  loss_and_grads = nnx.jit(nnx.value_and_grad(
      lambda m: jnp.mean(jnp.sin(m(tokens, pos, seg)) * (seg > 0)[..., None])))
  results = {}
  for impl in ("xla", "blocked"):
    config = LlamaConfig.preset("tiny", scan_layers=True, remat_policy="full",
                                initializer_range=0.1, attention_impl=impl)
    model = Llama(config, rngs=nnx.Rngs(0))
    results[impl] = (nnx.jit(lambda m: m(tokens, pos, seg))(model), *loss_and_grads(model))
  (logits_x, loss_x, grads_x), (logits_b, loss_b, grads_b) = results["xla"], results["blocked"]
  np.testing.assert_allclose(logits_b, logits_x, atol=1e-5)
  np.testing.assert_allclose(loss_b, loss_x, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_b, grads_x)


def test_auto_picks_blocked_on_cpu_for_long_self_attention_only():
  assert jax.default_backend() == "cpu"
  long = attention.BLOCKED_MIN_LENGTH
  assert attention.resolve_implementation("auto", long, long) == "blocked"
  assert attention.resolve_implementation("auto", long - 1, long - 1) == "xla"  # too short
  assert attention.resolve_implementation("auto", 1, long) == "xla"  # decoding with a cache
  assert attention.resolve_implementation("xla", long, long) == "xla"  # explicit choice kept
