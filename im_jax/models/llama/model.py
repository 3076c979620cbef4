"""Llama-family decoder in Flax NNX (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2).

Parameters are kept in `param_dtype` and cast to `compute_dtype` where used; attention scores,
softmax, RMSNorm statistics and RoPE are float32, and so are the logits `__call__` returns.

RoPE uses the rotate-half convention (`x * cos + rotate_half(x) * sin`, with the frequencies
repeated over the two halves of a head), which is how transformers applies HF Llama q/k
weights. So HF q/k projections load as they are, with no permutation, and export back
bit-identically (see params.py).

Every `nnx.Param` carries `logical_axes` metadata; with `scan_layers` the decoder layers are
one stacked `Block` (leading `layers` axis) run by `jax.lax.scan`, else an `nnx.List`.
"""

import math
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from im_jax.models import attention as attention_lib
from im_jax.models import lora as lora_lib
from im_jax.models import partitioning as P
from im_jax.models.llama.config import LlamaConfig

# Logical names of the activations' dimensions (see partitioning.py).
_RESIDUAL = (P.BATCH, P.LENGTH, P.EMBED)
_Q = (P.BATCH, P.LENGTH, P.HEADS, P.HEAD_DIM)
_KV = (P.BATCH, P.LENGTH, P.KV_HEADS, P.HEAD_DIM)
_MLP = (P.BATCH, P.LENGTH, P.MLP)

_REMAT_POLICIES = {
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str | None],
           dtype, stack: int | None) -> nnx.Param:
  """A parameter with `logical_axes`; `stack` adds a leading `layers` dimension."""
  shape, axes = tuple(shape), tuple(axes)
  if stack is not None:
    shape, axes = (stack, *shape), ("layers", *axes)
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def _zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


class Dense(nnx.Module):
  """Contracts the last `n_in` dims of x with the first `n_in` dims of a (multi-dim) kernel.

  `target` (a `lora.TARGETS` name) gets a LoRA adapter when the config's LoRA lists it.
  """

  def __init__(self, shape: Sequence[int], axes: Sequence[str | None], *, n_in: int = 1,
               use_bias: bool = False, config: LlamaConfig, rngs: nnx.Rngs,
               stack: int | None = None, target: str | None = None):
    dtype = jnp.dtype(config.param_dtype)
    self.n_in = n_in
    self.compute_dtype = jnp.dtype(config.compute_dtype)
    init = jax.nn.initializers.normal(config.initializer_range)
    self.kernel = _param(rngs, init, shape, axes, dtype, stack)
    self.bias = (_param(rngs, _zeros, shape[n_in:], axes[n_in:], dtype, stack)
                 if use_bias else None)
    lora = config.lora
    # The salt gives each target its own dropout mask (q, k and v share their input).
    self.lora = (lora_lib.Adapter(shape, axes, n_in, lora, list(lora_lib.TARGETS).index(target),
                                  rngs=rngs, stack=stack)
                 if lora.enabled and target in lora.targets else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.compute_dtype
    y = _contract(x.astype(dt), self.kernel[...].astype(dt), self.n_in)
    if self.lora is not None and (delta := self.lora(x, dt)) is not None:
      y = y + delta
    if self.bias is not None:
      y = y + self.bias[...].astype(dt)
    return y


def _contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """`tensordot(x, kernel, n_in)` as one 2-D matmul: [tokens, inputs] @ [inputs, outputs].

  Same numbers; the reshapes are free. Why: the gradient of a tensordot over [B, T, ...]
  contracts two dims, and XLA:CPU then writes the SwiGLU gradient transposed for the
  weight-gradient matmul (SmolLM2 MLP forward + backward 375 -> 293 ms per layer flat).
  """
  lead, ins, outs = x.shape[:x.ndim - n_in], kernel.shape[:n_in], kernel.shape[n_in:]
  y = x.reshape(-1, math.prod(ins)) @ kernel.reshape(math.prod(ins), math.prod(outs))
  return y.reshape(*lead, *outs)


class RMSNorm(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
    self.eps = config.rms_norm_eps
    self.compute_dtype = jnp.dtype(config.compute_dtype)
    self.scale = _param(rngs, _ones, (config.hidden_size,), ("embed",),
                        jnp.dtype(config.param_dtype), stack)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    # As transformers: normalise in float32, cast, then scale.
    return y.astype(self.compute_dtype) * self.scale[...].astype(self.compute_dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies `[head_dim // 2]` float32, with llama3/linear scaling as transformers."""
  dim = config.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)
  s = config.rope_scaling
  if s is None:
    return inv_freq
  if s.rope_type == "linear":
    return (inv_freq / np.float32(s.factor)).astype(np.float32)
  old_len = s.original_max_position_embeddings
  low_wavelen = old_len / s.low_freq_factor
  high_wavelen = old_len / s.high_freq_factor
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos, sin `[B, T, head_dim]` float32 for integer positions `[B, T]`."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE on `[B, T, heads, head_dim]`."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x32 * cos[:, :, None] + rotated * sin[:, :, None]
  return out.astype(x.dtype)


@flax.struct.dataclass
class KVCache:
  """A fixed-size key/value cache for decoding (`Llama.init_cache`, `Llama.decode`).

  Slots `[0, index)` are written; a slot's segment id 0 marks it empty or padding, so the
  attention mask (same segment, kv position <= q position) needs no separate length.
  """

  k: jax.Array  # [layers, B, S, kv_heads, head_dim] compute dtype
  v: jax.Array  # [layers, B, S, kv_heads, head_dim]
  segment_ids: jax.Array  # [B, S] int32, 0 = empty or padding
  positions: jax.Array  # [B, S] int32 RoPE positions of the cached tokens
  index: jax.Array  # int32 scalar: the next slot to write


@flax.struct.dataclass
class LayerCache:
  """One layer's view of a `KVCache` (k, v `[B, S, K, hd]`) plus the shared masks."""

  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array
  positions: jax.Array


class Attention(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
    d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    kw = dict(config=config, rngs=rngs, stack=stack)
    self.q_proj = Dense((d, h, hd), ("embed", "heads", "head_dim"), use_bias=config.qkv_bias,
                        target="q", **kw)
    self.k_proj = Dense((d, k, hd), ("embed", "kv_heads", "head_dim"),
                        use_bias=config.qkv_bias, target="k", **kw)
    self.v_proj = Dense((d, k, hd), ("embed", "kv_heads", "head_dim"),
                        use_bias=config.qkv_bias, target="v", **kw)
    self.o_proj = Dense((h, hd, d), ("heads", "head_dim", "embed"), n_in=2,
                        use_bias=config.o_bias, target="o", **kw)
    self.implementation = config.attention_impl

  def _qkv(self, x, cos, sin):
    q = P.constrain(apply_rope(self.q_proj(x), cos, sin), _Q)
    k = P.constrain(apply_rope(self.k_proj(x), cos, sin), _KV)
    return q, k, P.constrain(self.v_proj(x), _KV)

  def __call__(self, x, cos, sin, positions, segment_ids):
    q, k, v = self._qkv(x, cos, sin)
    out = attention_lib.attention(
        q, k, v, segment_ids, segment_ids, positions, positions,
        implementation=self.implementation)
    return self.o_proj(P.constrain(out, _Q))

  def decode(self, x, cos, sin, positions, segment_ids, layer_cache: LayerCache, index):
    """Writes this call's k/v at `index` of the layer's cache, then attends over the cache.

    The cache's segment ids and positions (already updated by the caller) mask empty slots
    and padding. Always the XLA path: T differs from S and T is often 1.
    """
    q, k, v = self._qkv(x, cos, sin)
    dt = layer_cache.k.dtype
    k_all = jax.lax.dynamic_update_slice(layer_cache.k, k.astype(dt), (0, index, 0, 0))
    v_all = jax.lax.dynamic_update_slice(layer_cache.v, v.astype(dt), (0, index, 0, 0))
    out = attention_lib.attention(
        q, k_all, v_all, segment_ids, layer_cache.segment_ids, positions,
        layer_cache.positions, implementation="xla")
    return self.o_proj(out), (k_all, v_all)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
    d, f = config.hidden_size, config.intermediate_size
    kw = dict(config=config, rngs=rngs, stack=stack)
    self.gate_proj = Dense((d, f), ("embed", "mlp"), target="gate", **kw)
    self.up_proj = Dense((d, f), ("embed", "mlp"), target="up", **kw)
    self.down_proj = Dense((f, d), ("mlp", "embed"), target="down", **kw)

  def __call__(self, x):
    gate = P.constrain(self.gate_proj(x), _MLP)
    up = P.constrain(self.up_proj(x), _MLP)
    return self.down_proj(jax.nn.silu(gate) * up)


class Block(nnx.Module):
  """One pre-norm decoder layer; with `stack=n`, n layers' parameters stacked for scan."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
    kw = dict(rngs=rngs, stack=stack)
    self.attn_norm = RMSNorm(config, **kw)
    self.attn = Attention(config, **kw)
    self.mlp_norm = RMSNorm(config, **kw)
    self.mlp = MLP(config, **kw)

  def __call__(self, x, cos, sin, positions, segment_ids):
    x = P.constrain(x + self.attn(self.attn_norm(x), cos, sin, positions, segment_ids),
                    _RESIDUAL)
    return P.constrain(x + self.mlp(self.mlp_norm(x)), _RESIDUAL)

  def decode(self, x, cos, sin, positions, segment_ids, layer_cache: LayerCache, index):
    """`__call__` against a KV cache: returns (x, (k, v)) with this layer's updated cache."""
    a, kv = self.attn.decode(self.attn_norm(x), cos, sin, positions, segment_ids,
                             layer_cache, index)
    x = x + a
    return x + self.mlp(self.mlp_norm(x)), kv


class Embedder(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.embedding = _param(
        rngs, jax.nn.initializers.normal(config.initializer_range),
        (config.vocab_size, config.hidden_size), ("vocab", "embed"),
        jnp.dtype(config.param_dtype), None)


class Llama(nnx.Module):
  """Decoder-only Llama-family language model (see docs/design.md, Model API)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, v = config.hidden_size, config.vocab_size
    self.compute_dtype = jnp.dtype(config.compute_dtype)
    self.embedder = Embedder(config, rngs=rngs)
    if config.scan_layers:
      self.layers = Block(config, rngs=rngs, stack=config.num_layers)
    else:
      self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config, rngs=rngs)
    self.lm_head = (None if config.tie_word_embeddings else
                    Dense((d, v), ("embed", "vocab"), config=config, rngs=rngs))

  def embed(self, tokens: jax.Array) -> jax.Array:
    """Input embeddings `[B, T, D]` in the compute dtype."""
    # The table is gathered (FSDP) and rows looked up locally: looking up in the sharded
    # table would need every row's tokens on every device.
    table = P.constrain(self.embedder.embedding[...], (P.VOCAB, P.EMBED))
    x = jnp.take(table, tokens, axis=0).astype(self.compute_dtype)
    return P.constrain(x, _RESIDUAL)

  def hidden_states(self, embeddings: jax.Array, positions: jax.Array,
                    segment_ids: jax.Array) -> jax.Array:
    """Decoder stack plus final norm: `[B, T, D]` in the compute dtype."""
    cfg = self.config
    if cfg.sliding_window is not None and embeddings.shape[1] > cfg.sliding_window:
      raise ValueError(f"sequence length {embeddings.shape[1]} exceeds sliding_window "
                       f"{cfg.sliding_window}; sliding-window attention is not implemented")
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))
    x = P.constrain(embeddings.astype(self.compute_dtype), _RESIDUAL)

    # LoRA dropout (training only): one key per layer, passed in so remat and scan see it.
    key = lora_lib.current_dropout_rng() if cfg.lora.dropout > 0 else None
    keys = None if key is None else jax.random.split(key, cfg.num_layers)

    def run(graphdef, state, x, layer_key):
      with lora_lib.dropout_rng(layer_key):
        return nnx.merge(graphdef, state)(x, cos, sin, positions, segment_ids)

    if cfg.remat_policy != "none":
      run = jax.checkpoint(run, policy=_REMAT_POLICIES[cfg.remat_policy], static_argnums=(0,),
                           prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      graphdef, state = nnx.split(self.layers)
      x, _ = jax.lax.scan(lambda h, xs: (run(graphdef, xs[0], h, xs[1]), None), x, (state, keys))
    else:
      for i, layer in enumerate(self.layers):
        x = run(*nnx.split(layer), x, None if keys is None else keys[i])
    return P.constrain(self.final_norm(x), _RESIDUAL)

  def init_cache(self, batch: int, length: int) -> KVCache:
    """An empty cache for `batch` rows of up to `length` tokens (prompt plus new tokens)."""
    cfg = self.config
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, self.compute_dtype), v=jnp.zeros(shape, self.compute_dtype),
                   segment_ids=jnp.zeros((batch, length), jnp.int32),
                   positions=jnp.zeros((batch, length), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

  def decode(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Logits `[B, T, V]` float32 for `tokens` `[B, T]` appended to `cache` at `cache.index`.

    Used for both prefill (T = prompt length, left padding marked by segment id 0) and
    one-token steps (T = 1). Tokens attend to cached tokens of the same segment at positions
    <= their own, so the logits equal `__call__` over the whole sequence.
    """
    cfg = self.config
    length = cache.segment_ids.shape[1]
    if cfg.sliding_window is not None and length > cfg.sliding_window:
      raise ValueError(f"cache length {length} exceeds sliding_window {cfg.sliding_window}; "
                       "sliding-window attention is not implemented")
    index = cache.index
    kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, index))
    kv_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, index))
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))
    x = self.embed(tokens)

    def layer(block, h, k, v):
      return block.decode(h, cos, sin, positions, segment_ids,
                          LayerCache(k, v, kv_segments, kv_positions), index)

    if cfg.scan_layers:
      graphdef, state = nnx.split(self.layers)

      def body(h, xs):
        layer_state, k, v = xs
        return layer(nnx.merge(graphdef, layer_state), h, k, v)

      x, (ks, vs) = jax.lax.scan(body, x, (state, cache.k, cache.v))
    else:
      ks, vs = [], []
      for i, block in enumerate(self.layers):
        x, (k, v) = layer(block, x, cache.k[i], cache.v[i])
        ks.append(k)
        vs.append(v)
      ks, vs = jnp.stack(ks), jnp.stack(vs)
    logits = self._logits(self.final_norm(x))
    new_cache = KVCache(k=ks, v=vs, segment_ids=kv_segments, positions=kv_positions,
                        index=index + tokens.shape[1])
    return logits, new_cache

  def output_embedding(self) -> jax.Array:
    """The output projection `[D, V]` in the compute dtype (tied: the embedding transposed).

    Multiply with `preferred_element_type=jnp.float32` to get float32 logits.
    """
    if self.lm_head is None:
      w = self.embedder.embedding[...].T
    else:
      w = self.lm_head.kernel[...]
    # Gathered like every weight under FSDP, so the logits keep the hidden states' rows split.
    return P.constrain(w.astype(self.compute_dtype), (P.EMBED, P.VOCAB))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits `[B, T, V]` float32. Defaults: one unpadded segment per row."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    return self._logits(self.hidden_states(self.embed(tokens), positions, segment_ids))

  def _logits(self, hidden: jax.Array) -> jax.Array:
    return jnp.einsum("btd,dv->btv", hidden, self.output_embedding(),
                      preferred_element_type=jnp.float32)
