"""A PEFT LoRA adapter folder from an im_jax LoRA model: what `PeftModel.from_pretrained`
loads onto the base model.

    DIR/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, ...
    DIR/adapter_model.safetensors  base_model.model.<HF module>.lora_A.weight [r, in],
                                   base_model.model.<HF module>.lora_B.weight [out, r]

Names come from the one HF parameter table (`models.llama.params.TABLE`): the adapter of the
im_jax kernel `layers/attn/q_proj/kernel` is named after its HF weight
`model.layers.{i}.self_attn.q_proj.weight`. A and B are flattened as the kernels are: im_jax
A `[*in_dims, r]` is PEFT's `lora_A.weight.T`, B `[r, *out_dims]` is `lora_B.weight.T`.
"""

import json
import pathlib
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from im_jax.convert.files import PathLike, atomic_dir
from im_jax.models import lora as lora_lib
from im_jax.models.llama import LlamaConfig
from im_jax.models.llama import params as hf_params

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _hf_module(target: str) -> str:
  """'q' -> 'model.layers.{i}.self_attn.q_proj' (from the parameter table)."""
  kernel = lora_lib.TARGETS[target] + ".kernel"
  entry = next(e for e in hf_params.TABLE if e.path == kernel)
  return entry.hf.removesuffix(".weight")


def peft_tensors(model: Any, config: LlamaConfig) -> dict[str, np.ndarray]:
  """Every adapter factor under its PEFT name, float32 numpy."""
  found = lora_lib.adapters(model)
  out = {}
  for target in config.lora.targets:
    rel = tuple(lora_lib.TARGETS[target].split("."))
    for i in range(config.num_layers):
      path = ("layers", *rel) if config.scan_layers else ("layers", i, *rel)
      a, b = (np.asarray(jax.device_get(v[...]), np.float32) for v in found[path])
      if config.scan_layers:
        a, b = a[i], b[i]
      r = config.lora.rank
      name = _PREFIX + _hf_module(target).format(i=i)
      out[name + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
      out[name + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
  return out


def adapter_config(config: LlamaConfig, base: str) -> dict[str, Any]:
  lora = config.lora
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
      "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
      "target_modules": sorted(_hf_module(t).rsplit(".", 1)[-1] for t in lora.targets),
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
  }


def save_peft_adapter(out: PathLike, model: Any, config: LlamaConfig, base: str, *,
                      overwrite: bool = False) -> pathlib.Path:
  """Writes the adapter folder atomically; `base` is recorded as the base model's path."""
  if not config.lora.enabled:
    raise ValueError("the model has no LoRA adapters (model.lora.rank is 0)")
  tensors = peft_tensors(model, config)
  with atomic_dir(out, overwrite=overwrite) as tmp:
    save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config(config, base), indent=2) + "\n")
  return pathlib.Path(out).absolute()
