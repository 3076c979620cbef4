"""Loss modes: rules from token kinds to float32 per-token loss weights.

- `it` (instruction tuning): assistant content and the EOS closing each assistant turn.
- `im` (instruction modelling, paper Eq. 4): system, user and assistant content plus assistant
  EOS; template tokens and BOS carry nothing. `instruction_weight` scales system/user tokens,
  so `im` with `instruction_weight=0` equals `it` exactly.
- `im_release` (compatibility, `tulu` only): the authors' released algorithm: every token
  carries weight except where the token-id patterns of their masked role headers match
  (`release.py`: with a BOS-adding tokenizer only BOS and the first header, without one every
  system and user header); assistant headers, newlines and EOS carry loss.
- `assistant_turns`: `all` assistant turns carry weight, or only the `last` (`it`/`im`).

Weights here are per *token*; `encode.py` shifts them onto targets.
"""

import dataclasses
import math

import numpy as np

from im_jax.data.kinds import TokenKind

LOSS_MODES = ("it", "im", "im_release")
ASSISTANT_TURNS = ("all", "last")


@dataclasses.dataclass(frozen=True)
class LossMaskConfig:
  mode: str = "it"  # it | im | im_release
  instruction_weight: float = 1.0  # im only: weight of system and user content tokens
  assistant_turns: str = "all"  # all | last

  def __post_init__(self):
    if self.mode not in LOSS_MODES:
      raise ValueError(f"mode: loss mode must be one of {LOSS_MODES}, got {self.mode!r}")
    if self.assistant_turns not in ASSISTANT_TURNS:
      raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, "
                       f"got {self.assistant_turns!r}")
    if self.instruction_weight != 1.0 and self.mode != "im":
      raise ValueError(f"instruction_weight applies to the im loss mode only, not {self.mode!r}")
    if not math.isfinite(self.instruction_weight) or self.instruction_weight < 0:
      raise ValueError(f"instruction_weight must be finite and >= 0, got {self.instruction_weight}")
    if self.mode == "im_release" and self.assistant_turns != "all":
      raise ValueError("assistant_turns must be 'all' under im_release, which weights every turn")

  def check_template(self, template_name: str, strips_content: bool) -> None:
    if self.mode == "im_release" and template_name != "tulu":
      raise ValueError("mode im_release reproduces the authors' tulu code; "
                       f"it needs the tulu template, not {template_name!r}")
    if self.mode == "im_release" and not strips_content:
      raise ValueError("mode im_release reproduces the authors' code, which strips "
                       "message content: it needs strip_content")


def output_mask(kinds: np.ndarray, message_index: np.ndarray, assistant_turns: str) -> np.ndarray:
  """Tokens IT trains on: assistant content and assistant EOS (of the last turn if asked)."""
  mask = (kinds == TokenKind.ASSISTANT) | (kinds == TokenKind.EOS)
  if assistant_turns == "last" and mask.any():
    mask &= message_index == message_index[mask].max()
  return mask


def token_weights(kinds: np.ndarray, message_index: np.ndarray, config: LossMaskConfig,
                  release_masked: np.ndarray | None = None) -> np.ndarray:
  """Float32 loss weight of each token (of predicting it), from its kind.

  `im_release` needs `release_masked` (`release.masked_positions`): it weighs every other token.
  """
  if config.mode == "im_release":
    if release_masked is None:
      raise ValueError("im_release weights need the release's masked positions")
    return (~np.asarray(release_masked, bool)).astype(np.float32)
  weights = output_mask(kinds, message_index, config.assistant_turns).astype(np.float32)
  if config.mode == "im":
    instruction = (kinds == TokenKind.SYSTEM) | (kinds == TokenKind.USER)
    weights[instruction] = np.float32(config.instruction_weight)
  return weights
