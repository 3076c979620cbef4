"""Llama model: packing invariance, attention mask, options, configs and presets."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from im_jax.models import attention as attention_lib
from im_jax.models.llama import Llama, LlamaConfig, RopeScaling, num_params
from im_jax.models.llama import model as model_lib

# A larger init than HF's 0.02 so attention is far from uniform and leaks would show.
TINY = LlamaConfig.preset("tiny", vocab_size=256, initializer_range=0.1)
SEGMENT_LENGTHS = (5, 7, 4)
PAD = 4
# One compiled forward per shape is much faster on CPU than op-by-op eager dispatch.
forward = nnx.jit(lambda model, *args: model(*args))


def _packed_row(rng: np.random.RandomState):
  tokens, positions, segments = [], [], []
  for seg, n in enumerate(SEGMENT_LENGTHS, start=1):
    tokens += list(rng.randint(1, TINY.vocab_size, n))
    positions += list(range(n))
    segments += [seg] * n
  tokens += [0] * PAD
  positions += [0] * PAD
  segments += [0] * PAD
  return tuple(np.asarray([x], np.int32) for x in (tokens, positions, segments))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_packing_invariance(scan_layers):
  model = Llama(TINY.replace(scan_layers=scan_layers), rngs=nnx.Rngs(0))
  tokens, positions, segments = _packed_row(np.random.RandomState(0))
  packed = np.asarray(forward(model, tokens, positions, segments))
  assert np.isfinite(packed).all()  # padding rows included
  start = 0
  for n in SEGMENT_LENGTHS:
    alone = np.asarray(forward(model, tokens[:, start:start + n]))
    np.testing.assert_array_less(np.abs(packed[:, start:start + n] - alone).max(), 1e-5)
    start += n
  # The test can see a leak: one segment over the whole row changes the later segments.
  leaky = np.asarray(forward(model, tokens, np.arange(tokens.shape[1])[None],
                             np.ones_like(segments)))
  assert np.abs(leaky[:, SEGMENT_LENGTHS[0]:sum(SEGMENT_LENGTHS)]
                - packed[:, SEGMENT_LENGTHS[0]:sum(SEGMENT_LENGTHS)]).max() > 1e-3


def test_padding_gives_finite_gradients():
  model = Llama(TINY, rngs=nnx.Rngs(0))
  tokens, positions, segments = _packed_row(np.random.RandomState(1))

  def loss(m):
    return jnp.sum(m(tokens, positions, segments) * (segments[..., None] > 0))

  grads = nnx.jit(nnx.grad(loss))(model)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_attention_kv_cache_shape_and_gqa():
  rng = np.random.RandomState(0)
  b, t, h, k, hd = 2, 6, 4, 2, 8
  q = jnp.asarray(rng.randn(b, t, h, hd), jnp.float32)
  kk = jnp.asarray(rng.randn(b, t, k, hd), jnp.float32)
  v = jnp.asarray(rng.randn(b, t, k, hd), jnp.float32)
  seg = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 2, 0]], jnp.int32)
  pos = jnp.asarray([[0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 0]], jnp.int32)
  full = attention_lib.attention(q, kk, v, seg, seg, pos, pos)
  # Decoding-style call: the last 2 queries against all keys (S != T).
  tail = attention_lib.attention(q[:, -2:], kk, v, seg[:, -2:], seg, pos[:, -2:], pos)
  np.testing.assert_allclose(tail, full[:, -2:], atol=1e-6)
  # GQA equals MHA with each kv head repeated for its query group (transformers' repeat_kv).
  mha = attention_lib.attention(q, jnp.repeat(kk, h // k, axis=2), jnp.repeat(v, h // k, axis=2),
                                seg, seg, pos, pos)
  np.testing.assert_allclose(full, mha, atol=1e-6)
  # The padding query attends to nothing: exactly zero, not NaN.
  assert np.all(np.asarray(full[1, -1]) == 0)
  # A direct softmax reference for one query of segment 2.
  keys = [2, 3]
  s = np.einsum("d,sd->s", q[1, 3, 0], kk[1, keys, 0]) / np.sqrt(hd)
  p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
  np.testing.assert_allclose(full[1, 3, 0], p @ np.asarray(v[1, keys, 0]), atol=1e-5)


def test_mask_matches_jax_dot_product_attention():
  """The mask layout the fused ("cudnn") path hands to jax.nn.dot_product_attention."""
  rng = np.random.RandomState(1)
  q, k, v = (jnp.asarray(rng.randn(1, 5, n, 8), jnp.float32) for n in (4, 2, 2))
  seg = jnp.asarray([[1, 1, 2, 2, 0]])
  pos = jnp.asarray([[0, 1, 0, 1, 0]])
  mask = attention_lib.attention_mask(seg, seg, pos, pos)
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
  ours = attention_lib.attention(q, k, v, seg, seg, pos, pos)
  np.testing.assert_allclose(ours[:, :4], ref[:, :4], atol=1e-5)


@pytest.mark.parametrize("scan_layers, policies", [(True, ("minimal", "full")),
                                                   (False, ("full",))])
def test_remat_policies_match(scan_layers, policies):
  tokens, positions, segments = _packed_row(np.random.RandomState(2))

  loss_and_grads = nnx.jit(nnx.value_and_grad(lambda m: m(tokens, positions, segments).mean()))
  results = []
  for policy in ("none", *policies):
    config = TINY.replace(scan_layers=scan_layers, remat_policy=policy)
    loss, grads = loss_and_grads(Llama(config, rngs=nnx.Rngs(0)))
    results.append((loss, jax.tree.leaves(grads)))
  for loss, grads in results[1:]:
    np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
    for g, g0 in zip(grads, results[0][1]):
      np.testing.assert_allclose(g, g0, atol=1e-6)


def test_bf16_compute_close_to_f32():
  tokens, positions, segments = _packed_row(np.random.RandomState(3))
  f32 = Llama(TINY, rngs=nnx.Rngs(0))
  bf16 = Llama(TINY.replace(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert bf16.embed(tokens).dtype == jnp.bfloat16
  assert bf16.output_embedding().dtype == jnp.bfloat16
  assert jax.tree.leaves(nnx.state(bf16, nnx.Param))[0].dtype == jnp.float32
  ref = np.asarray(forward(f32, tokens, positions, segments))
  out = forward(bf16, tokens, positions, segments)
  assert out.dtype == jnp.float32
  real = segments[0] > 0
  err = np.abs(np.asarray(out) - ref)[:, real].max()
  assert err < 0.05 * np.abs(ref).max(), err


def test_api_pieces_compose_and_tied_output():
  config = TINY.replace(tie_word_embeddings=True)
  model = Llama(config, rngs=nnx.Rngs(0))
  tokens, positions, segments = _packed_row(np.random.RandomState(4))
  assert not hasattr(model.lm_head, "kernel")
  w = model.output_embedding()
  assert w.shape == (config.hidden_size, config.vocab_size)
  np.testing.assert_array_equal(w, model.embedder.embedding[...].T)

  @nnx.jit
  def pieces(m, tokens, positions, segments):
    return m.hidden_states(m.embed(tokens), positions, segments) @ m.output_embedding()

  np.testing.assert_allclose(pieces(model, tokens, positions, segments),
                             forward(model, tokens, positions, segments), atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logical_axes_on_every_param(scan_layers):
  model = nnx.eval_shape(lambda: Llama(TINY.replace(scan_layers=scan_layers), rngs=nnx.Rngs(0)))
  known = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", None}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata()["logical_axes"]
    assert len(axes) == len(var.shape) and set(axes) <= known, (path, axes)
    assert (axes[0] == "layers") == (scan_layers and path[0] == "layers"), path
  q = model.layers[0].attn.q_proj if not scan_layers else model.layers.attn.q_proj
  assert q.kernel.get_metadata()["logical_axes"][-3:] == ("embed", "heads", "head_dim")


def test_sliding_window_refuses_long_rows():
  model = Llama(TINY.replace(model_type="mistral", sliding_window=4), rngs=nnx.Rngs(0))
  forward(model, np.zeros((1, 4), np.int32))
  with pytest.raises(ValueError, match="sliding_window"):
    forward(model, np.zeros((1, 5), np.int32))


# Configs and presets.

KNOWN_PARAMS = {
    "smollm2_135m": 134_515_008,
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama3_8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_preset_parameter_counts(name):
  config = LlamaConfig.preset(name, scan_layers=True)
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))  # never materialised
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == num_params(config) == KNOWN_PARAMS[name]


def test_tiny_preset_runs():
  config = LlamaConfig.preset("tiny")
  logits = forward(Llama(config, rngs=nnx.Rngs(0)), np.ones((1, 3), np.int32))
  assert logits.shape == (1, 3, config.vocab_size)


LLAMA31 = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False,
}
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def test_from_hf_reads_both_rope_formats():
  legacy = {**LLAMA31, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3",
                                                                  **LLAMA3_SCALING}}
  v5 = {**LLAMA31, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                       **LLAMA3_SCALING}}
  old_key = {**LLAMA31, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3",
                                                                   **LLAMA3_SCALING}}
  configs = [LlamaConfig.from_hf(d) for d in (legacy, v5, old_key)]
  assert configs[0] == configs[1] == configs[2] == LlamaConfig.preset("llama3_1_8b").replace(
      eos_token_id=(128001, 128008, 128009))
  assert configs[0].rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
  plain = LlamaConfig.from_hf({**LLAMA31, "rope_theta": 1e4})
  assert plain.rope_theta == 1e4 and plain.rope_scaling is None


@pytest.mark.parametrize("name", ["tiny", "smollm2_135m", "llama2_7b", "llama3_1_8b"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_to_hf_dict_round_trips_through_transformers(name, model_type):
  config = LlamaConfig.preset(name, model_type=model_type, qkv_bias=model_type == "qwen2")
  hf = transformers.AutoConfig.for_model(**config.to_hf_dict())
  assert type(hf).__name__.lower().startswith(model_type)
  assert LlamaConfig.from_hf(hf.to_dict()) == config
  assert LlamaConfig.from_dict(config.to_dict()) == config


def test_from_hf_folder_and_overrides(tmp_path):
  config = LlamaConfig.preset("smollm2_135m")
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
  loaded = LlamaConfig.from_hf(tmp_path, scan_layers=True, compute_dtype="bfloat16")
  assert loaded == config.replace(scan_layers=True, compute_dtype="bfloat16")


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gemma"}, "model_type"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
])
def test_from_hf_refuses_unsupported(change, field):
  with pytest.raises(ValueError, match=field):
    LlamaConfig.from_hf({**LLAMA31, "rope_theta": 5e5, **change})


def test_mlp_gradient_is_not_written_transposed():
  """The MLP's backward feeds its weight-gradient matmuls untransposed activations.

  Dense contracts as one 2-D matmul; a tensordot over [B, T, D] made XLA:CPU write the
  SwiGLU gradient as [F, B*T] (375 -> 293 ms per SmolLM2 MLP layer, forward + backward).
  """
  b, t = 2, 128
  config = dataclasses.replace(TINY, hidden_size=64, intermediate_size=192)
  mlp = model_lib.MLP(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(mlp)
  x = jnp.ones((b, t, config.hidden_size))

  def loss(p, x):
    return jnp.sum(nnx.merge(graphdef, p)(x) ** 2)

  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  f = config.intermediate_size
  transposed = re.findall(rf"= f32\[{f},(?:{b * t}|{b},{t})\]", text)
  assert not transposed, transposed
