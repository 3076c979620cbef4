"""Dataset statistics for choosing between Instruction Tuning (IT) and Instruction Modelling (IM).

Definitions follow the paper (docs: ../shared/notes/paper.md): an example's instruction length
is the number of whitespace-separated words of all its non-assistant (system and user)
messages, its output length the words of all its assistant messages; `length_ratio` is the
mean instruction length over the mean output length. Token counts, when a tokenizer is given,
add up each message's content tokenized on its own with `add_special_tokens=False` (no chat
template, so they measure the data, not the template).
"""

from collections.abc import Sequence
import dataclasses
import pathlib
from typing import Any

from im_jax import hub, model_files
from im_jax.data.conversation import Conversation, DataError

# Heuristic thresholds distilled from the paper's findings, not values the paper states:
# IM's gain grows with the instruction/output length ratio, and it is largest in the
# low-resource regime (LIMA's 1k and AlpaGasus' 3k-9k examples all gained), where IM
# overfits less than IT. On large datasets with long outputs the gain shrinks to little or none.
HIGH_RATIO = 1.0  # instructions at least as long as outputs
SMALL_DATASET = 10_000  # examples


@dataclasses.dataclass(frozen=True)
class DatasetStats:
  examples: int
  messages: int
  assistant_turns: int
  multi_turn_examples: int  # examples with more than one assistant turn
  mean_instruction_words: float
  mean_output_words: float
  length_ratio: float | None  # None when no example has an output word
  mean_instruction_tokens: float | None = None  # None without a tokenizer
  mean_output_tokens: float | None = None
  recommendation: str = ""  # "im" or "it"
  reason: str = ""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _words(text: str) -> int:
  return len(text.split())


def compute_stats(conversations: Sequence[Conversation], tokenizer: Any = None) -> DatasetStats:
  """Statistics of `conversations`; `tokenizer` is an optional HF tokenizer (callable)."""
  n = len(conversations)
  if n == 0:
    raise ValueError("no conversations")
  instruction_words = output_words = messages = assistant_turns = multi_turn = 0
  for conversation in conversations:
    turns = 0
    for m in conversation.messages:
      if m.role == "assistant":
        output_words += _words(m.content)
        turns += 1
      else:
        instruction_words += _words(m.content)
    messages += len(conversation.messages)
    assistant_turns += turns
    multi_turn += turns > 1
  mean_instruction, mean_output = instruction_words / n, output_words / n
  ratio = mean_instruction / mean_output if mean_output else None

  mean_instruction_tokens = mean_output_tokens = None
  if tokenizer is not None:
    mean_instruction_tokens, mean_output_tokens = _mean_tokens(conversations, tokenizer)
  recommendation, reason = recommend(n, ratio)
  return DatasetStats(
      examples=n, messages=messages, assistant_turns=assistant_turns,
      multi_turn_examples=multi_turn, mean_instruction_words=mean_instruction,
      mean_output_words=mean_output, length_ratio=ratio,
      mean_instruction_tokens=mean_instruction_tokens, mean_output_tokens=mean_output_tokens,
      recommendation=recommendation, reason=reason)


def _mean_tokens(conversations: Sequence[Conversation], tokenizer: Any) -> tuple[float, float]:
  texts = [m.content for c in conversations for m in c.messages]
  is_output = [m.role == "assistant" for c in conversations for m in c.messages]
  ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # one batched (Rust) call
  output = sum(len(t) for t, out in zip(ids, is_output) if out)
  instruction = sum(len(t) for t in ids) - output
  n = len(conversations)
  return instruction / n, output / n


def recommend(examples: int, length_ratio: float | None) -> tuple[str, str]:
  """("im" | "it", the reason in a sentence), from the heuristic thresholds above."""
  long_instructions = length_ratio is None or length_ratio >= HIGH_RATIO
  small = examples <= SMALL_DATASET
  compare = ">=" if long_instructions else "<"
  ratio = ("no example has output words" if length_ratio is None
           else f"length ratio {length_ratio:.2f} {compare} {HIGH_RATIO}")
  if long_instructions and small:
    return "im", (f"instructions are long relative to outputs ({ratio}) and the dataset is "
                  f"small ({examples} <= {SMALL_DATASET} examples): the paper found IM's "
                  "largest gains in exactly this regime.")
  if long_instructions:
    return "im", (f"instructions are long relative to outputs ({ratio}): the paper found "
                  "IM's gain grows with this ratio.")
  if small:
    return "im", (f"the dataset is small ({examples} <= {SMALL_DATASET} examples, like LIMA's "
                  "1k): the paper found IM overfits less than IT in this low-resource regime, "
                  f"even with short instructions ({ratio}).")
  return "it", (f"the dataset is large ({examples} > {SMALL_DATASET} examples) and outputs "
                f"are longer than instructions ({ratio}): the paper found little or no gain "
                "from IM there, so plain IT is the safe default.")


# The files a transformers tokenizer folder holds; a folder with none is not one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str) -> Any:
  """A HF tokenizer from a local folder or `hf:DIR|ORG/NAME` (see `im_jax.hub`): the one loader
  of every command. DataError `PATH: cannot load a tokenizer: why` when there is none."""
  if str(path).startswith(hub.PREFIX):
    try:
      path = str(hub.folder(str(path)))
    except hub.HubError as e:
      raise DataError(str(path), None, f"cannot load a tokenizer: {e}") from None

  if not pathlib.Path(path).is_dir():  # else transformers reads it as a hub name: a confusing error
    raise DataError(str(path), None, "cannot load a tokenizer: no such folder")
  if not any((pathlib.Path(path) / f).exists() for f in _TOKENIZER_FILES):
    raise DataError(str(path), None, "cannot load a tokenizer: no tokenizer files "
                    f"({', '.join(_TOKENIZER_FILES)}) in the folder")
  try:  # a cut or empty JSON file, named (the tokenizers library names no file)
    model_files.check_tokenizer_files(path)
  except model_files.ModelFileError as e:
    raise DataError(e.path, None, f"cannot load a tokenizer: {e.problem}") from None
  # Imported after the checks: slow (~1 s), and a bad folder needs none of it.
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions on damaged files
    reason = " ".join(str(e).split())
    if not isinstance(e, (OSError, ValueError)):  # a KeyError's message is just the key
      reason = f"{type(e).__name__}: {reason}"
    raise DataError(str(path), None, f"cannot load a tokenizer: {reason}") from None
