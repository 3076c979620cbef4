"""Loss sums against a numpy reference; chunked CE; IM vs IT numerators; kind-group metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from im_jax.data.kinds import INSTRUCTION_KINDS, OUTPUT_KINDS
from im_jax.train import loss
from tests import train_rows

VOCAB = 37


def _np_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
  return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def _np_reference(logits, batch, normalization, example_weights=()):
  """Loops over rows and segments: the per-example definition, written independently;
  `example_weights[i]`: what an example of source i + 1 counts as."""
  ce = _np_ce(logits, batch["targets"])
  num = den = 0.0
  for r in range(ce.shape[0]):
    for s in set(batch["segment_ids"][r].tolist()) - {0}:
      sel = batch["segment_ids"][r] == s
      w = batch["loss_weights"][r][sel].astype(np.float64)
      x = (example_weights[batch["source_ids"][r][sel][0] - 1] if example_weights else 1.0)
      wce = float((w * ce[r][sel]).sum())
      if normalization == "token":
        num, den = num + x * wce, den + x * float(w.sum())
      elif w.sum() > 0:
        num, den = num + x * wce / float(w.sum()), den + x
  return ce, num, den


def _batch(seed=0, instruction_weight=1.0, rows=4, length=64):
  examples = train_rows.make_examples(seed, 7, VOCAB)
  return train_rows.pack(examples, rows, length, instruction_weight=instruction_weight)


def _logits(batch, seed=1):
  rng = np.random.default_rng(seed)
  return rng.normal(size=batch["targets"].shape + (VOCAB,)).astype(np.float32) * 3


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_loss_sums_match_numpy_reference(normalization):
  batch = _batch(instruction_weight=0.3)
  # A segment with no weight at all must not count as an example.
  batch["loss_weights"][0, batch["segment_ids"][0] == 1] = 0.0
  logits = _logits(batch)
  ce_ref, num_ref, den_ref = _np_reference(logits, batch, normalization)
  ce = loss.cross_entropy(jnp.asarray(logits), jnp.asarray(batch["targets"]))
  np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-5)
  sums = loss.loss_sums(ce, {k: jnp.asarray(v) for k, v in batch.items()}, normalization)
  np.testing.assert_allclose(sums["numerator"], num_ref, rtol=1e-5)
  np.testing.assert_allclose(sums["denominator"], den_ref, rtol=1e-6)
  if normalization == "sequence":
    n_segments = sum(len(set(r.tolist()) - {0}) for r in batch["segment_ids"])
    assert float(sums["denominator"]) == n_segments - 1


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_example_weights_scale_each_source_s_examples(normalization):
  """A mixture source's `example_weight`: its examples count as that many in both sums (the
  loop above); the fused numerator's token gradients agree; the metrics do not change."""
  batch = _batch(instruction_weight=0.3)
  # two sources, alternating by segment (segments never cross rows)
  batch["source_ids"] = np.where(batch["segment_ids"] > 0, 1 + batch["segment_ids"] % 2,
                                 0).astype(np.int32)
  logits = _logits(batch)
  weights = (1.0, 0.25)
  ce_ref, num_ref, den_ref = _np_reference(logits, batch, normalization, weights)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  ce = loss.cross_entropy(jnp.asarray(logits), jbatch["targets"])
  sums = loss.loss_sums(ce, jbatch, normalization, example_weights=weights)
  plain = loss.loss_sums(ce, jbatch, normalization)
  np.testing.assert_allclose(sums["numerator"], num_ref, rtol=1e-5)
  np.testing.assert_allclose(sums["denominator"], den_ref, rtol=1e-6)
  assert float(sums["denominator"]) < float(plain["denominator"])
  for key in ("output_example_mean_sum", "instruction_ce_sum", "output_examples"):
    assert float(sums[key]) == float(plain[key])
  grads = loss.numerator_token_grads(jbatch, normalization, weights)
  want = jax.grad(lambda c: loss.loss_sums(c, jbatch, normalization,
                                           example_weights=weights)["numerator"])(ce)
  np.testing.assert_allclose(grads, want, rtol=1e-6, atol=1e-9)


def test_metric_sums_are_unweighted_per_group_and_independent_of_mode():
  batch = _batch(instruction_weight=0.0)
  logits = _logits(batch)
  ce_ref = _np_ce(logits, batch["targets"])
  ce = loss.cross_entropy(jnp.asarray(logits), jnp.asarray(batch["targets"]))
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  by_mode = [loss.loss_sums(ce, jbatch, mode) for mode in ("token", "sequence")]
  for group, kinds in (("output", OUTPUT_KINDS), ("instruction", INSTRUCTION_KINDS)):
    sel = np.isin(batch["target_kinds"], [int(k) for k in kinds])
    assert sel.sum() > 0
    for sums in by_mode:
      np.testing.assert_allclose(sums[f"{group}_ce_sum"], ce_ref[sel].sum(), rtol=1e-5)
      assert float(sums[f"{group}_tokens"]) == sel.sum()
  metrics = loss.finalize(by_mode[0])
  sel = np.isin(batch["target_kinds"], [int(k) for k in INSTRUCTION_KINDS])
  np.testing.assert_allclose(metrics["instruction_loss"], ce_ref[sel].mean(), rtol=1e-5)


def test_per_example_group_losses_equal_the_unpacked_mean_of_means():
  """`*_loss_per_example`: each example's mean CE over its group's tokens, averaged over the
  examples that have any (the paper's held-out measure), against a loop over the examples;
  `*_loss` pools the tokens. Summed over two batches, as micro-batches and eval batches are."""
  batches = [_batch(seed=s, instruction_weight=0.0) for s in (0, 5)]
  # an example with no instruction token must not count for the instruction mean
  b0 = batches[0]
  first = (b0["segment_ids"][0] == 1) & np.isin(b0["target_kinds"][0],
                                                [int(k) for k in INSTRUCTION_KINDS])
  b0["target_kinds"][0][first] = int(OUTPUT_KINDS[0])
  total = None
  means = {"output": [], "instruction": []}
  pooled = {"output": [], "instruction": []}
  for seed, batch in enumerate(batches):
    logits = _logits(batch, seed=seed + 1)
    ce_ref = _np_ce(logits, batch["targets"])
    for group, kinds in (("output", OUTPUT_KINDS), ("instruction", INSTRUCTION_KINDS)):
      sel = np.isin(batch["target_kinds"], [int(k) for k in kinds]) & (batch["segment_ids"] > 0)
      pooled[group].append(ce_ref[sel])
      for r in range(sel.shape[0]):
        for s in set(batch["segment_ids"][r].tolist()) - {0}:
          mine = sel[r] & (batch["segment_ids"][r] == s)
          if mine.any():
            means[group].append(ce_ref[r][mine].mean())
    sums = loss.loss_sums(loss.cross_entropy(jnp.asarray(logits), jnp.asarray(batch["targets"])),
                          {k: jnp.asarray(v) for k, v in batch.items()}, "token")
    total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
  metrics = loss.finalize(total)
  n_examples = sum(len(set(r.tolist()) - {0}) for b in batches for r in b["segment_ids"])
  assert len(means["instruction"]) == n_examples - 1 and len(means["output"]) == n_examples
  for group in ("output", "instruction"):
    np.testing.assert_allclose(metrics[f"{group}_loss_per_example"], np.mean(means[group]),
                               rtol=1e-5)
    assert float(metrics[f"{group}_examples"]) == len(means[group])
    np.testing.assert_allclose(metrics[f"{group}_loss"],
                               np.concatenate(pooled[group]).mean(), rtol=1e-5)
    # the two measures differ on examples of unequal lengths: both are really computed
    assert abs(np.mean(means[group]) - np.concatenate(pooled[group]).mean()) > 1e-3


def test_finalize_empty_group_is_zero_not_nan():
  zero = jnp.zeros(())
  sums = {k: zero for k in ("numerator", "denominator", *loss.METRIC_SUM_KEYS)}
  assert all(np.isfinite(float(v)) for v in loss.finalize(sums).values())


@pytest.mark.parametrize("chunk_size", [0, 8, 12, 64])
def test_chunked_cross_entropy_equals_autodiff_of_full_logits(chunk_size):
  rng = np.random.default_rng(3)
  b, t, d = 2, 40, 16
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(d, VOCAB)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, VOCAB, size=(b, t)), jnp.int32)
  weights = jnp.asarray(rng.uniform(size=(b, t)), jnp.float32)

  def full(h, w):  # plain autodiff through materialised logits: the reference
    return jnp.sum(weights * loss.cross_entropy(loss.project_logits(h, w), targets))

  def chunked(h, w):
    return jnp.sum(weights * loss.chunked_cross_entropy(h, w, targets, chunk_size))

  ce = jax.jit(loss.chunked_cross_entropy, static_argnums=3)(hidden, emb, targets, chunk_size)
  ce_ref = _np_ce(np.einsum("btd,dv->btv", hidden, emb), np.asarray(targets))
  np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-5)
  g_full = jax.grad(full, argnums=(0, 1))(hidden, emb)
  g_chunk = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, emb)
  for a, b_ in zip(g_chunk, g_full):
    np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalization,chunk_size", [("sequence", 0), ("sequence", 12),
                                                      ("token", 0), ("token", 24)])
def test_ce_and_numerator_equals_autodiff_of_the_full_loss(normalization, chunk_size):
  """The forward-formed gradients equal plain autodiff of loss_sums over materialised logits."""
  batch = _batch(instruction_weight=0.3)
  batch["loss_weights"][0, batch["segment_ids"][0] == 1] = 0.0  # an example with no weight
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  rng = np.random.default_rng(4)
  hidden = jnp.asarray(rng.normal(size=batch["targets"].shape + (16,)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(16, VOCAB)), jnp.float32)

  def reference(h, w):
    ce = loss.cross_entropy(loss.project_logits(h, w), jbatch["targets"])
    return loss.loss_sums(ce, jbatch, normalization)["numerator"]

  def fused(h, w):
    ce, numerator = loss.ce_and_numerator(
        h, w, jbatch["targets"], loss.numerator_token_grads(jbatch, normalization), chunk_size)
    sums = loss.loss_sums(ce, jbatch, normalization, numerator=numerator)
    return sums["numerator"], (ce, sums)

  (num, (ce, sums)), grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(
      hidden, emb)
  num_ref, grads_ref = jax.value_and_grad(reference, argnums=(0, 1))(hidden, emb)
  _, np_num, np_den = _np_reference(np.einsum("btd,dv->btv", hidden, emb), batch, normalization)
  np.testing.assert_allclose(num, np_num, rtol=1e-5)
  np.testing.assert_allclose(num, num_ref, rtol=1e-5)
  np.testing.assert_allclose(sums["denominator"], np_den, rtol=1e-6)
  np.testing.assert_allclose(ce, _np_ce(np.einsum("btd,dv->btv", hidden, emb),
                                        batch["targets"]), rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    assert float(jnp.max(jnp.abs(g_ref))) > 0
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
  # The CE it returns is for metrics: no gradient flows through it.
  g_ce = jax.grad(lambda h: jnp.sum(fused(h, emb)[1][0]))(hidden)
  assert not np.any(np.asarray(g_ce))


def test_ce_and_numerator_runs_the_logits_matmul_three_times_not_four():
  """Its backward does not recompute the logits (chunked_cross_entropy's does)."""
  b, t, d, v = 1, 32, 8, 64
  args = (jnp.zeros((b, t, d)), jnp.zeros((d, v)), jnp.zeros((b, t), jnp.int32))

  def dots(fn):
    text = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).as_text()
    return text.count("stablehlo.dot_general")

  fused = lambda h, w, y: loss.ce_and_numerator(h, w, y, jnp.ones(y.shape), 8)[1]
  recomputing = lambda h, w, y: jnp.sum(loss.chunked_cross_entropy(h, w, y, 8))
  assert (dots(fused), dots(recomputing)) == (3, 4)


def test_chunked_cross_entropy_never_builds_full_logits():
  b, t, d, v, chunk = 1, 64, 8, 4096, 16
  args = (jnp.zeros((b, t, d)), jnp.zeros((d, v)), jnp.zeros((b, t), jnp.int32))
  for fn in (lambda h, w, y: jnp.sum(loss.chunked_cross_entropy(h, w, y, chunk)),
             lambda h, w, y: loss.ce_and_numerator(h, w, y, jnp.ones(y.shape), chunk)[1]):
    hlo = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).as_text()
    assert f"{t}x{v}" not in hlo and f"{chunk}x{v}" in hlo


def test_im_minus_it_numerator_is_instruction_ce():
  examples = train_rows.make_examples(5, 6, VOCAB)
  im = train_rows.pack(examples, 4, 64, instruction_weight=1.0)
  it = train_rows.pack(examples, 4, 64, instruction_weight=0.0)
  logits = _logits(im)
  ce = loss.cross_entropy(jnp.asarray(logits), jnp.asarray(im["targets"]))
  sums = {name: loss.loss_sums(ce, {k: jnp.asarray(v) for k, v in b.items()}, "token")
          for name, b in (("im", im), ("it", it))}
  sel = np.isin(im["target_kinds"], [int(k) for k in INSTRUCTION_KINDS])
  expected = _np_ce(logits, im["targets"])[sel].sum()
  np.testing.assert_allclose(sums["im"]["numerator"] - sums["it"]["numerator"], expected,
                             rtol=1e-5)
  assert float(sums["im"]["denominator"] - sums["it"]["denominator"]) == sel.sum()


def test_instruction_weight_interpolates_linearly():
  examples = train_rows.make_examples(6, 6, VOCAB)
  logits = None
  values = {}
  for weight in (0.0, 0.25, 0.6, 1.0):
    batch = train_rows.pack(examples, 4, 64, instruction_weight=weight)
    logits = _logits(batch) if logits is None else logits
    ce = loss.cross_entropy(jnp.asarray(logits), jnp.asarray(batch["targets"]))
    s = loss.loss_sums(ce, {k: jnp.asarray(v) for k, v in batch.items()}, "token")
    values[weight] = np.array([float(s["numerator"]), float(s["denominator"])])
  assert not np.allclose(values[0.0], values[1.0])
  for weight in (0.25, 0.6):
    expected = (1 - weight) * values[0.0] + weight * values[1.0]
    np.testing.assert_allclose(values[weight], expected, rtol=1e-5)


def test_config_rejects_unknown_normalization():
  with pytest.raises(ValueError, match="normalization"):
    loss.LossConfig(normalization="mean")
