"""The KL-to-base term: fused chunked CE+KL against autodiff of full logits, its values and
gradients at step 0, beta=0 bit for bit, the train step on a mesh, and transformers parity."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from im_jax.configs import base
from im_jax.run import experiment, settings
from im_jax.data.kinds import TokenKind
from im_jax.models.llama import Llama, LlamaConfig, params, training_flops
from im_jax.plan import analysis
from im_jax.train import kl as kl_lib
from im_jax.train import loop, loss, optim, sharding, step
from im_jax.train import device_memory
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


@pytest.fixture(scope="module")
def plain():
  """The model, a batch and the plain loss's (CE only) gradient and sums."""
  graphdef, params, rest = _params()
  batch = _batch()
  grads, sums = _grads_and_sums(loss.LossConfig("sequence", 8), graphdef, params, rest, None,
                                batch)
  return graphdef, params, rest, batch, grads, sums


def test_beta_zero_is_the_plain_loss_bit_for_bit(plain):
  graphdef, params, rest, batch, plain_g, plain_sums = plain
  _, other, _ = _params(1)
  off = _grads_and_sums(loss.LossConfig("sequence", 8, kl_to_base=0.0), graphdef, params, rest,
                        other, batch)
  assert "kl_numerator" not in off[1]
  for a, b in zip(jax.tree.leaves((plain_g, plain_sums)), jax.tree.leaves(off)):
    np.testing.assert_array_equal(a, b)


def test_at_step_zero_full_kl_is_zero_with_zero_gradient(plain):
  graphdef, params, rest, batch, plain_g, plain = plain
  _, other, _ = _params(1)
  beta = 0.7
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
  # In training NEFTune noise reaches the trained model only, so even step 0 has a KL.
  noisy = step.make_loss_fn(config, neftune_alpha=5.0)
  model, reference = nnx.merge(graphdef, params, rest), nnx.merge(graphdef, params, rest)
  sums_noisy = jax.jit(lambda key: noisy(model, batch, key, reference=reference))(
      jax.random.PRNGKey(0))
  assert float(sums_noisy["kl_numerator"]) > 1e-6


def test_at_step_zero_target_token_is_zero_with_the_gradient_of_log_p_target(plain):
  graphdef, params, rest, batch, ce_g, _ = plain
  beta = 0.25
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


# Against transformers + PyTorch: the trained model is the reference with two tensors scaled.

FINAL_NORM, LAYER, DOWN = 0.9, 1, 1.25  # scales: final norm; layer LAYER's MLP down projection


def _perturb_torch(model):
  with torch.no_grad():
    model.model.norm.weight.mul_(FINAL_NORM)
    model.model.layers[LAYER].mlp.down_proj.weight.mul_(DOWN)
  return model


def _perturb_jax(state):
  def scale(path, x):
    names = tuple(getattr(k, "key", k) for k in path)
    if names[:2] == ("final_norm", "scale"):
      return x * FINAL_NORM
    if names[:4] == ("layers", "mlp", "down_proj", "kernel"):  # stacked over layers
      return x.at[LAYER].multiply(DOWN)
    return x

  return jax.tree_util.tree_map_with_path(scale, state)


def _torch_kl(hf_dir, rows, weights):
  """Each example alone through transformers: its weighted mean KL, then the mean."""
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  tuned = _perturb_torch(
      transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval())
  means = []
  with torch.no_grad():
    for row, w in zip(rows, weights):
      ids = torch.from_numpy(np.asarray(row[:-1], np.int64))[None]
      log_p = torch.log_softmax(tuned(ids).logits[0].double(), -1)
      log_q = torch.log_softmax(base(ids).logits[0].double(), -1)
      kl = (log_p.exp() * (log_p - log_q)).sum(-1).numpy()
      means.append(float((w * kl).sum() / w.sum()))
  return float(np.mean(means))


def _jax_kl(hf_dir, rows, weights, chunk_size):
  """The examples packed into one row, through the training loss with beta 1."""
  config = LlamaConfig.from_hf(hf_dir, scan_layers=True)
  graphdef, base, rest = nnx.split(params.load_hf(hf_dir, config), nnx.Param, ...)
  tokens = np.concatenate([r[:-1] for r in rows])
  batch = {
      "tokens": tokens, "targets": np.concatenate([r[1:] for r in rows]),
      "loss_weights": np.concatenate(weights).astype(np.float32),
      "target_kinds": np.full(len(tokens), int(TokenKind.ASSISTANT), np.int8),
      "segment_ids": np.concatenate([np.full(len(r) - 1, i + 1) for i, r in enumerate(rows)]),
      "positions": np.concatenate([np.arange(len(r) - 1) for r in rows])}
  batch = {k: jnp.asarray(v[None]) for k, v in batch.items()}
  loss_fn = step.make_loss_fn(loss.LossConfig("sequence", chunk_size, kl_to_base=1.0))
  sums = jax.jit(lambda p, ref: loss_fn(nnx.merge(graphdef, p, rest), batch, None,
                                        reference=nnx.merge(graphdef, ref, rest)))(
                                            _perturb_jax(base), base)
  return float(loss.finalize(sums)["kl"])


def _weights(rows, seed=0):
  rng = np.random.default_rng(seed)
  weights = [rng.uniform(0.2, 1.0, size=len(r) - 1) for r in rows]
  for w in weights:
    w[: len(w) // 3] = 0.0  # a masked prompt
  return weights


def test_full_kl_equals_transformers_on_a_tiny_model(tmp_path):
  torch.manual_seed(0)
  hf = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.AutoModelForCausalLM.from_config(hf).float().eval()
  with torch.no_grad():  # HF zero-inits biases and one-inits norms: randomise everything
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
  model.save_pretrained(tmp_path)
  rng = np.random.default_rng(1)
  rows = [rng.integers(0, 256, size=n) for n in (17, 30, 9)]
  want = _torch_kl(tmp_path, rows, _weights(rows))
  assert want > 1e-3
  got = _jax_kl(tmp_path, rows, _weights(rows), chunk_size=8)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_full_kl_equals_transformers_on_smollm2(smollm2_hf_dir):
  tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
  texts = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
           "The capital of France is Paris.<|im_end|>",
           "Write one sentence about the sea: the sea is wide, deep and never still.",
           "List three prime numbers: 2, 3 and 5."]
  rows = [np.asarray(tok(t, add_special_tokens=False)["input_ids"][:32]) for t in texts]
  want = _torch_kl(smollm2_hf_dir, rows, _weights(rows))
  assert want > 1e-3
  got = _jax_kl(smollm2_hf_dir, rows, _weights(rows), chunk_size=16)
  np.testing.assert_allclose(got, want, rtol=1e-4)


# The train step on a mesh.


def _train(mesh_shape, micro_batches, steps=2):
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape),
                            jax.devices()[:int(np.prod(mesh_shape))])
  # The project's AdamW (eps 1e-6): optax's eps 1e-8 blows rounding noise in near-zero
  # gradients up to whole updates, which no two meshes agree on.
  tx = optim.make_optimizer(optim.OptimConfig(lr=1e-3, warmup_ratio=0.0), 10)[0]
  graphdef, state, shardings = step.create_train_state(_model_fn(), tx, mesh, reference=True)
  assert state.reference is not None and jax.tree.structure(state.reference) == \
      jax.tree.structure(state.params)
  loss_fn = step.make_loss_fn(loss.LossConfig("sequence", 8, kl_to_base=0.5))
  train_step = step.make_train_step(graphdef, tx, shardings, mesh, loss_fn)
  reference = jax.device_get(state.reference)
  metrics = []
  for i in range(steps):
    rows = {k: np.asarray(v) for k, v in _batch(i, rows=8).items()}
    state, m = train_step(state, sharding.global_batch(rows, mesh, micro_batches=micro_batches))
    metrics.append(step.host_metrics(m))
  # Frozen: the reference left the step as it came in, the parameters moved.
  for a, b in zip(jax.tree.leaves(jax.device_get(state.reference)), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(jax.tree.leaves(jax.device_get(state.params))[0],
                            jax.tree.leaves(reference)[0])
  return metrics, jax.device_get(state.params)


def test_sharded_kl_steps_equal_single_device():
  ref_metrics, ref_params = _train((1, 1, 1), micro_batches=1)
  metrics, params_ = _train((2, 2, 2), micro_batches=2)
  assert abs(ref_metrics[0]["kl"]) < 1e-6 < ref_metrics[-1]["kl"]  # model == base at step 0
  for got, want in zip(metrics, ref_metrics):
    for key in ("loss", "kl", "output_loss", "grad_norm"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(params_), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kl_settings_and_the_reference_model_enter_the_resume_key():
  c = base.get_config()
  off = experiment.resume_key(settings.load(c))
  assert "kl_to_base" not in off["loss"]  # off: the key of runs from before the KL term
  c.loss.kl_type = "target_token"  # means nothing while off
  assert experiment.resume_key(settings.load(c)) == off
  c.loss.kl_to_base, c.loss.kl_type = 0.5, "full"
  on = experiment.resume_key(settings.load(c))
  c.model.init_from = "hf:/models/other"
  changed = loop.resume_mismatch({loop.RESUME_KEY: on},
                                 {loop.RESUME_KEY: experiment.resume_key(settings.load(c))})
  assert changed == ["model.init_from: '' -> 'hf:/models/other'"]
  assert "loss.kl_to_base: '(absent)' -> 0.5" in loop.resume_mismatch(
      {loop.RESUME_KEY: off}, {loop.RESUME_KEY: on})


def test_plan_compiles_the_reference_into_the_step_with_rows_split():
  """`build_steps` (what the trainer runs and `im_jax.plan` compiles) holds the reference:
  its memory is counted, sharded like the parameters, and its forward keeps rows split."""
  c = base.get_config()
  rows, seq_len = 24, 40
  c.train.batch_size, c.eval.batch_size, c.data.max_seq_len = rows, rows, seq_len
  c.loss.chunk_size, c.loss.kl_to_base = 16, 0.5
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2), jax.devices()[:8])
  mcfg = analysis.model_config(settings.load(c))
  steps = experiment.build_steps(settings.load(c), mcfg, mesh, updates=10)
  batch = experiment.train_batch_shapes(settings.load(c), mesh)
  with jax.set_mesh(mesh):
    compiled = steps.train_step.jitted.lower(steps.abstract_state, batch).compile()
  memory = device_memory.step_memory(compiled, steps.abstract_state, batch)
  assert memory.reference == memory.params > 0
  assert memory.arguments >= memory.params + memory.optimizer + memory.reference
  # No activation of either forward holds every row (24 rows, 6 per device on data x fsdp).
  hlo = compiled.as_text()
  assert not re.findall(r"\w+\[(?:\d+,)*%d,%d(?:,\d+)*\]" % (rows, seq_len), hlo)
  assert f"f32[6,{seq_len},{mcfg.hidden_size}]" in hlo
  # Logits of either model exist a chunk (16 positions) at a time, never for the whole row.
  vocab = {mcfg.vocab_size, mcfg.vocab_size // 2}  # the tensor axis may split the vocabulary
  logits = [(t, v) for t, v in re.findall(r"\[6,(\d+),(\d+)\]", hlo) if int(v) in vocab]
  assert logits and {int(t) for t, _ in logits} == {16}, sorted(set(logits))
  flops = [training_flops(mcfg, [seq_len] * rows, reference=r)
           for r in (False, True)]
  assert flops[1] == pytest.approx(flops[0] * 8 / 6)
