"""`python -m im_jax.train ... --dry-run`: a run's data plan, without running it.

Validates the config and inputs like a run, reads and encodes the data, plans the batches
and reports what training would do, then stops: nothing is compiled, no weights are read, the
workdir is neither locked nor written (a synthetic tokenizer is trained in a temporary
folder unless the workdir already holds one). The memory plan of the same run is another
command: `python -m im_jax.plan`.
"""

import pathlib
import tempfile
from typing import Any

import jax

from im_jax import paths
from im_jax.run import experiment, run_data
from im_jax.checkpoint.store import newest_meta
from im_jax.convert.load import read_pretrained
from im_jax.models.llama import config as llama_config
from im_jax.run.settings import SYNTHETIC, ConfigError, RunConfig, check_inputs, model_options


def data_plan(c: RunConfig, workdir: str | pathlib.Path) -> dict[str, Any]:
  """What a run with this config (validated: `settings.validate`) and workdir would train on,
  as one JSON-able dict."""
  workdir = paths.path(workdir)  # a local folder or gs://BUCKET/...
  check_inputs(c, workdir)
  experiment.check_resumable(c, workdir)  # reads only
  pretrained_config = pretrained_tokenizer = None
  if c.model.init_from:
    try:
      pretrained_config, pretrained_tokenizer = read_pretrained(  # gs://: the run's local copy
          paths.fetch(c.model.init_from, what="model.init_from"), **model_options(c))
    except (OSError, ValueError, KeyError) as e:
      raise ConfigError(f"model.init_from={c.model.init_from}: {e}") from None
  reuse = (workdir / "tokenizer" / "tokenizer.json").exists()  # a synthetic one, kept on resume
  with tempfile.TemporaryDirectory(prefix="im_jax_dry_run_") as scratch:
    data = run_data.build_data(c, workdir if reuse else pathlib.Path(scratch),
                               pretrained_tokenizer, cache_dir=run_data.plan_cache_dir(workdir),
                               write_cache=False)  # reads the plan cache, writes nothing
  run_data.check_data_position(workdir, data.train)
  tokenizer = str(data.tokenizer_dir)
  if c.data.tokenizer == SYNTHETIC and not reuse:
    tokenizer = "synthetic (a BPE trained on the data, written to the workdir by the run)"
  mcfg = experiment.model_config(c, data.vocab_size, pretrained_config)
  train = data.train
  stats = train.stats
  rows = train.rows_per_epoch * jax.process_count()  # every process pads to the same count
  # One epoch's real tokens, every process's shard (a mixture's epochs differ: their mean).
  epochs = train.config.num_epochs
  real_tokens = sum(int(train.example_lengths[train.epoch_ids(e)].sum())
                    for e in range(epochs)) / epochs
  newest = newest_meta(workdir)
  outputs = {name: str(workdir / name) for name in (
      "config.json", "metrics.jsonl", "tensorboard", "checkpoints")}
  if c.export_hf:
    outputs["hf"] = str(workdir / "hf")
  if c.log.wandb_project:
    outputs["wandb"] = f"{workdir / 'wandb'} (W&B project {c.log.wandb_project})"
  return {
      "data": c.data.train,
      "examples": stats.examples + data.held_out_examples,
      "held_out": data.held_out_examples,
      "kept": stats.kept,
      "dropped": dict(stats.dropped),
      "truncated": stats.truncated_examples,
      "truncated_tokens": stats.truncated_tokens,
      "tokenizer": tokenizer,
      "rows_per_epoch": rows,
      "row_length": train.row_length,
      "non_padding_fraction": real_tokens / (rows * train.row_length),
      "steps_per_epoch": train.steps_per_epoch,
      "total_steps": data.total_steps,
      "updates": data.updates,
      "epochs": train.config.num_epochs,
      "token_positions_per_step": c.train.batch_size * train.row_length,
      "tokens_per_step": real_tokens / train.steps_per_epoch,  # non-padding, on average
      "model": c.model.init_from or c.model.preset,
      "parameters": llama_config.num_params(mcfg),
      "workdir": str(workdir),
      "resumes_from_step": newest[0] if newest is not None else None,
      "outputs": outputs,
      "sources": data.sources,  # a mixture: per source (mixture.source_table), else None
      "mixture": data.mixture.describe() if data.mixture is not None else None,
  }


def format_plan(plan: dict[str, Any]) -> str:
  """The plan as the lines `--dry-run` prints."""
  dropped = ", ".join(f"{n} {why}" for why, n in plan["dropped"].items()) or "none"
  resume = ("a new run" if plan["resumes_from_step"] is None
            else f"resumes from step {plan['resumes_from_step']}")
  lines = [
      f"data: {plan['data']}: {plan['examples']} examples, {plan['held_out']} held out for "
      f"eval; {plan['kept']} kept for training, dropped: {dropped}; {plan['truncated']} "
      f"truncated ({plan['truncated_tokens']} tokens cut)",
      *[_source_line(s) for s in plan["sources"] or ()],
      *([plan["mixture"]] if plan["mixture"] else []),
      f"rows: {plan['rows_per_epoch']} per epoch of {plan['row_length']} tokens, "
      f"{plan['non_padding_fraction']:.1%} not padding",
      f"steps: {plan['steps_per_epoch']} per epoch, {plan['total_steps']} in all "
      f"({plan['epochs']} epoch(s); {plan['updates']} optimizer updates); {plan['tokens_per_step']:,.0f} tokens per step on average "
      f"(of {plan['token_positions_per_step']:,} positions)",
      f"model: {plan['model']}, {plan['parameters']:,} parameters; tokenizer "
      f"{plan['tokenizer']}",
      f"outputs: {plan['workdir']} ({resume}): " + ", ".join(plan["outputs"].values()),
      "dry run: nothing compiled or written; the memory plan is python -m im_jax.plan",
  ]
  return "\n".join(lines)


def _source_line(s: dict[str, Any]) -> str:
  """One source of a mixture: what it holds and its realised share of the run's epochs."""
  dropped = ", ".join(f"{n} {why}" for why, n in s["dropped"].items()) or "none"
  overrides = "".join(f", {k} {s[k]}" for k in ("format", "template") if s[k])
  return (f"  source {s['name']} ({s['source']}, weight {s['weight']:g}{overrides}): "
          f"{s['examples'] + s['held_out']} examples, {s['held_out']} held out; {s['kept']} "
          f"kept ({s['kept_tokens']:,} tokens), dropped: {dropped}; "
          f"{s['truncated_examples']} truncated ({s['truncated_tokens']} tokens cut); share of "
          f"the run's examples {s['example_share']:.1%}, of its tokens {s['token_share']:.1%}")
