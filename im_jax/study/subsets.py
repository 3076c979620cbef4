"""The study's data: one fixed held-out set per dataset and the training subsets.

Each dataset's examples are put in a fixed order by a hash of their id (the same on every
machine, whatever the file order); the first `held_out` are the held-out set, shared by every
run, and every training subset is drawn from the rest, so none overlaps it. Size subsets are
prefixes of that order (nested: a larger set holds every smaller one). Length-ratio bands
take the examples with the lowest and the highest instruction/output word ratio from the
same pool, equally many, so only the ratio differs.
"""

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Sequence

from im_jax.configs import paper
from im_jax.data import sources
from im_jax.data.conversation import Conversation

DATASETS = tuple(paper.DATASETS)  # lima, dolly3k, alpaca5k


def _order_key(conversation: Conversation) -> bytes:
  key = conversation.id or json.dumps([[m.role, m.content] for m in conversation.messages])
  return hashlib.sha256(("im_jax.study:" + key).encode()).digest()


def words(conversation: Conversation) -> tuple[int, int]:
  """(instruction words, output words): the paper's length-ratio counts for one example."""
  instruction = sum(len(m.content.split()) for m in conversation.messages
                    if m.role != "assistant")
  output = sum(len(m.content.split()) for m in conversation.messages if m.role == "assistant")
  return instruction, output


def length_ratio(conversations: Sequence[Conversation]) -> float:
  """Mean instruction words / mean output words over a set (the paper's dataset ratio)."""
  counts = [words(c) for c in conversations]
  outputs = sum(o for _, o in counts)
  return sum(i for i, _ in counts) / outputs if outputs else float("inf")


@dataclasses.dataclass(frozen=True)
class DatasetSplit:
  name: str
  held_out: list[Conversation]
  pool: list[Conversation]  # candidates for training subsets, in the fixed order


def load_split(name: str, held_out: int, data_dir: pathlib.Path | None = None) -> DatasetSplit:
  path = (data_dir or paper.SHARED_DATA) / paper.DATASETS[name]
  # Every training example needs an output to compare IT and IM on (Alpaca 5k has 4 empty).
  conversations = [c for c in sources.load_conversations(str(path))
                   if any(m.role == "assistant" and m.content.strip() for m in c.messages)]
  ordered = sorted(conversations, key=_order_key)
  if len(ordered) < 2 * held_out:
    raise ValueError(f"{path}: {len(ordered)} examples, too few for a held-out set of "
                     f"{held_out}")
  return DatasetSplit(name, ordered[:held_out], ordered[held_out:])


def first(split: DatasetSplit, n: int, offset: int = 0) -> list[Conversation]:
  """n examples of the pool from `offset` on (disjoint slices for disjoint subsets)."""
  if offset + n > len(split.pool):
    raise ValueError(f"{split.name}: examples {offset}-{offset + n - 1} asked, "
                     f"{len(split.pool)} available")
  return split.pool[offset:offset + n]


def ratio_bands(split: DatasetSplit, n: int, max_words: int) -> dict[str, list[Conversation]]:
  """{"low": the n examples of lowest ratio, "high": the n of highest}, disjoint, among the
  examples of at most `max_words` words, so truncation at the sequence length does not cut
  the outputs of long-context examples (and so change their ratio)."""
  pool = [c for c in split.pool if sum(words(c)) <= max_words]
  if 2 * n > len(pool):
    raise ValueError(f"{split.name}: two ratio bands of {n} need {2 * n} examples of at most "
                     f"{max_words} words, {len(pool)} available")

  def ratio(c: Conversation) -> float:
    instruction, output = words(c)
    return instruction / max(output, 1)

  ranked = sorted(pool, key=ratio)  # stable: ties keep the fixed order
  return {"low": ranked[:n], "high": ranked[-n:]}


def write_jsonl(path: pathlib.Path, conversations: Sequence[Conversation]) -> pathlib.Path:
  """Tulu "messages" JSONL, written once: an existing identical file is kept as it is."""
  lines = [json.dumps({"id": c.id, "messages": [{"role": m.role, "content": m.content}
                                                for m in c.messages]}, ensure_ascii=False)
           for c in conversations]
  text = "\n".join(lines) + "\n"
  if path.exists():
    if path.read_text(encoding="utf-8") != text:
      raise ValueError(f"{path} exists with other content: the study never overwrites its "
                       "data; use another --out")
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.partial")
  tmp.write_text(text, encoding="utf-8")
  tmp.replace(path)
  return path
