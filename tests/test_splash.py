"""Splash attention (Pallas, interpret mode on CPU) against the XLA path on packed rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from im_jax.models import attention, splash

# Row 0: segments of 50, 1, 79 and 60 positions then padding; row 1: all padding. 200 is not
# a multiple of the 128-position blocks (padded inside). 4 query heads on 2 KV heads.
B, T, H, K, HD = 2, 200, 4, 2, 16
SEGMENTS = ((1, 0, 50), (2, 50, 51), (3, 51, 130), (4, 130, 190))


def _packed():
  seg = np.zeros((B, T), np.int32)
  pos = np.zeros((B, T), np.int32)
  for s, a, b in SEGMENTS:
    seg[0, a:b], pos[0, a:b] = s, np.arange(b - a)
  return jnp.asarray(seg), jnp.asarray(pos)


def _qkv(dtype, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(B, T, n, HD)), dtype) for n in (H, K, K))


def _run(impl, q, k, v, seg, pos):
  """Outputs and the gradients of a non-linear function of them."""
  def f(q, k, v):
    out = attention.attention(q, k, v, seg, seg, pos, pos, implementation=impl)
    return jnp.sum(jnp.sin(out.astype(jnp.float32))), out
  (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def test_matches_xla_float32_outputs_and_gradients():
  seg, pos = _packed()
  q, k, v = _qkv(jnp.float32)
  out_x, grads_x = _run("xla", q, k, v, seg, pos)
  out_s, grads_s = _run("splash", q, k, v, seg, pos)
  np.testing.assert_allclose(out_s, out_x, atol=2e-6)
  for gs, gx in zip(grads_s, grads_x):
    np.testing.assert_allclose(gs, gx, atol=2e-5)
  assert not np.any(np.asarray(out_s)[1]) and not np.any(np.asarray(out_s)[0, 190:])
  assert not np.any(np.asarray(grads_s[1])[1])  # padding: no gradient


def test_matches_xla_bfloat16_within_its_precision():
  seg, pos = _packed()
  q, k, v = _qkv(jnp.bfloat16)
  ref = attention.attention(q, k, v, seg, seg, pos, pos, implementation="xla")
  out = attention.attention(q, k, v, seg, seg, pos, pos, implementation="splash")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=3e-2, rtol=3e-2)


def test_no_leak_across_segments():
  """Changing one segment's queries, keys and values changes no output or gradient of any
  other segment of the row (MaxText #4476 found such a leak in a fused path)."""
  seg, pos = _packed()
  q, k, v = _qkv(jnp.float32)
  a, b = SEGMENTS[2][1:]
  q2, k2, v2 = (x.at[0, a:b].set(x[0, a:b] * -3.0 + 1.0) for x in (q, k, v))
  out1, grads1 = _run("splash", q, k, v, seg, pos)
  out2, grads2 = _run("splash", q2, k2, v2, seg, pos)
  others = np.r_[0:a, b:T]
  np.testing.assert_array_equal(np.asarray(out1)[0, others], np.asarray(out2)[0, others])
  for g1, g2 in zip(grads1, grads2):
    np.testing.assert_array_equal(np.asarray(g1)[0, others], np.asarray(g2)[0, others])
  assert not np.array_equal(np.asarray(out1)[0, a:b], np.asarray(out2)[0, a:b])


def test_block_size_and_padding():
  assert [splash.block_size(n) for n in (128, 256, 384, 512, 1024, 2048)] == [
      128, 256, 128, 512, 512, 512]
  with pytest.raises(ValueError, match="multiple of 128"):
    splash.block_size(200)
