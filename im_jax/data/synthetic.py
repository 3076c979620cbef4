"""A small synthetic instruction dataset the project generates itself.

It backs the README's demo and tests that need realistic-looking conversations without
shipping third-party data. The tasks are deterministic functions of the prompt (count, sort,
reverse, add, pick), so a model can learn them, and the instructions are long relative to the
outputs: the regime where the paper finds Instruction Modelling helps.
"""

import json
import pathlib
import random

from im_jax.data.conversation import Conversation, Message

_WORDS = (
    "apple river stone cloud garden window silver forest candle bridge music paper ocean "
    "winter summer yellow purple orange market castle rabbit turtle falcon meadow valley "
    "engine rocket planet coffee bread honey lemon pepper cotton marble copper harbor island"
).split()

_SYSTEM = "You are a careful assistant. Answer with the result only."


def _count(rng: random.Random) -> tuple[str, str]:
  items = rng.sample(_WORDS, rng.randint(3, 9))
  return (f"Here is a list of words: {', '.join(items)}. How many words are in the list?",
          str(len(items)))


def _sort(rng: random.Random) -> tuple[str, str]:
  nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
  return (f"Sort the following numbers from smallest to largest: {' '.join(map(str, nums))}.",
          " ".join(map(str, sorted(nums))))


def _reverse(rng: random.Random) -> tuple[str, str]:
  words = rng.sample(_WORDS, rng.randint(3, 6))
  return (f"Reverse the order of the words in this sentence: {' '.join(words)}.",
          " ".join(reversed(words)))


def _add(rng: random.Random) -> tuple[str, str]:
  a, b = rng.randint(0, 50), rng.randint(0, 50)
  return f"What is {a} plus {b}? Reply with the number.", str(a + b)


def _first(rng: random.Random) -> tuple[str, str]:
  words = rng.sample(_WORDS, rng.randint(4, 8))
  letter = words[0][0]
  return (f"From the words {', '.join(words)}, which one comes first in the list "
          f"and starts with the letter {letter}?", words[0])


_TASKS = (_count, _sort, _reverse, _add, _first)


def make_conversations(n: int, seed: int = 0) -> list[Conversation]:
  """`n` conversations; about one in five has a system message, one in six two turns."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    messages = []
    if rng.random() < 0.2:
      messages.append(Message("system", _SYSTEM))
    for _ in range(2 if rng.random() < 1 / 6 else 1):
      prompt, answer = rng.choice(_TASKS)(rng)
      messages += [Message("user", prompt), Message("assistant", answer)]
    out.append(Conversation(tuple(messages), source="synthetic", record=i, id=f"synthetic_{i}"))
  return out


def write_jsonl(path: str | pathlib.Path, conversations: list[Conversation]) -> pathlib.Path:
  """Writes Tulu "messages" JSONL, the format the paper's data uses."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as f:
    for c in conversations:
      record = {"dataset": "synthetic", "id": c.id,
                "messages": [{"role": m.role, "content": m.content} for m in c.messages]}
      f.write(json.dumps(record) + "\n")
  return path


def train_tokenizer(texts: list[str], out_dir: str | pathlib.Path, vocab_size: int = 1024,
                    chat_template: str | None = None) -> pathlib.Path:
  """A byte-level BPE tokenizer trained on `texts`, saved as a HF folder.

  Special tokens: `<pad>` (0), `<s>` (BOS, 1), `</s>` (EOS, 2). Any text encodes (byte
  fallback), so it also works on data it was not trained on, just less compactly.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top  (only the demo needs these)
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)  # its bar prints blank lines in logs
  tok.train_from_iterator(texts, trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  if chat_template is not None:
    fast.chat_template = chat_template
  out_dir = pathlib.Path(out_dir)
  fast.save_pretrained(out_dir)
  return out_dir


def tokenizer_texts(conversations: list[Conversation]) -> list[str]:
  """Training text for `train_tokenizer`: every message plus the tulu role headers."""
  texts = [m.content for c in conversations for m in c.messages]
  return texts + ["<|system|>\n<|user|>\n<|assistant|>\n"] * 10
