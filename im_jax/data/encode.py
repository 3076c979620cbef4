"""Encode one conversation into a shifted training example (before packing).

conversation -> template (ids, kinds) -> loss weights -> truncate or drop -> shift.

The shifted example has four aligned arrays of length n - 1 (n = kept tokens):
`tokens` (model input), `targets` (next token), `loss_weights` (weight of predicting
`targets[i]`, i.e. the weight of token i + 1), `target_kinds` (kind of `targets[i]`).

Truncation keeps at most `max_seq_len` tokens (the paper: 2048 tokens, right truncation),
so a shifted example has at most `max_seq_len - 1` positions and always fits a row.

Drop rules (counted by reason in `EncodeStats`):
- `no_output` (default except under `im_release`): drop when no token IT would train on
  (assistant content or an assistant-closing EOS, of the last turn under `assistant_turns=last`)
  survives as a target. The rule does not depend on the loss mode, so IT and IM runs train on
  the same examples.
  An empty assistant reply keeps its EOS, so it is kept.
- `no_weight` (the paper's code; the default under `im_release`): drop only when no target
  carries weight. The release keeps an example with any label, and its first label is never
  a target, so the rules agree but for an example whose only label is its first token.
"""

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from im_jax.data import kinds as kinds_lib
from im_jax.data import release
from im_jax.data import templates
from im_jax.data import weights as weights_lib
from im_jax.data.conversation import Conversation

TRUNCATION = ("right", "drop")
DROP_RULES = ("no_output", "no_weight")
FIELDS = ("tokens", "targets", "loss_weights", "target_kinds")
FIELD_DTYPES = {"tokens": np.int32, "targets": np.int32, "loss_weights": np.float32,
                "target_kinds": kinds_lib.KIND_DTYPE}


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
  template: templates.TemplateConfig = dataclasses.field(default_factory=templates.TemplateConfig)
  loss: weights_lib.LossMaskConfig = dataclasses.field(
      default_factory=weights_lib.LossMaskConfig)
  max_seq_len: int = 2048
  truncation: str = "right"  # right | drop (drop over-long examples)
  # no_output | no_weight (the paper's); None: no_weight under im_release, else no_output
  drop_rule: str | None = None

  def __post_init__(self):
    if self.drop_rule is None:
      object.__setattr__(self, "drop_rule",
                         "no_weight" if self.loss.mode == "im_release" else "no_output")
    if self.truncation not in TRUNCATION:
      raise ValueError(f"truncation must be one of {TRUNCATION}, got {self.truncation!r}")
    if self.drop_rule not in DROP_RULES:
      raise ValueError(f"drop_rule must be one of {DROP_RULES}, got {self.drop_rule!r}")
    if self.max_seq_len < 2:
      raise ValueError("max_seq_len must be >= 2")
    self.loss.check_template(self.template.name, self.template.strips)


@dataclasses.dataclass
class EncodeStats:
  """What encoding did to a dataset: kept, dropped (by reason), truncated."""

  examples: int = 0
  kept: int = 0
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  truncated_examples: int = 0
  truncated_tokens: int = 0  # tokens cut from kept and dropped examples alike
  kept_tokens: int = 0  # shifted positions of kept examples

  def add(self, other: "EncodeStats") -> None:
    self.examples += other.examples
    self.kept += other.kept
    self.dropped.update(other.dropped)
    self.truncated_examples += other.truncated_examples
    self.truncated_tokens += other.truncated_tokens
    self.kept_tokens += other.kept_tokens

  def as_dict(self) -> dict[str, Any]:
    return {"examples": self.examples, "kept": self.kept, "dropped": dict(self.dropped),
            "truncated_examples": self.truncated_examples,
            "truncated_tokens": self.truncated_tokens, "kept_tokens": self.kept_tokens}


@dataclasses.dataclass(frozen=True)
class Encoded:
  """Unshifted per-token view (for previews and tests) plus the shifted example or a drop."""

  tokenized: templates.TokenizedConversation
  # float32 [n]; tokens past max_seq_len weighted as if kept (im_release matches its patterns
  # on the kept ids, as the release does, so a header cut in two is not masked)
  token_weights: np.ndarray
  example: dict[str, np.ndarray] | None  # the shifted example, None when dropped
  drop_reason: str | None
  truncated_tokens: int


class Encoder:
  """Conversation -> shifted example, for one tokenizer and `EncodeConfig`."""

  def __init__(self, tokenizer: Any, config: EncodeConfig):
    self.config = config
    self.template = templates.ChatTemplate(tokenizer, config.template)
    self._release_patterns = (release.header_patterns(tokenizer)
                              if config.loss.mode == "im_release" else None)

  def encode_full(self, conversation: Conversation) -> Encoded:
    return self._encoded(self.template.tokenize(conversation))

  def encode_full_many(self, conversations: Sequence[Conversation]) -> list[Encoded]:
    """`encode_full` of each, tokenized in one batched call (`ChatTemplate.tokenize_many`)."""
    return [self._encoded(t) for t in self.template.tokenize_many(conversations)]

  def _encoded(self, tokenized: templates.TokenizedConversation) -> Encoded:
    cfg = self.config
    n = len(tokenized)
    cut = max(0, n - cfg.max_seq_len)
    masked = None
    if self._release_patterns is not None:
      ids, kept = tokenized.ids, n - cut
      masked = np.concatenate([release.masked_positions(ids[:kept], self._release_patterns),
                               release.masked_positions(ids, self._release_patterns)[kept:]])
    weights = weights_lib.token_weights(tokenized.kinds, tokenized.message_index, cfg.loss,
                                        masked)

    def result(example, reason):
      return Encoded(tokenized, weights, example, reason, cut)

    if cut and cfg.truncation == "drop":
      return Encoded(tokenized, weights, None, "too_long", 0)
    keep = n - cut
    if keep < 2:
      return result(None, "too_short")
    if cfg.drop_rule == "no_output":
      output = weights_lib.output_mask(tokenized.kinds, tokenized.message_index,
                                       cfg.loss.assistant_turns)
      if not output[1:keep].any():
        return result(None, "no_output")
    elif not weights[1:keep].any():
      return result(None, "no_weight")
    ids = tokenized.ids[:keep]
    example = {"tokens": ids[:-1], "targets": ids[1:], "loss_weights": weights[1:keep],
               "target_kinds": tokenized.kinds[1:keep]}
    return result({k: np.ascontiguousarray(v, FIELD_DTYPES[k]) for k, v in example.items()}, None)

  def encode(self, conversation: Conversation,
             stats: EncodeStats | None = None) -> dict[str, np.ndarray] | None:
    """The shifted example, or None when dropped; counts into `stats` when given."""
    encoded = self.encode_full(conversation)
    if stats is not None:
      stats.examples += 1
      stats.truncated_tokens += encoded.truncated_tokens
      stats.truncated_examples += int(encoded.truncated_tokens > 0)
      if encoded.example is None:
        stats.dropped[encoded.drop_reason] += 1
      else:
        stats.kept += 1
        stats.kept_tokens += len(encoded.example["tokens"])
    return encoded.example
