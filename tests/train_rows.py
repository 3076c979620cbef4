"""Synthetic examples and packed rows obeying the row contract (docs/design.md), for train tests.

Independent of the data pipeline: each example is already shifted (tokens/targets aligned),
with target kinds laid out like a rendered chat (template, system, user, template, assistant,
eos), and weights built from kinds: output tokens 1, instruction tokens `instruction_weight`,
template/bos 0.
"""

import dataclasses

import numpy as np

from im_jax.data.kinds import INSTRUCTION_KINDS, OUTPUT_KINDS, TokenKind

FIELDS = ("tokens", "targets", "loss_weights", "target_kinds", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Example:
  tokens: np.ndarray  # int32 [L]
  targets: np.ndarray  # int32 [L]
  target_kinds: np.ndarray  # int8 [L]

  def weights(self, instruction_weight: float) -> np.ndarray:
    kinds = self.target_kinds
    out = np.isin(kinds, [int(k) for k in OUTPUT_KINDS])
    inst = np.isin(kinds, [int(k) for k in INSTRUCTION_KINDS])
    return (out + instruction_weight * inst).astype(np.float32)


def make_examples(seed: int, n: int, vocab: int, min_len: int = 6,
                  max_len: int = 24) -> list[Example]:
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(n):
    length = int(rng.integers(min_len, max_len + 1))
    seq = rng.integers(3, vocab, size=length + 1).astype(np.int32)
    # Kinds of targets: header, system?, user..., header, assistant..., eos.
    n_out = int(rng.integers(1, max(2, length // 3)))
    n_inst = length - n_out - 3
    kinds = ([TokenKind.TEMPLATE] + [TokenKind.SYSTEM] * (n_inst // 3)
             + [TokenKind.USER] * (n_inst - n_inst // 3) + [TokenKind.TEMPLATE] * 2
             + [TokenKind.ASSISTANT] * (n_out - 1) + [TokenKind.EOS])
    assert len(kinds) == length, (len(kinds), length)
    examples.append(Example(seq[:-1], seq[1:], np.asarray(kinds, np.int8)))
  return examples


def pack(examples: list[Example], rows: int, length: int, *, instruction_weight: float = 1.0,
         per_row: int | None = None) -> dict[str, np.ndarray]:
  """Greedy in-order packing into `rows` rows of `length` (a new row when one is full, or
  after `per_row` examples). Raises if they do not fit."""
  batch = {
      "tokens": np.zeros((rows, length), np.int32),
      "targets": np.zeros((rows, length), np.int32),
      "loss_weights": np.zeros((rows, length), np.float32),
      "target_kinds": np.zeros((rows, length), np.int8),
      "segment_ids": np.zeros((rows, length), np.int32),
      "positions": np.zeros((rows, length), np.int32),
  }
  row, col, seg = 0, 0, 0
  for ex in examples:
    n = len(ex.tokens)
    if col + n > length or (per_row is not None and seg == per_row):
      row, col, seg = row + 1, 0, 0
    if row >= rows or n > length:
      raise ValueError("examples do not fit")
    seg += 1
    sl = slice(col, col + n)
    batch["tokens"][row, sl] = ex.tokens
    batch["targets"][row, sl] = ex.targets
    batch["loss_weights"][row, sl] = ex.weights(instruction_weight)
    batch["target_kinds"][row, sl] = ex.target_kinds
    batch["segment_ids"][row, sl] = seg
    batch["positions"][row, sl] = np.arange(n)
    col += n
  return batch


def unpacked(examples: list[Example], length: int, **kw) -> dict[str, np.ndarray]:
  """One example per row."""
  return pack(examples, len(examples), length, per_row=1, **kw)
