"""Hugging Face <-> im_jax parameters for the Llama family: ONE table serves both directions.

Each entry names a HF tensor, the im_jax parameter path inside a decoder layer (or the model),
and how the layout changes. HF `nn.Linear` weights are `[out, in]`; im_jax kernels are
`[*in_dims, *out_dims]` (e.g. q `[embed, heads, head_dim]`, o `[heads, head_dim, embed]`), so
import is `w.T.reshape(kernel_shape)` and export `k.reshape(in, out).T`: both exact.
q/k are NOT permuted: im_jax applies RoPE in transformers' rotate-half convention, so HF's
q/k weights are used as they are and the round trip is bit-identical.
With `scan_layers`, layer tensors are stacked on a leading `layers` axis.

Import streams one HF tensor at a time with `safetensors.safe_open` (single file or a sharded
`model.safetensors.index.json`) and places each parameter straight into its sharding, so peak
host memory is about one (stacked) parameter on top of the placed model.
"""

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from im_jax import model_files
from im_jax.models.llama.config import LlamaConfig
from im_jax.models.llama.model import Llama

INDEX_FILE, SINGLE_FILE = model_files.INDEX_FILE, model_files.SINGLE_FILE
# Tensors some checkpoints carry that hold nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str  # HF name; "{i}" stands for the layer index
  path: str  # im_jax path, relative to a decoder layer when `hf` has "{i}"
  kind: str  # "copy" | "linear" (n_in input dims) | "bias"
  n_in: int = 1
  when: Callable[[LlamaConfig], bool] = lambda c: True


_L = "model.layers.{i}."
TABLE: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", "embedder.embedding", "copy"),
    Entry("model.norm.weight", "final_norm.scale", "copy"),
    Entry("lm_head.weight", "lm_head.kernel", "linear", when=lambda c: not c.tie_word_embeddings),
    Entry(_L + "input_layernorm.weight", "attn_norm.scale", "copy"),
    Entry(_L + "post_attention_layernorm.weight", "mlp_norm.scale", "copy"),
    Entry(_L + "self_attn.q_proj.weight", "attn.q_proj.kernel", "linear"),
    Entry(_L + "self_attn.k_proj.weight", "attn.k_proj.kernel", "linear"),
    Entry(_L + "self_attn.v_proj.weight", "attn.v_proj.kernel", "linear"),
    Entry(_L + "self_attn.o_proj.weight", "attn.o_proj.kernel", "linear", n_in=2),
    Entry(_L + "self_attn.q_proj.bias", "attn.q_proj.bias", "bias", when=lambda c: c.qkv_bias),
    Entry(_L + "self_attn.k_proj.bias", "attn.k_proj.bias", "bias", when=lambda c: c.qkv_bias),
    Entry(_L + "self_attn.v_proj.bias", "attn.v_proj.bias", "bias", when=lambda c: c.qkv_bias),
    Entry(_L + "self_attn.o_proj.bias", "attn.o_proj.bias", "bias", when=lambda c: c.o_bias),
    Entry(_L + "mlp.gate_proj.weight", "mlp.gate_proj.kernel", "linear"),
    Entry(_L + "mlp.up_proj.weight", "mlp.up_proj.kernel", "linear"),
    Entry(_L + "mlp.down_proj.weight", "mlp.down_proj.kernel", "linear"),
)


def _to_jax(entry: Entry, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if entry.kind == "linear":
    return w.T.reshape(shape)
  return w.reshape(shape)


def _to_hf(entry: Entry, x: np.ndarray) -> np.ndarray:
  if entry.kind == "linear":
    n_in = math.prod(x.shape[:entry.n_in])
    return np.ascontiguousarray(x.reshape(n_in, -1).T)
  if entry.kind == "bias":
    return x.reshape(-1)
  return x


def _hf_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
  if entry.kind == "linear":
    return (math.prod(shape[entry.n_in:]), math.prod(shape[:entry.n_in]))
  return (math.prod(shape),) if entry.kind == "bias" else shape


@dataclasses.dataclass(frozen=True)
class _Slot:
  """One HF tensor <-> (im_jax parameter path, layer index within a stacked parameter)."""

  entry: Entry
  name: str
  path: tuple[str | int, ...]
  layer: int | None  # index on the leading axis of a scanned parameter


def _slots(config: LlamaConfig) -> list[_Slot]:
  slots = []
  for e in TABLE:
    if not e.when(config):
      continue
    rel = tuple(e.path.split("."))
    if "{i}" not in e.hf:
      slots.append(_Slot(e, e.hf, rel, None))
      continue
    for i in range(config.num_layers):
      if config.scan_layers:
        slots.append(_Slot(e, e.hf.format(i=i), ("layers", *rel), i))
      else:
        slots.append(_Slot(e, e.hf.format(i=i), ("layers", i, *rel), None))
  return slots


def hf_tensor_names(config: LlamaConfig) -> list[str]:
  """Every HF tensor name a checkpoint of this config holds, in table order."""
  return [s.name for s in _slots(config)]


def abstract_model(config: LlamaConfig) -> Llama:
  """The model with ShapeDtypeStructs for values: shapes and metadata, no memory."""
  return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))


# Import.


class _Reader:
  """Lazy access to the tensors of a HF folder (one or several safetensors files), whose
  headers `model_files.tensor_index` has read and checked (names, dtypes, shapes, sizes)."""

  def __init__(self, hf_dir: str | os.PathLike):
    self.tensors = model_files.tensor_index(hf_dir)

  # Each read opens and closes its file: safe_open mmaps it, and pages of a mapping kept open
  # stay resident, which would add a full file's size to the peak (2.2x the model, measured on
  # SmolLM2, instead of 1.2x; see im_jax/convert/import_memory.py).

  def get(self, name: str) -> np.ndarray:
    with safe_open(self.tensors[name].file, "np") as f:
      return f.get_tensor(name)


def hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """HF name -> the shape that tensor has for `config`, from the table."""
  flat = dict(nnx.to_flat_state(nnx.state(abstract_model(config))))
  shapes = {}
  for slot in _slots(config):
    shape = flat[slot.path].shape
    shapes[slot.name] = _hf_shape(slot.entry, shape[1:] if slot.layer is not None else shape)
  return shapes


def check_hf_tensors(tensors: dict[str, "model_files.TensorInfo"], config: LlamaConfig, *,
                     dtype: str | None = None, where: str | os.PathLike = "") -> None:
  """Every tensor `config` needs is there with its shape, and nothing unknown is (before any
  tensor is read). `dtype`: the safetensors dtype config.json declares (F32, BF16, ...), which
  every tensor must have; else any floating dtype. ModelFileError names the file."""
  expected = hf_shapes(config)
  missing = [n for n in expected if n not in tensors]
  unknown = sorted(n for n in tensors if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                   and not (n == "lm_head.weight" and config.tie_word_embeddings))
  index = pathlib.Path(where) / model_files.INDEX_FILE
  listing = index if index.exists() else pathlib.Path(where) / model_files.SINGLE_FILE
  if missing:
    raise model_files.ModelFileError(
        listing, f"missing HF tensors: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
  if unknown:
    raise model_files.ModelFileError(
        listing, f"unknown HF tensors for this config: {unknown[:10]}"
        f"{' ...' if len(unknown) > 10 else ''}")
  for name, want in expected.items():
    info = tensors[name]
    if info.shape != want:
      raise model_files.ModelFileError(
          info.file, f"tensor {name} has shape {info.shape}; config.json gives {want}")
    if dtype is not None and info.dtype != dtype:
      raise model_files.ModelFileError(
          info.file, f"tensor {name} is {info.dtype}; config.json declares {dtype}")
    if info.dtype not in ("F16", "BF16", "F32", "F64"):
      raise model_files.ModelFileError(
          info.file, f"tensor {name} is {info.dtype}, not a floating-point dtype (quantized "
          "weights are unsupported)")


def _flat_params(model_or_state: Any) -> dict[tuple, Any]:
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) \
      else model_or_state
  if isinstance(state, nnx.State):
    return {tuple(p): v for p, v in nnx.to_flat_state(state)}
  # On disk layer indices are string keys.
  return {tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in p): v
          for p, v in traverse_util.flatten_dict(state).items()}


def _sharding_for(shardings: Any, path: tuple, var: nnx.Variable):
  if shardings is None:
    return None
  if callable(shardings):
    return shardings(var.get_metadata().get("logical_axes"), var.shape)
  s = _flat_params(shardings)[path]
  return s.get_value() if isinstance(s, nnx.Variable) else s


def load_hf(hf_dir: str | os.PathLike, config: LlamaConfig, *, shardings: Any = None,
            dtype: Any = None) -> Llama:
  """A `Llama` holding the weights of a HF folder (`model.safetensors` or a sharded index).

  Args:
    hf_dir: folder with safetensors weights (e.g. from `save_pretrained`).
    config: the model config (usually `LlamaConfig.from_hf(hf_dir, **options)`).
    shardings: None (default device), a pytree like `nnx.state(model, nnx.Param)` whose leaves
      are `jax.sharding.Sharding`s, or a callable `(logical_axes, shape) -> Sharding`.
    dtype: parameter dtype, default `config.param_dtype`.

  Raises:
    model_files.ModelFileError (a ValueError): naming the file of any missing or unknown
      tensor, a shape mismatch, or a damaged file (checked from the headers before reading).
  """
  reader = _Reader(hf_dir)
  check_hf_tensors(reader.tensors, config, where=hf_dir)
  dtype = np.dtype(jax.numpy.dtype(dtype or config.param_dtype))
  graphdef, state = nnx.split(abstract_model(config))
  flat = dict(nnx.to_flat_state(state))
  by_path: dict[tuple, list[_Slot]] = {}
  for slot in _slots(config):
    by_path.setdefault(slot.path, []).append(slot)
  for path, slots in by_path.items():
    var = flat[path]
    shape = var.shape[1:] if slots[0].layer is not None else var.shape
    host = np.empty(var.shape, dtype)  # one parameter at a time: stacked or not
    for slot in slots:  # shapes were checked against the table above
      x = _to_jax(slot.entry, reader.get(slot.name), shape)
      if slot.layer is None:
        host[...] = x
      else:
        host[slot.layer] = x
    sharding = _sharding_for(shardings, path, var)
    if sharding is None:
      value = jax.device_put(host)
    else:
      value = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
    del host
    var.set_value(value)
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# Export.


def iter_hf(model_or_state: Any, config: LlamaConfig, *, dtype: Any = None
            ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, numpy array) one tensor at a time, in table order."""
  flat = _flat_params(model_or_state)
  cache: dict[tuple, np.ndarray] = {}
  for slot in _slots(config):
    if slot.path not in cache:
      cache.clear()  # keep one (stacked) parameter on the host at a time
      v = flat[slot.path]
      v = v.get_value() if isinstance(v, nnx.Variable) else v
      cache[slot.path] = np.asarray(jax.device_get(v))
    x = cache[slot.path]
    x = x[slot.layer] if slot.layer is not None else x
    out = _to_hf(slot.entry, x)
    if dtype is not None:
      out = out.astype(jax.numpy.dtype(dtype))
    yield slot.name, out


def to_hf(model_or_state: Any, config: LlamaConfig, *, dtype: Any = None
          ) -> dict[str, np.ndarray]:
  """All parameters as HF-named numpy arrays (a full host copy; see `save_hf_safetensors`)."""
  return dict(iter_hf(model_or_state, config, dtype=dtype))


def save_hf_safetensors(out_dir: str | os.PathLike, model_or_state: Any, config: LlamaConfig,
                        *, dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes `config.json` and safetensors weights (sharded with an index above the limit).

  Returns the weight file names. Tokenizer and generation config are the caller's business.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  hf_config = config.to_hf_dict()
  if dtype is not None:
    hf_config["dtype"] = str(jax.numpy.dtype(dtype))
  (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  names: list[str] = []
  weight_map: dict[str, str] = {}
  shard: dict[str, np.ndarray] = {}  # host copies until written: at most one shard

  def flush():
    names.append(f"model-{len(names) + 1:05d}.safetensors")
    save_file(shard, out / names[-1], metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, names[-1]))
    shard.clear()

  size = total = 0
  for name, x in iter_hf(model_or_state, config, dtype=dtype):
    if shard and size + x.nbytes > max_shard_bytes:
      flush()
      size = 0
    shard[name] = x
    size += x.nbytes
    total += x.nbytes
  flush()
  if len(names) == 1:
    os.replace(out / names[0], out / SINGLE_FILE)
    return [SINGLE_FILE]
  final = {n: n.replace(".safetensors", f"-of-{len(names):05d}.safetensors") for n in names}
  for n in names:
    os.replace(out / n, out / final[n])
  index = {"metadata": {"total_size": total},
           "weight_map": {k: final[v] for k, v in weight_map.items()}}
  (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  return list(final.values())
