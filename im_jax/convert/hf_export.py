"""Export to a Hugging Face folder that `AutoModelForCausalLM` / `AutoTokenizer` load as is.

Writes config.json (with `dtype`), generation_config.json, safetensors (sharded with an index
above `max_shard_bytes`, via `params.save_hf_safetensors`), the tokenizer files and the chat
template. A model trained with the `tulu` template gets `tulu_chat_template_for(tokenizer)`,
which renders exactly what `im_jax.data.templates` trains on; with `hf` the tokenizer's own
template stays.
The folder is written under a temporary name and renamed when complete.
"""

import copy
import json
import os
import pathlib
from typing import Any

from im_jax.convert.files import PathLike, as_tokenizer, atomic_dir
from im_jax.data.conversation import Conversation, Message
from im_jax.data.kinds import TokenKind
from im_jax.data.templates import ChatTemplate, TemplateConfig
from im_jax.models.llama import LlamaConfig
from im_jax.models.llama import params as hf_params

DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# The paper's Tulu format (see im_jax.data.templates): `<|role|>\n{content}\n` per message with
# the content stripped (`strip` off: as given), `{eos}` after assistant content, the whole
# string right-stripped, and in front the text of the ids the tokenizer adds to a text (BOS for
# LLaMA-2, nothing for SmolLM2): `apply_chat_template` tokenizes without adding special tokens,
# so the template writes them. The generation prompt follows the unstripped string, so a prompt
# is exactly the prefix training saw before an assistant turn: `...<|user|>\n{c}\n<|assistant|>\n`.
def tulu_chat_template(prefix: str = "", strip: bool = True) -> str:
  """The Jinja chat template rendering what `templates.ChatTemplate` trains on under tulu."""
  content = "(message['content'] | trim)" if strip else "message['content']"
  return (
      "{%- set ns = namespace(text='') -%}"
      "{%- for message in messages -%}"
      "{%- set ns.text = ns.text + '<|' + message['role'] + '|>\n' + " + content + " -%}"
      "{%- if message['role'] == 'assistant' -%}{%- set ns.text = ns.text + eos_token -%}"
      "{%- endif -%}"
      "{%- set ns.text = ns.text + '\n' -%}"
      "{%- endfor -%}"
      "{{- " + json.dumps(prefix) + " -}}"
      "{%- if add_generation_prompt -%}{{- ns.text + '<|assistant|>\n' -}}"
      "{%- else -%}{{- ns.text | trim -}}{%- endif -%}"
  )


def tulu_chat_template_for(tokenizer: Any, strip: bool = True) -> str:
  """`tulu_chat_template` with the tokenizer's own prefix (its BOS, if it adds one)."""
  prefix_ids = ChatTemplate(tokenizer, TemplateConfig("tulu")).prefix_ids
  return tulu_chat_template("".join(tokenizer.convert_ids_to_tokens(prefix_ids)), strip)


def end_of_turn_ids(tokenizer: Any, template: str) -> list[int]:
  """Ids closing an assistant turn under `template` (tulu: EOS; hf: e.g. `<|im_end|>`)."""
  probe = Conversation((Message("user", "Hi"), Message("assistant", "Hello")))
  tokenized = ChatTemplate(tokenizer, TemplateConfig(template)).tokenize(probe)
  return sorted({int(i) for i in tokenized.ids[tokenized.kinds == TokenKind.EOS]})


def generation_config(config: LlamaConfig, tokenizer: Any, template: str) -> dict[str, Any]:
  """bos/eos/pad ids for generation; eos lists every id that ends an assistant turn."""
  eos = config.eos_token_id
  eos = list(eos) if isinstance(eos, tuple) else [] if eos is None else [eos]
  for i in [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer, template)]:
    if i is not None and i not in eos:
      eos.append(int(i))
  bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
  pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
  out = {"bos_token_id": bos, "eos_token_id": eos[0] if len(eos) == 1 else eos}
  if pad is not None:
    out["pad_token_id"] = pad
  return out


EXPORT_METADATA = "im_jax_export.json"


def export_hf(out_dir: PathLike, model_or_state: Any, config: LlamaConfig, tokenizer: Any, *,
              template: str, strip_content: bool | None = None, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              overwrite: bool = False, metadata: dict | None = None) -> pathlib.Path:
  """Writes a HF folder for a trained model; returns its path.

  Args:
    out_dir: destination (must not exist unless `overwrite`).
    model_or_state: a `Llama`, its nnx.Param state, or that state as a dict (layout per
      `config.scan_layers`).
    config: the model config.
    tokenizer: a tokenizer folder or a transformers tokenizer.
    template: the chat template used in training: "tulu" (written into the tokenizer) or "hf"
      (the tokenizer's own template is kept).
    strip_content: the training run's `data.strip_content` (None: the template's default).
    dtype: "float32" or "bfloat16" for the safetensors and config.json's `dtype`.
    max_shard_bytes: above this the weights are split into shards with an index file.
    metadata: written as `EXPORT_METADATA` (the trainer's: the template exported and the
      training sources with their format and template overrides).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} not in {DTYPES}")
  if template not in ("tulu", "hf"):
    raise ValueError(f"template must be 'tulu' or 'hf', got {template!r}")
  tok = copy.deepcopy(as_tokenizer(tokenizer))  # the caller's tokenizer keeps its template
  strips = TemplateConfig(template, strip_content=strip_content).strips
  if template == "tulu":
    tok.chat_template = tulu_chat_template_for(tok, strips)

  gen = generation_config(config, tok, template)  # also checks the template works
  with atomic_dir(out_dir, overwrite=overwrite) as tmp:
    hf_params.save_hf_safetensors(tmp, model_or_state, config, dtype=dtype,
                                  max_shard_bytes=max_shard_bytes)
    for f in tmp.glob("*.safetensors"):  # safetensors writes 0600; others must read the export
      f.chmod(0o644 & ~_umask())
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save_pretrained(str(tmp))
    if metadata is not None:
      (tmp / EXPORT_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
  return pathlib.Path(out_dir).absolute()


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask
