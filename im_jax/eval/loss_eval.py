"""The paper's held-out measure: the loss on output tokens, plus per-kind losses.

One loss function (`make_eval_loss_fn`) and one reduction (`finalize`) serve both
`python -m im_jax.eval loss` and the trainer's periodic eval on the held-out split
(`im_jax.run.experiment` builds its eval step from them; `train.loop.evaluate` sums the sums over
batches and calls `finalize` once). The cross-entropy and its reductions are `train.loss`'s;
this module only adds the reductions an evaluation reports:

- `loss_token_mean`: sum of w_t * CE_t over sum of w_t, with the weights of the chosen loss
  mode (for `it`: the mean CE over output tokens, assistant content and its EOS);
- `loss_sequence_mean`: each example's weighted mean, then the mean over examples (the
  paper's averaging);
- `loss_<kind>` / `tokens_<kind>`: unweighted mean CE and count per target kind present
  (bos, template, system, user, assistant, eos), independent of the loss mode;
- `output_loss`, `instruction_loss` and their token counts: `train.loss.finalize`, as train
  metrics report them (in training also `loss`, under the run's normalisation); for a mixture
  of several sources also `output_loss_per_example/NAME`, `instruction_loss_per_example/NAME`
  and their example counts, per source (`config.sources`).

In training the loss mode is the run's, so there `loss_token_mean` weighs instructions too
under `im`; `output_loss` is the paper's measure whatever the mode.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from im_jax.data import encode as encode_lib
from im_jax.data import pipeline as pipeline_lib
from im_jax.data import templates
from im_jax.data import weights as weights_lib
from im_jax.data.conversation import Conversation
from im_jax.data.kinds import TokenKind, kind_name
from im_jax.train import kl as kl_lib
from im_jax.train import loop as loop_lib
from im_jax.train import loss as loss_lib
from im_jax.train import sharding
from im_jax.train import step as step_lib

NUM_KINDS = len(TokenKind)
KINDS = tuple(k for k in TokenKind if k != TokenKind.PAD)


def kind_sums(ce: jax.Array, batch: loss_lib.Batch) -> loss_lib.LossSums:
  """Unweighted CE sums and token counts per target kind: two `[NUM_KINDS]` vectors."""
  real = batch["segment_ids"] > 0
  kinds = jnp.where(real, batch["target_kinds"].astype(jnp.int32), TokenKind.PAD)
  one_hot = jax.nn.one_hot(kinds, NUM_KINDS, dtype=jnp.float32)  # padding lands in slot 0
  return {"kind_ce_sum": jnp.einsum("btk,bt->k", one_hot, ce.astype(jnp.float32)),
          "kind_tokens": jnp.sum(one_hot, axis=(0, 1))}


def make_eval_loss_fn(config: loss_lib.LossConfig = loss_lib.LossConfig()) -> step_lib.LossFn:
  """A `step.LossFn` for evaluation: `train.loss` sums under `config.normalization` (the
  run's objective, with its KL term when `config.kl_to_base` > 0: then also `kl`), under
  both normalisations, per kind, and the number of examples."""

  def loss_fn(model: nnx.Module, batch: loss_lib.Batch, rng: jax.Array | None,
              reference: nnx.Module | None = None) -> loss_lib.LossSums:
    del rng  # evaluation: no NEFTune noise
    hidden = model.hidden_states(model.embed(batch["tokens"]), batch["positions"],
                                 batch["segment_ids"])
    if config.kl_to_base > 0:
      ce, kl = kl_lib.ce_and_kl(model, hidden, reference, batch, config)
      sums = loss_lib.loss_sums(ce, batch, config.normalization, kl, config.kl_to_base,
                                sources=config.sources, example_weights=config.example_weights)
    else:
      ce = loss_lib.chunked_cross_entropy(hidden, model.output_embedding(), batch["targets"],
                                          config.chunk_size)
      sums = loss_lib.loss_sums(ce, batch, config.normalization, sources=config.sources,
                                example_weights=config.example_weights)
    for norm in ("token", "sequence"):
      other = loss_lib.loss_sums(ce, batch, norm)
      sums[f"{norm}_numerator"] = other[loss_lib.NUMERATOR]
      sums[f"{norm}_denominator"] = other[loss_lib.DENOMINATOR]
    # Segments are numbered 1..n in each row, so a row's largest id counts its examples.
    sums["examples"] = jnp.sum(jnp.max(batch["segment_ids"], axis=-1)).astype(jnp.float32)
    sums.update(kind_sums(ce, batch))
    return sums

  return loss_fn


def finalize(sums: Mapping[str, Any]) -> dict[str, float]:
  """Summed eval sums (over batches) -> the reported means and counts, as floats."""
  metrics = step_lib.host_metrics(loss_lib.finalize(sums))
  host = jax.device_get(dict(sums))

  def ratio(num, den):
    return float(num) / float(den) if float(den) > 0 else 0.0

  metrics["loss_token_mean"] = ratio(host["token_numerator"], host["token_denominator"])
  metrics["loss_sequence_mean"] = ratio(host["sequence_numerator"],
                                        host["sequence_denominator"])
  metrics["loss_weight_sum"] = float(host["token_denominator"])  # output tokens under `it`
  metrics["examples"] = float(host["examples"])
  metrics["examples_with_loss"] = float(host["sequence_denominator"])
  ce, tokens = np.asarray(host["kind_ce_sum"]), np.asarray(host["kind_tokens"])
  for kind in KINDS:
    if tokens[kind] > 0:
      metrics[f"loss_{kind_name(kind)}"] = ratio(ce[kind], tokens[kind])
      metrics[f"tokens_{kind_name(kind)}"] = float(tokens[kind])
  return metrics


@dataclasses.dataclass(frozen=True)
class LossEvalConfig:
  template: str = "tulu"  # tulu | hf
  strip_content: bool | None = None  # templates.TemplateConfig: None = the template's default
  loss_mode: str = "it"  # it | im | im_release: which tokens the two loss means weigh
  max_seq_len: int = 2048  # right truncation, as in training
  batch_size: int = 8  # rows per batch; rounded up to a multiple of the devices
  packing: str = "best_fit"  # packing never changes the sums (segment-masked attention)
  chunk_size: int = 512  # loss.LossConfig.chunk_size: only [B, chunk, V] logits at a time


def evaluate_loss(model: nnx.Module, tokenizer: Any, conversations: Sequence[Conversation],
                  config: LossEvalConfig = LossEvalConfig(),
                  mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """The held-out losses of `model` on `conversations` (see the module docstring).

  `mesh` defaults to all devices on the fsdp axis; load the model with
  `sharding.sharding_fn(mesh)` so no parameter moves. Adds the encoder's counts
  (`examples_dropped`, `examples_truncated`).
  """
  mesh = mesh or sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=1))
  rows_axes = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = -(-config.batch_size // rows_axes) * rows_axes
  encode_config = encode_lib.EncodeConfig(
      template=templates.TemplateConfig(config.template, strip_content=config.strip_content),
      loss=weights_lib.LossMaskConfig(config.loss_mode), max_seq_len=config.max_seq_len)
  pipeline = pipeline_lib.build_pipeline(
      conversations, tokenizer, encode_config,
      pipeline_lib.PipelineConfig(batch_size=rows, packing=config.packing, shuffle=False,
                                  num_epochs=1, read_threads=0),
      shard_index=0, shard_count=1)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = step_lib.TrainState(
      step=replicated, params=sharding.state_shardings(params, mesh), opt_state=None,
      rest=sharding.state_shardings(rest, mesh), rng=replicated)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                              rest=rest, rng=jax.random.PRNGKey(0))
  loss_fn = make_eval_loss_fn(loss_lib.LossConfig("token", config.chunk_size))
  eval_step = step_lib.make_eval_step(graphdef, shardings, mesh, loss_fn)
  # The trainer's own evaluation loop (it prefixes keys with "eval_").
  result = loop_lib.evaluate(state, eval_step, iter(pipeline.dataset()), mesh,
                             finalize=finalize)
  # Under token normalisation `loss` is `loss_token_mean`; drop the duplicates.
  metrics = {k.removeprefix("eval_"): v for k, v in result.items()
             if k not in ("eval_loss", "eval_loss_denominator")}
  stats = pipeline.stats
  metrics["examples_dropped"] = float(sum(stats.dropped.values()))
  metrics["examples_truncated"] = float(stats.truncated_examples)
  return metrics
