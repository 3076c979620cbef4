"""LlamaConfig: one config for the Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2).

Built from named presets or from a Hugging Face `config.json`, and written back as a dict
transformers loads. Anything the model cannot reproduce exactly is refused with a
ValueError naming the field, never silently ignored.
"""

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from im_jax.models import attention
from im_jax.models.lora import LoraConfig

MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
REMAT_POLICIES = ("none", "minimal", "full")
DTYPES = ("float32", "bfloat16", "float16")
TokenIds = int | tuple[int, ...] | None


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """HF `rope_parameters` beyond the default: "llama3" (Llama 3.1+) or "linear"."""

  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def to_hf(self) -> dict[str, Any]:
    if self.rope_type == "linear":
      return {"rope_type": "linear", "factor": self.factor}
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture plus the runtime options of the JAX model (hashable: usable as a static arg)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2; Llama `attention_bias` sets both biases
  o_bias: bool = False
  sliding_window: int | None = None  # only checked: rows longer than this are refused
  model_type: str = "llama"
  bos_token_id: TokenIds = None
  eos_token_id: TokenIds = None
  pad_token_id: TokenIds = None
  initializer_range: float = 0.02
  # Runtime options (not part of the HF config).
  scan_layers: bool = False
  remat_policy: str = "none"
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  # auto (splash on TPU, blocked on CPU for rows >= 256, else xla) | xla | splash | cudnn | blocked
  attention_impl: str = "auto"
  lora: LoraConfig = LoraConfig()  # rank 0: no adapters

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type {self.model_type!r} unsupported; use one of {list(MODEL_TYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_attention_heads {self.num_heads} not divisible by num_key_value_heads "
          f"{self.num_kv_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
    for field in ("param_dtype", "compute_dtype"):
      if getattr(self, field) not in DTYPES:
        raise ValueError(f"{field} {getattr(self, field)!r} not in {DTYPES}")
    if self.attention_impl not in attention.IMPLEMENTATIONS:
      raise ValueError(f"attention_impl {self.attention_impl!r} not in "
                       f"{attention.IMPLEMENTATIONS}")
    if self.model_type == "qwen2" and self.o_bias:
      raise ValueError("o_bias: Qwen2 has no o_proj bias")
    if self.model_type != "llama" and self.qkv_bias != (self.model_type == "qwen2"):
      raise ValueError(f"qkv_bias={self.qkv_bias} cannot be expressed for {self.model_type}")

  # Construction.

  @classmethod
  def preset(cls, name: str, **overrides) -> "LlamaConfig":
    if name not in PRESETS:
      raise ValueError(f"preset {name!r} is unknown; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)

  @classmethod
  def from_hf(cls, hf: dict[str, Any] | str | os.PathLike, **overrides) -> "LlamaConfig":
    """From a HF config dict, a config.json path or a folder holding one."""
    if not isinstance(hf, dict):
      path = pathlib.Path(hf)
      if path.is_dir():
        path = path / "config.json"
      hf = json.loads(path.read_text())
    return dataclasses.replace(_parse_hf(hf), **overrides)

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-able dict of every field (checkpoints store this); inverse of `from_dict`."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if isinstance(d.get("lora"), dict):  # absent in configs saved before LoRA: off
      d["lora"] = LoraConfig(**{**d["lora"], "targets": tuple(d["lora"]["targets"])})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      d[key] = _token_ids(d.get(key))
    return cls(**d)

  def to_hf_dict(self) -> dict[str, Any]:
    """A config dict `transformers.AutoConfig.for_model(**d)` / `from_pretrained` loads."""
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope = {**self.rope_scaling.to_hf(), "rope_theta": self.rope_theta}
    d = {
        "architectures": [MODEL_TYPES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "rope_parameters": rope,
        "tie_word_embeddings": self.tie_word_embeddings,
        "initializer_range": self.initializer_range,
        "bos_token_id": _hf_token_ids(self.bos_token_id),
        "eos_token_id": _hf_token_ids(self.eos_token_id),
        "pad_token_id": _hf_token_ids(self.pad_token_id),
        "dtype": self.param_dtype,
    }
    if self.model_type == "llama":
      d.update(attention_bias=self.qkv_bias, mlp_bias=False)
    elif self.model_type == "mistral":
      d["sliding_window"] = self.sliding_window
    else:
      d.update(use_sliding_window=self.sliding_window is not None,
               sliding_window=self.sliding_window)
    return d

  # Derived sizes.

  @property
  def q_dim(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.num_kv_heads * self.head_dim


def _token_ids(x: Any) -> TokenIds:
  return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else x


def _hf_token_ids(x: TokenIds) -> Any:
  return list(x) if isinstance(x, tuple) else x


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """Both formats: transformers 5 `rope_parameters` and legacy `rope_theta` + `rope_scaling`."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.pop("rope_theta", None)
  if theta is None:
    theta = hf.get("rope_theta", 10000.0)
  rope_type = params.pop("rope_type", params.pop("type", "default"))
  if rope_type == "default":
    return float(theta), None
  if rope_type == "linear":
    return float(theta), RopeScaling("linear", float(params["factor"]))
  if rope_type == "llama3":
    orig = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return float(theta), RopeScaling(
        "llama3", float(params["factor"]), float(params["low_freq_factor"]),
        float(params["high_freq_factor"]), int(orig))
  raise ValueError(f"rope_parameters.rope_type {rope_type!r} unsupported (default, linear, llama3)")


def _parse_hf(hf: dict[str, Any]) -> LlamaConfig:
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} unsupported; supported: {list(MODEL_TYPES)}")
  for arch in hf.get("architectures") or []:
    if arch != MODEL_TYPES[model_type]:
      raise ValueError(f"architectures: {arch!r} unsupported (expected {MODEL_TYPES[model_type]})")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r} unsupported (silu only)")
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=True unsupported")
  if hf.get("pretraining_tp", 1) != 1:
    raise ValueError(f"pretraining_tp={hf['pretraining_tp']} unsupported")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError("partial_rotary_factor unsupported")
  if hf.get("quantization_config") and not _is_dequantized_gguf(hf):
    raise ValueError("quantization_config: quantized checkpoints unsupported")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  theta, scaling = _rope_from_hf(hf)
  window = hf.get("sliding_window")
  if model_type == "qwen2":
    window = window if hf.get("use_sliding_window") else None
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types) and window is None:
      raise ValueError("layer_types: sliding-attention layers unsupported")
  elif model_type == "llama":
    window = None
  attention_bias = bool(hf.get("attention_bias", False))
  return LlamaConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=head_dim,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=attention_bias or model_type == "qwen2",
      o_bias=attention_bias and model_type == "llama",
      sliding_window=window,
      model_type=model_type,
      bos_token_id=_token_ids(hf.get("bos_token_id")),
      eos_token_id=_token_ids(hf.get("eos_token_id")),
      pad_token_id=_token_ids(hf.get("pad_token_id")),
      initializer_range=hf.get("initializer_range", 0.02),
  )


def _is_dequantized_gguf(hf: dict[str, Any]) -> bool:
  # transformers' GGUF loader leaves this note on configs it already dequantized to floats.
  return hf["quantization_config"].get("quant_method") == "gguf"


def num_params(config: LlamaConfig) -> int:
  """Parameter count from the sizes alone (independent of the module tree)."""
  d, f = config.hidden_size, config.intermediate_size
  attn = d * (config.q_dim + 2 * config.kv_dim) + config.q_dim * d
  attn += (config.q_dim + 2 * config.kv_dim) * config.qkv_bias + d * config.o_bias
  layer = attn + 3 * d * f + 2 * d
  embed = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
  return embed + config.num_layers * layer + d


def training_flops(config: LlamaConfig, lengths: Sequence[int], reference: bool = False) -> float:
  """Useful FLOPs of one training step over causal-attention spans of `lengths` (full rows, or
  the segments of packed rows): 6 N per token for the matmul weights (the input embedding is a
  lookup, not a matmul, unless tied to the output) plus causal attention, 6 L H hd x per token
  of a span of x (half the score matrix). Remat's recomputation is not useful work: excluded.
  `reference`: a KL reference model's forward pass adds a third (2 of the 6)."""
  n = num_params(config)
  if not config.tie_word_embeddings:
    n -= config.vocab_size * config.hidden_size
  per_token_attention = 6 * config.num_layers * config.num_heads * config.head_dim
  flops = 6 * n * sum(lengths) + per_token_attention * sum(x * x for x in lengths)
  passes = 8 if reference else 6  # forward 2, backward 4; the reference forward 2 more
  return float(flops) * passes / 6


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=2048, bos_token_id=1,
        eos_token_id=2, pad_token_id=0),
    "smollm2_135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "llama2_7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2),
    "llama2_13b": LlamaConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
        num_heads=40, num_kv_heads=40, head_dim=128, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2),
    "llama3_8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
}
# Llama 3.1: the same shapes with llama3 rope scaling to a 128k context.
PRESETS["llama3_1_8b"] = dataclasses.replace(
    PRESETS["llama3_8b"], max_position_embeddings=131072,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
