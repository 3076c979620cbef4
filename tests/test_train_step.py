"""Train step: packing invariance, sharded == single device, exact accumulation, NEFTune,
optimizer decay mask and schedules, mesh/batch helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from im_jax.models.llama import Llama, LlamaConfig
from im_jax.train import loss, neftune, optim, sharding, step
from tests import train_rows

LENGTH = 32
# 8 heads / 4 kv heads: tensor=2 shards both, tensor=8 has to replicate the kv heads.
TINY = LlamaConfig.preset("tiny", vocab_size=128, num_heads=8, num_kv_heads=4, head_dim=8)
# Scanned layers: covers the stacked `layers` axis and compiles one layer body.
TINY_SCAN = TINY.replace(scan_layers=True)
# One layer where depth does not matter (quicker to compile).
SHALLOW = TINY.replace(num_layers=1)
# SmolLM2's head layout (9 heads, 3 kv heads, tied embeddings), other dims shrunk.
SMOL = LlamaConfig.preset("smollm2_135m", vocab_size=128, hidden_size=72, intermediate_size=96,
                          num_layers=2, head_dim=8)


def _model_fn(config, seed=0):
  return lambda: Llama(config, rngs=nnx.Rngs(seed))


def _rows(seed, rows=8, instruction_weight=1.0, n=None):
  examples = train_rows.make_examples(seed, n or 2 * rows, TINY.vocab_size, 5, 14)
  return train_rows.pack(examples, rows, LENGTH, instruction_weight=instruction_weight)


def _setup(mesh_shape, config=TINY, *, tx=None, loss_fn=None, on_indivisible="replicate"):
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape, on_indivisible=on_indivisible),
                            jax.devices()[:int(np.prod(mesh_shape))])
  tx = tx or optim.make_optimizer(
      optim.OptimConfig(lr=1e-3, warmup_ratio=0.0, weight_decay=0.01), 10)[0]
  graphdef, state, shardings = step.create_train_state(
      _model_fn(config), tx, mesh, on_indivisible=on_indivisible)
  loss_fn = loss_fn or step.make_loss_fn(loss.LossConfig("sequence"), neftune_alpha=5.0)
  train_step = step.make_train_step(graphdef, tx, shardings, mesh, loss_fn)
  return mesh, state, train_step, graphdef, shardings


def _run(mesh_shape, config=TINY, steps=3, micro_batches=1, **kw):
  mesh, state, train_step, _, _ = _setup(mesh_shape, config, **kw)
  losses = []
  for i in range(steps):
    batch = sharding.global_batch(_rows(i), mesh, micro_batches=micro_batches)
    state, metrics = train_step(state, batch)
    losses.append(step.host_metrics(metrics))
  return losses, jax.device_get(state.params)


def _assert_same_run(run, ref, atol=1e-5):
  for got, want in zip(run[0], ref[0]):
    for key in ("loss", "output_loss", "instruction_loss", "grad_norm"):
      np.testing.assert_allclose(got[key], want[key], atol=atol, rtol=atol, err_msg=key)
  for got, want in zip(jax.tree.leaves(run[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def single_device_run():
  return _run((1, 1, 1), TINY_SCAN)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_sharded_steps_equal_single_device(mesh_shape, single_device_run):
  run = _run(mesh_shape, TINY_SCAN)
  assert run[0][0]["loss"] > 0 and run[0][-1]["loss"] != run[0][0]["loss"]
  _assert_same_run(run, single_device_run)


def test_state_is_created_sharded():
  _, state, _, _, _ = _setup((1, 4, 2), SHALLOW)
  kernel = state.params["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (TINY.hidden_size // 4,
                                                     TINY.intermediate_size // 2)
  mu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
  adam = [s for s in mu if isinstance(s, optax.ScaleByAdamState)][0]
  assert (adam.mu["layers"][0]["mlp"]["up_proj"]["kernel"].sharding.spec
          == kernel.sharding.spec)


def test_smollm2_heads_on_tensor_2_replicate_and_match_single_device():
  ref = _run((1, 1, 1), SMOL, steps=2)
  run = _run((4, 1, 2), SMOL, steps=2)
  _assert_same_run(run, ref)


def test_smollm2_heads_on_tensor_2_refused_when_asked():
  with pytest.raises(ValueError, match=r"heads' of size [39] is not divisible by mesh axis "
                     r"'tensor'"):
    _setup((4, 1, 2), SMOL, on_indivisible="error")


def _grads(model, batch, loss_fn):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def numerator(p):
    sums = loss_fn(nnx.merge(graphdef, p, rest), {k: jnp.asarray(v) for k, v in batch.items()},
                   None)
    return sums["numerator"], sums

  grads, sums = jax.jit(jax.grad(numerator, has_aux=True))(params)
  return jax.tree.map(lambda g: g / sums["denominator"], grads), sums


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_packed_gradient_equals_unpacked(normalization):
  examples = train_rows.make_examples(11, 7, TINY.vocab_size, 5, 14)
  packed = train_rows.pack(examples, 3, LENGTH, instruction_weight=0.5)
  alone = train_rows.unpacked(examples, 16, instruction_weight=0.5)
  assert (packed["segment_ids"].max(1) > 1).sum() >= 2  # really packed
  model = _model_fn(SHALLOW)()
  loss_fn = step.make_loss_fn(loss.LossConfig(normalization))
  g_packed, s_packed = _grads(model, packed, loss_fn)
  g_alone, s_alone = _grads(model, alone, loss_fn)
  # Same denominator: total weight (token) or number of examples (sequence), packed or not.
  np.testing.assert_allclose(s_packed["denominator"], s_alone["denominator"], rtol=1e-6)
  if normalization == "sequence":
    assert float(s_packed["denominator"]) == len(examples)
  for key in ("numerator", *loss.METRIC_SUM_KEYS):
    np.testing.assert_allclose(s_packed[key], s_alone[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_alone)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_grad_accumulation_k4_equals_one_large_batch(normalization):
  # SGD makes the update proportional to the gradient (Adam's first step would hide scale).
  kw = dict(tx=optax.sgd(0.5),
            loss_fn=step.make_loss_fn(loss.LossConfig(normalization, chunk_size=8)))
  one = _run((2, 1, 1), SHALLOW, steps=1, micro_batches=1, **kw)
  four = _run((2, 1, 1), SHALLOW, steps=1, micro_batches=4, **kw)
  _assert_same_run(four, one)
  assert one[0][0]["loss_denominator"] == four[0][0]["loss_denominator"]


def test_neftune_noise_scale_per_segment_and_no_noise_on_padding():
  alpha, dim = 5.0, 512
  segment_ids = np.zeros((2, 40), np.int32)
  segment_ids[0, :7], segment_ids[0, 7:30], segment_ids[1, :12] = 1, 2, 1
  noise = np.asarray(neftune.add_noise(jnp.zeros((2, 40, dim)), jnp.asarray(segment_ids),
                                       alpha, jax.random.PRNGKey(0)))
  for row, seg, length in ((0, 1, 7), (0, 2, 23), (1, 1, 12)):
    values = noise[row][segment_ids[row] == seg]
    assert values.shape == (length, dim)
    scale = alpha / np.sqrt((length + 1) * dim)  # the example had length + 1 tokens
    assert np.abs(values).max() <= scale * (1 + 1e-6)
    assert np.abs(values).max() > 0.99 * scale
    np.testing.assert_allclose(values.std(), scale / np.sqrt(3), rtol=0.05)
    assert abs(values.mean()) < 0.05 * scale
  assert (noise[segment_ids == 0] == 0).all()


def test_neftune_only_in_training_eval_is_clean():
  mesh, state, _, graphdef, shardings = _setup((1, 1, 1), SHALLOW, tx=optax.sgd(0.1))
  batch_np = _rows(3)
  batch = sharding.global_batch(batch_np, mesh)
  noisy = step.make_loss_fn(loss.LossConfig("token"), neftune_alpha=5.0)
  clean = step.make_loss_fn(loss.LossConfig("token"))
  eval_noisy = step.make_eval_step(graphdef, shardings, mesh, noisy)(state, batch)
  eval_clean = step.make_eval_step(graphdef, shardings, mesh, clean)(state, batch)
  assert float(eval_noisy["numerator"]) == float(eval_clean["numerator"])
  # The eval path equals the model's own forward (logits from __call__).
  model = nnx.merge(graphdef, state.params, state.rest)
  jb = {k: jnp.asarray(v) for k, v in batch_np.items()}
  logits = model(jb["tokens"], jb["positions"], jb["segment_ids"])
  ref = loss.loss_sums(loss.cross_entropy(logits, jb["targets"]), jb, "token")
  np.testing.assert_allclose(eval_clean["numerator"], ref["numerator"], rtol=1e-5)
  # In training the noise changes the loss.
  key = jax.random.PRNGKey(1)
  assert not np.isclose(float(noisy(model, jb, key)["numerator"]),
                        float(clean(model, jb, key)["numerator"]), rtol=1e-6)


def test_decay_mask_excludes_norms_and_biases():
  for config in (TINY.replace(qkv_bias=True), TINY.replace(scan_layers=True)):
    _, params, _ = nnx.split(nnx.eval_shape(_model_fn(config)), nnx.Param, ...)
    mask = optim.decay_mask(params)
    flat = {"/".join(map(str, path)): m for path, m in
            jax.tree_util.tree_flatten_with_path(mask)[0]}
    for name, decays in flat.items():
      expect = not ("norm" in name or "bias" in name)
      assert decays == expect, name
    assert any("bias" in n for n in flat) == config.qkv_bias
  # Effect: with zero gradients, only decayed parameters shrink.
  tx = optim.make_optimizer(optim.OptimConfig(lr=0.1, weight_decay=0.5,
                                              warmup_ratio=0.0, decay="constant",
                                              max_grad_norm=None), 10)[0]
  _, params, _ = nnx.split(_model_fn(TINY)(), nnx.Param, ...)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                          jax.tree.leaves(params)):
    name = "/".join(map(str, path))
    expected = np.zeros_like(p) if "norm" in name else -0.1 * 0.5 * np.asarray(p)
    np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_schedule_warmup_then_decay_to_zero(decay):
  config = optim.OptimConfig(lr=2e-5, warmup_ratio=0.03, decay=decay)
  total = 200
  warm = optim.warmup_steps(config, total)
  assert warm == 6
  lr = np.array([float(optim.make_schedule(config, total)(s)) for s in range(total + 1)])
  assert lr[0] == 0 and np.isclose(lr[warm], 2e-5) and np.isclose(lr[total], 0, atol=1e-12)
  np.testing.assert_allclose(lr[:warm + 1], np.linspace(0, 2e-5, warm + 1), rtol=1e-5)
  assert (np.diff(lr[warm:]) < 0).all()
  frac = (np.arange(warm, total + 1) - warm) / (total - warm)
  expect = 1 - frac if decay == "linear" else 0.5 * (1 + np.cos(np.pi * frac))
  np.testing.assert_allclose(lr[warm:], 2e-5 * expect, atol=1e-10)


def test_paper_defaults():
  config = optim.OptimConfig()
  assert (config.lr, config.b1, config.b2, config.eps, config.weight_decay,
          config.warmup_ratio, config.decay) == (2e-5, 0.9, 0.98, 1e-6, 0.0, 0.03, "linear")


def test_mesh_sizes_resolve_or_fail_clearly():
  assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  for bad in ((-1, -1, 1), (3, -1, 1), (2, 2, 1), (0, 8, 1)):
    with pytest.raises(ValueError, match="mesh"):
      sharding.resolve_mesh_shape(bad, 8)


def test_logical_rules_and_indivisible_dimensions():
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  spec = sharding.logical_to_spec(("vocab", "embed"), (128, 64), mesh)
  assert spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  spec = sharding.logical_to_spec(("embed", "heads", "head_dim"), (64, 9, 8), mesh)
  assert spec == jax.sharding.PartitionSpec("fsdp", None, None)
  with pytest.raises(ValueError, match="no sharding rule"):
    sharding.logical_to_spec(("unknown",), (4,), mesh)


def test_global_batch_micro_batches_and_sharding():
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 4, 1))
  rows = _rows(0, rows=16)
  batch = sharding.global_batch(rows, mesh, micro_batches=2)
  assert batch["tokens"].shape == (2, 8, LENGTH)
  assert batch["tokens"].sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(batch["targets"]).reshape(16, LENGTH),
                                rows["targets"])
  with pytest.raises(ValueError, match="micro-batches"):
    sharding.global_batch(rows, mesh, micro_batches=3)


def test_all_padding_batch_moves_nothing():
  # Epochs are padded to equal batch counts with all-padding rows; such a batch has no
  # weighted token and must leave parameters and optimiser state as they were.
  mesh, state, train_step, _, _ = _setup((1, 1, 1), SHALLOW)
  state, _ = train_step(state, sharding.global_batch(_rows(0), mesh, micro_batches=1))
  before = jax.device_get((state.params, state.opt_state))
  empty = {k: np.zeros_like(v) for k, v in _rows(1).items()}
  state, metrics = train_step(state, sharding.global_batch(empty, mesh, micro_batches=1))
  assert float(metrics["loss_denominator"]) == 0 and int(state.step) == 2
  for got, want in zip(jax.tree.leaves(jax.device_get((state.params, state.opt_state))),
                       jax.tree.leaves(before)):
    np.testing.assert_array_equal(got, want)
  # and a real batch after it still trains
  params = jax.device_get(state.params)
  state, _ = train_step(state, sharding.global_batch(_rows(2), mesh, micro_batches=1))
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params)))
