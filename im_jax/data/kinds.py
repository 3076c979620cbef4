"""Token kinds: the one place the `target_kinds` enum is defined.

Every token of a rendered conversation gets one kind. Loss modes are rules over kinds
(see `weights.py`), and training reports metrics per kind group, so IT and IM runs can be
compared on the same footing whatever their loss weights are.
"""

import enum

import numpy as np


class TokenKind(enum.IntEnum):
  """Kind of a token; stored as int8 in `target_kinds`. 0 is padding."""

  PAD = 0
  BOS = 1
  TEMPLATE = 2  # text the chat template adds: role headers, separators, injected prompts
  SYSTEM = 3
  USER = 4
  ASSISTANT = 5
  EOS = 6  # the end-of-turn token closing an assistant turn (what the model learns to stop on)


KIND_DTYPE = np.int8

# Role of a message -> kind of its content tokens.
ROLE_KINDS = {
    "system": TokenKind.SYSTEM,
    "user": TokenKind.USER,
    "assistant": TokenKind.ASSISTANT,
}

# Metric groups: the paper's held-out measure is the loss on output tokens.
OUTPUT_KINDS = (TokenKind.ASSISTANT, TokenKind.EOS)
INSTRUCTION_KINDS = (TokenKind.SYSTEM, TokenKind.USER)


def kind_name(kind: int) -> str:
  return TokenKind(int(kind)).name.lower()
