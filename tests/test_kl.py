"""The KL-to-base term: fused chunked CE+KL against autodiff of full logits, its values and
gradients at step 0, beta=0 bit for bit, the train step on a mesh, and transformers parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from im_jax.models.llama import Llama, LlamaConfig
from im_jax.train import kl as kl_lib
from im_jax.train import loss, sharding, step
from tests import train_rows

VOCAB = 37
LENGTH = 32
TINY = LlamaConfig.preset("tiny", vocab_size=128, num_heads=8, num_kv_heads=4, head_dim=8,
                          num_layers=1, scan_layers=True)


def _full_logits_reference(h, w, rh, rw, targets, kl_type):
  """Plain jnp on materialised [B, T, V] logits, differentiated by autodiff."""
  log_p = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), axis=-1)
  log_q = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", rh, rw), axis=-1)
  ce = -jnp.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  if kl_type == "full":
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  else:
    kl = -ce - jnp.take_along_axis(log_q, targets[..., None], -1)[..., 0]
  return ce, kl


def _inputs(seed=3, b=2, t=40, d=16):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return (f(b, t, d), f(d, VOCAB), f(b, t, d), f(d, VOCAB),
          jnp.asarray(rng.integers(0, VOCAB, size=(b, t)), jnp.int32),
          jnp.asarray(rng.uniform(size=(b, t)), jnp.float32),
          jnp.asarray(rng.uniform(size=(b, t)), jnp.float32))


@pytest.mark.parametrize("kl_type", ["full", "target_token"])
def test_chunked_ce_and_kl_equal_autodiff_of_full_logits(kl_type):
  h, w, rh, rw, targets, a, b = _inputs()

  def objective(fn):
    def f(h, w):
      ce, kl = fn(h, w)
      return jnp.sum(a * ce + b * kl)
    return f

  ref_fn = lambda h, w: _full_logits_reference(h, w, rh, rw, targets, kl_type)
  ce_ref, kl_ref = ref_fn(h, w)
  assert float(jnp.abs(kl_ref).mean()) > 0.1  # the two models really differ
  g_ref = jax.grad(objective(ref_fn), argnums=(0, 1))(h, w)
  for chunk_size in (0, 12):  # one chunk; chunks with a padded last one
    fused = lambda h, w: kl_lib.chunked_ce_and_kl(h, w, rh, rw, targets, chunk_size, kl_type)
    ce, kl = jax.jit(fused)(h, w)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kl, kl_ref, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(objective(fused), argnums=(0, 1)))(h, w)
    for got, want in zip(g, g_ref):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _params(seed=0):
  graphdef, params, rest = nnx.split(_model_fn(seed)(), nnx.Param, ...)
  return graphdef, params, rest


def _model_fn(seed=0):
  return lambda: Llama(TINY, rngs=nnx.Rngs(seed))


def _batch(seed=0, rows=4):
  examples = train_rows.make_examples(seed, 2 * rows, TINY.vocab_size, 5, 14)
  rows_np = train_rows.pack(examples, rows, LENGTH, instruction_weight=0.5)
  return {k: jnp.asarray(v) for k, v in rows_np.items()}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _grads_and_sums(config, graphdef, params, rest, ref_params, batch):
  """d numerator / d params and the sums, with the reference model when `ref_params`."""
  loss_fn = step.make_loss_fn(config)

  def numerator(p):
    model = nnx.merge(graphdef, p, rest)
    if ref_params is None:
      sums = loss_fn(model, batch, None)
    else:
      sums = loss_fn(model, batch, None, reference=nnx.merge(graphdef, ref_params, rest))
    return sums["numerator"], sums

  return jax.grad(numerator, has_aux=True)(params)


def _norm(tree):
  return float(optax.tree.norm(tree))


def _diff(a, b):
  return jax.tree.map(lambda x, y: x - y, a, b)


def test_beta_zero_is_the_plain_loss_bit_for_bit():
  graphdef, params, rest = _params()
  _, other, _ = _params(1)
  batch = _batch()
  plain = _grads_and_sums(loss.LossConfig("sequence", 8), graphdef, params, rest, None, batch)
  off = _grads_and_sums(loss.LossConfig("sequence", 8, kl_to_base=0.0), graphdef, params, rest,
                        other, batch)
  assert "kl_numerator" not in off[1]
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(off)):
    np.testing.assert_array_equal(a, b)


def test_at_step_zero_full_kl_is_zero_with_zero_gradient():
  graphdef, params, rest = _params()
  _, other, _ = _params(1)
  batch, beta = _batch(), 0.7
  plain_g, plain = _grads_and_sums(loss.LossConfig("sequence", 8), graphdef, params, rest,
                                   None, batch)
  config = loss.LossConfig("sequence", 8, kl_to_base=beta)
  g, sums = _grads_and_sums(config, graphdef, params, rest, params, batch)
  assert abs(float(sums["kl_numerator"])) < 1e-6
  np.testing.assert_allclose(sums["numerator"], plain["numerator"], rtol=1e-6)
  # The CE part is unchanged and the KL's gradient, (g - plain) / beta, vanishes.
  assert _norm(_diff(g, plain_g)) / beta < 1e-5 * _norm(plain_g)
  # A reference that differs gives a KL and a gradient of its own.
  g_other, sums_other = _grads_and_sums(config, graphdef, params, rest, other, batch)
  assert float(sums_other["kl_numerator"]) > 1e-3
  assert _norm(_diff(g_other, plain_g)) / beta > 1e-2 * _norm(plain_g)


def test_at_step_zero_target_token_is_zero_with_the_gradient_of_log_p_target():
  graphdef, params, rest = _params()
  batch, beta = _batch(), 0.25
  ce_g, _ = _grads_and_sums(loss.LossConfig("sequence", 8), graphdef, params, rest, None, batch)
  config = loss.LossConfig("sequence", 8, kl_to_base=beta, kl_type="target_token")
  g, sums = _grads_and_sums(config, graphdef, params, rest, params, batch)
  assert abs(float(sums["kl_numerator"])) < 1e-6
  # d(CE + beta (log p(y) - log q(y))) = dCE + beta d log p(y) = (1 - beta) dCE.
  want = jax.tree.map(lambda x: (1 - beta) * x, ce_g)
  assert _norm(_diff(g, want)) < 1e-5 * _norm(want)


def test_target_token_with_beta_one_is_refused():
  with pytest.raises(ValueError, match="kl_to_base=1.0 with kl_type=target_token"):
    loss.LossConfig(kl_to_base=1.0, kl_type="target_token")
  with pytest.raises(ValueError, match="kl_type must be one of"):
    loss.LossConfig(kl_to_base=1.0, kl_type="reverse")
