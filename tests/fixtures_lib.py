"""Builders for the local test assets (no network): tokenizers and the SmolLM2 HF folder."""

import contextlib
import fcntl
import pathlib

_DONE = ".complete"


@contextlib.contextmanager
def _building(out: pathlib.Path):
  """Holds a lock beside the cached asset `out` while it is checked and built: the suite's
  pytest-xdist workers share pytest's cache folder, and two of them may ask for the same
  asset at once (the second waits, then finds it complete)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out.parent / f".{out.name}.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    yield


def _ready(out: pathlib.Path) -> bool:
  return (out / _DONE).exists()


def _mark(out: pathlib.Path) -> pathlib.Path:
  (out / _DONE).write_text("ok")
  return out


def smollm2_tokenizer_dir(gguf: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  with _building(out):
    if _ready(out):
      return out
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(out)
    return _mark(out)


def smollm2_hf_dir(gguf: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  """The study's runtime conversion (im_jax/study/start_models.py), so the tests exercise it."""
  from im_jax.study import start_models

  with _building(out):
    return start_models.smollm2_hf_folder(out, gguf)


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Instruction modelling applies the loss to instructions as well as outputs.",
    "Write a short poem about the sea. The sea is wide and grey.",
    "What is the capital of France? The capital of France is Paris.",
    "Summarise the following text in one sentence.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "<|system|>\n<|user|>\n<|assistant|>\n",
] * 20


def tiny_tokenizer_dir(out: pathlib.Path, vocab_size: int = 512) -> pathlib.Path:
  with _building(out):
    return _tiny_tokenizer(out, vocab_size)


def _tiny_tokenizer(out: pathlib.Path, vocab_size: int) -> pathlib.Path:
  if _ready(out):
    return out
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  special = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=special,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  fast.chat_template = TINY_CHAT_TEMPLATE
  fast.save_pretrained(out)
  return _mark(out)


def tiny_hf_base(tokenizer_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  """A random-init `tiny` model as a HF folder: a base for LoRA runs (init_from=hf:OUT)."""
  from flax import nnx

  from im_jax.convert import hf_export
  from im_jax.models.llama import Llama, LlamaConfig

  config = LlamaConfig.preset("tiny")
  return hf_export.export_hf(out, Llama(config, rngs=nnx.Rngs(7)), config, tokenizer_dir,
                             template="tulu")


def one_error_line(err: str) -> str:
  """The one line a command printed on a fault, checked to be the only one and no traceback."""
  lines = [line for line in err.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]
