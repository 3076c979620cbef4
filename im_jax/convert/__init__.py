"""Conversion between Hugging Face folders, im_jax CKPT folders and training checkpoints.

- `ckpt.save_ckpt` / `ckpt.load_ckpt`: the self-contained CKPT folder (params, config,
  tokenizer, provenance), restored straight into shardings.
- `hf_export.export_hf`: a HF folder transformers loads as is (tulu chat template included).
- `load.load_pretrained`: `hf:DIR`, a CKPT or a training checkpoint -> (model, config,
  tokenizer_dir, info), the trainer's `init_from`.
"""

from im_jax.convert.ckpt import LoadedCkpt, load_ckpt, save_ckpt
from im_jax.convert.hf_export import export_hf, tulu_chat_template, tulu_chat_template_for
from im_jax.convert.load import load_pretrained

__all__ = ["LoadedCkpt", "export_hf", "load_ckpt", "load_pretrained", "save_ckpt",
           "tulu_chat_template", "tulu_chat_template_for"]
