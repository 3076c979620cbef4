"""Per-example measures of a model: the paper's held-out loss and memorisation scores.

`example_losses` gives each example's mean cross-entropy over its output tokens (assistant
content and EOS) and over its instruction tokens: the mean of the first list is
`python -m im_jax.eval loss`'s `output_loss_per_example` (the paper's held-out measure,
tested equal), and keeping the examples apart lets the study pair IT and IM example by
example. Examples are encoded exactly as training and `eval loss` encode them (same
template, right truncation); one example per row, so no packing question arises.

`memorisation` generates greedily (`eval.generate`) from training prompts and scores each
generation against that example's training output with sacrebleu's BLEU and rouge-score's
ROUGE-L; the reference is cut to the generation budget (`max_new_tokens` tokens) so a long
LIMA answer is not a brevity penalty for both methods alike.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from im_jax.data import encode as encode_lib
from im_jax.data import templates
from im_jax.data import weights as weights_lib
from im_jax.data.conversation import Conversation
from im_jax.data.kinds import INSTRUCTION_KINDS, OUTPUT_KINDS
from im_jax.eval import generate as generate_lib
from im_jax.train import loss as loss_lib


@dataclasses.dataclass(frozen=True)
class ModelUnderTest:
  """A loaded model with the rendering its training used."""
  model: Any  # im_jax Llama
  tokenizer: Any
  template: str
  strip_content: bool | None


def _group_sums(kinds: jax.Array, ce: jax.Array, real: jax.Array, group) -> tuple:
  mask = jnp.zeros(kinds.shape, bool)
  for kind in group:
    mask = mask | (kinds == int(kind))
  mask = mask & real
  return jnp.sum(jnp.where(mask, ce, 0.0), axis=-1), jnp.sum(mask, axis=-1)


def example_losses(mut: ModelUnderTest, conversations: Sequence[Conversation],
                   max_seq_len: int, batch_size: int = 8, chunk_size: int = 512
                   ) -> dict[str, list[float | None]]:
  """{"output": [...], "instruction": [...]}: each example's mean CE over those tokens, in
  the order given; None where the example has no such token (or was dropped)."""
  encoder = encode_lib.Encoder(mut.tokenizer, encode_lib.EncodeConfig(
      template=templates.TemplateConfig(mut.template, strip_content=mut.strip_content),
      loss=weights_lib.LossMaskConfig("it"), max_seq_len=max_seq_len))
  examples = [encoder.encode(c) for c in conversations]
  # Shortest first, each batch padded to a power of two over its longest: a batch of short
  # examples does not pay for the longest one (few shapes, so few compilations).
  kept = sorted((i for i, e in enumerate(examples) if e is not None),
                key=lambda i: len(examples[i]["tokens"]))
  graphdef, state = nnx.split(mut.model)

  @jax.jit
  def sums(state, tokens, targets, kinds, segments):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden = model.hidden_states(model.embed(tokens), positions, segments)
    ce = loss_lib.chunked_cross_entropy(hidden, model.output_embedding(), targets, chunk_size)
    real = segments > 0
    return (_group_sums(kinds, ce, real, OUTPUT_KINDS),
            _group_sums(kinds, ce, real, INSTRUCTION_KINDS))

  out: dict[str, list[float | None]] = {"output": [None] * len(examples),
                                        "instruction": [None] * len(examples)}
  for start in range(0, len(kept), batch_size):
    rows = kept[start:start + batch_size]
    length = 64
    while length < len(examples[rows[-1]]["tokens"]):
      length *= 2
    arrays = {k: np.zeros((batch_size, length), np.int32)
              for k in ("tokens", "targets", "kinds", "segments")}
    for r, i in enumerate(rows):
      e, n = examples[i], len(examples[i]["tokens"])
      arrays["tokens"][r, :n] = e["tokens"]
      arrays["targets"][r, :n] = e["targets"]
      arrays["kinds"][r, :n] = e["target_kinds"]
      arrays["segments"][r, :n] = 1
    (o_sum, o_n), (i_sum, i_n) = jax.device_get(sums(
        state, arrays["tokens"], arrays["targets"], arrays["kinds"], arrays["segments"]))
    for r, i in enumerate(rows):
      out["output"][i] = float(o_sum[r] / o_n[r]) if o_n[r] else None
      out["instruction"][i] = float(i_sum[r] / i_n[r]) if i_n[r] else None
  return out


def mean(values: Sequence[float | None]) -> float | None:
  present = [v for v in values if v is not None]
  return sum(present) / len(present) if present else None


def _reference(conversation: Conversation, tokenizer: Any, max_new_tokens: int) -> str:
  """The training output the prompt was trained to produce, cut to the generation budget."""
  output = [m.content for m in conversation.messages if m.role == "assistant"][-1]
  ids = tokenizer.encode(output.strip(), add_special_tokens=False)[:max_new_tokens]
  return tokenizer.decode(ids, skip_special_tokens=True).strip()


def memorisation(mut: ModelUnderTest, conversations: Sequence[Conversation],
                 max_new_tokens: int, batch_size: int = 8) -> dict[str, Any]:
  """Greedy generations on training prompts vs their training outputs."""
  import sacrebleu  # pylint: disable=g-import-not-at-top  (the study's own dependencies)
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top

  config = generate_lib.GenerateConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
  records = generate_lib.generate_records(conversations, mut.model, mut.tokenizer, mut.template,
                                          config, "study", strip_content=mut.strip_content)
  hypotheses = [r["output"] for r in records]
  references = [_reference(c, mut.tokenizer, max_new_tokens) for c in conversations]
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  return {
      "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
      "bleu_per_example": [sacrebleu.sentence_bleu(h, [r]).score
                           for h, r in zip(hypotheses, references)],
      "rouge_l_per_example": [scorer.score(r, h)["rougeL"].fmeasure
                              for h, r in zip(hypotheses, references)],
      "generations": [{"instruction": rec["instruction"], "output": h, "reference": r}
                      for rec, h, r in zip(records, hypotheses, references)],
  }
