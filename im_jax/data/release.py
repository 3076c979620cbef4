"""The authors' released IM masking (`im_release`): header id patterns matched on token ids.

Their finetune.py (an open-instruct fork) tokenizes the rendered example with the tokenizer's
own special tokens, truncates the ids to `max_seq_length`, copies them as labels and, for IM,
masks every window of ids equal to `tokenizer(text).input_ids` for each text of
`RELEASE_MASKED_TEXTS`. What that masks depends on the tokenizer, since the patterns are
tokenized alone, special tokens included:

- a tokenizer that adds a BOS (LLaMA-2): every pattern starts with BOS, so it can match only
  at position 0: BOS and the first role header are masked, every later header keeps its loss;
- a tokenizer that adds nothing (SmolLM2): every system and user header is masked; assistant
  headers, EOS and newlines keep their loss.

"wa\\n" is the release's literal (its assistant pattern, as written). With a BOS it never
matches; without one it masks the rare content where the ids of "wa" and "\\n" meet. We keep
it: `im_release` is the release's algorithm, not a fixed rule.

The match runs on the ids after truncation, as theirs does, so a header cut by
`max_seq_len` is not masked. This module knows token ids only; `encode.py` applies it.
"""

from typing import Any

import numpy as np

RELEASE_MASKED_TEXTS = ("wa\n", "<|system|>\n", "<|user|>\n")


def header_patterns(tokenizer: Any) -> tuple[np.ndarray, ...]:
  """The id pattern of each masked text, tokenized as the release does (special tokens on)."""
  return tuple(np.asarray(tokenizer(text)["input_ids"], np.int64)
               for text in RELEASE_MASKED_TEXTS)


def masked_positions(ids: np.ndarray, patterns: tuple[np.ndarray, ...]) -> np.ndarray:
  """Bool [n]: True inside every window of `ids` equal to one of `patterns`."""
  ids = np.asarray(ids, np.int64)
  marks = np.zeros(len(ids) + 1, np.int64)
  for pattern in patterns:
    width = len(pattern)
    if width == 0 or width > len(ids):
      continue
    windows = np.lib.stride_tricks.sliding_window_view(ids, width)
    starts = np.flatnonzero((windows == pattern).all(axis=1))
    np.add.at(marks, starts, 1)
    np.add.at(marks, starts + width, -1)
  return np.cumsum(marks)[:-1] > 0
