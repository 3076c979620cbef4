"""Trains and evaluates the study's runs, resumably, showing progress.

Each run is an ordinary training workdir (OUT/runs/NAME) built by the trainer itself
(`experiment.build(config, workdir).run()`); the only change is the held-out data of its
periodic evaluation: the study's fixed held-out set of the run's dataset, evaluated once per
epoch, so metrics.jsonl holds the paper's per-epoch curve. A run whose result file exists is
skipped; an interrupted one resumes from its workdir's newest checkpoint (the trainer's own
resume). Results hold measures only, never checkpoints.
"""

import dataclasses
import hashlib
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from im_jax import report, write_faults
from im_jax.run import experiment
from im_jax.convert.load import load_pretrained
from im_jax.data import pipeline as pipeline_lib
from im_jax.data import encode as encode_lib
from im_jax.data.conversation import Conversation
from im_jax.data.kinds import INSTRUCTION_KINDS
from im_jax.data.stats import load_tokenizer
from im_jax.run.settings import check_mesh, encode_config, model_options, pipeline_config
from im_jax.train import loop as loop_lib
from im_jax.study import evaluation, results, runs as runs_lib, scales, start_models, subsets


class StudyStopped(RuntimeError):
  """A run was stopped by SIGTERM after saving a checkpoint; the message is one line."""


def ids_digest(conversations: Sequence[Conversation]) -> str:
  return hashlib.sha256("\n".join(str(c.id) for c in conversations).encode()).hexdigest()[:16]


def digest(key: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def say(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Study:
  """Everything the runs share: where things go, the data, the starting model."""
  out: pathlib.Path
  scale: scales.Scale
  store: results.ResultStore
  splits: dict[str, subsets.DatasetSplit]
  start: start_models.Start

  def held_out_file(self, dataset: str) -> pathlib.Path:
    return subsets.write_jsonl(self.out / "data" / f"heldout_{dataset}.jsonl",
                               self.splits[dataset].held_out)

  def subset(self, run: runs_lib.Run) -> list[Conversation]:
    return runs_lib.subset_conversations(run.subset, self.splits[run.subset.dataset],
                                         self.max_seq_len())

  def max_seq_len(self) -> int:
    return self.scale.overrides.get("data.max_seq_len", 2048)

  def base_key(self) -> dict[str, Any]:
    return {"scale": self.scale.name, "model": self.start.description,
            "overrides": self.scale.overrides,
            "held_out": {d: ids_digest(s.held_out) for d, s in self.splits.items()}}

  def run_key(self, run: runs_lib.Run) -> dict[str, Any]:
    return {**self.base_key(), "method": run.method, "subset": run.subset.name,
            "seed": run.seed,
            "examples": ids_digest(self.subset(run)), "experiments": list(run.experiments)}

  def config(self, run: runs_lib.Run):
    conversations = self.subset(run)
    data = subsets.write_jsonl(self.out / "data" / f"{run.subset.name}.jsonl", conversations)
    c = runs_lib.config_for(run, self.scale, data, self.start.init_from, self.start.tokenizer)
    if run.method != runs_lib.INSTRUCTIONS_ONLY:
      return c
    kept, share = self.instruction_share(c, conversations)
    subsets.write_jsonl(runs_lib.instructions_file(data), runs_lib.instructions_only(kept))
    return runs_lib.config_for(run, self.scale, data, self.start.init_from, self.start.tokenizer,
                               instructions_weight=share)

  def instruction_share(self, c, conversations: Sequence[Conversation]
                        ) -> tuple[list[Conversation], float]:
    """(the examples training keeps, their mean share of instruction tokens in IM's loss):
    the control trains the kept examples' instructions only, each weighing that share of an
    example, so the instructions carry about the weight IM gives them (runs.config_for)."""
    tokenizer = load_tokenizer(c.data.tokenizer or c.model.init_from.removeprefix("hf:"))
    # the run's own encoding (settings.encode_config) under IM's loss mode, so a new encoding
    # option reaches both; the config's drop rule is no_output, as IT's and IM's runs
    im = dataclasses.replace(c, loss=dataclasses.replace(c.loss, mode="im"))
    encoder = encode_lib.Encoder(tokenizer, encode_config(im))
    kept, shares = [], []
    for conversation in conversations:
      example = encoder.encode(conversation)
      if example is None:
        continue
      weights, kinds = example["loss_weights"], example["target_kinds"]
      instruction = np.isin(kinds, [int(k) for k in INSTRUCTION_KINDS])
      kept.append(conversation)
      shares.append(float(weights[instruction].sum() / weights.sum()))
    return kept, float(np.mean(shares))


def eval_options(c) -> dict[str, Any]:
  """The run's model options, parameters held in its compute dtype: evaluation needs no
  float32 master weights (half the memory of a 7B model in bfloat16)."""
  return {**model_options(c), "param_dtype": c.model.compute_dtype}


def _mut_from_loaded(loaded) -> evaluation.ModelUnderTest:
  tokenizer = load_tokenizer(str(loaded.tokenizer_dir))
  template = loaded.info.get("template") or "tulu"
  return evaluation.ModelUnderTest(loaded.model, tokenizer, template,
                                   loaded.info.get("strip_content"))


def evaluate_model(study: Study, mut: evaluation.ModelUnderTest, datasets: Sequence[str],
                   train: Sequence[Conversation], max_seq_len: int) -> dict[str, Any]:
  batch = study.scale.overrides.get("eval.batch_size", 8)
  chunk = study.scale.overrides.get("loss.chunk_size", 512)
  out = {"held_out": {}}
  for dataset in datasets:
    losses = evaluation.example_losses(mut, study.splits[dataset].held_out, max_seq_len, batch,
                                       chunk)
    out["held_out"][dataset] = _with_means(losses)
  if train:
    losses = evaluation.example_losses(mut, train, max_seq_len, batch, chunk)
    out["train"] = _with_means(losses)
  return out


def baseline_name(dataset: str) -> str:
  return f"baseline_{dataset}"


def baseline(study: Study, datasets: Sequence[str]) -> None:
  """The untrained starting model on each held-out set and, for the overfitting datasets, on
  the first training examples of their subset: one result per dataset."""
  todo = []
  for dataset in datasets:
    train, prompts, key = baseline_work(study, dataset)
    if study.store.get(baseline_name(dataset), key) is None:
      todo.append((dataset, train, prompts, key))
  if not todo:
    say("baseline: done (from results)")
    return
  say("baseline: evaluating the untrained model")
  c = study.config(runs_lib.make_plan(study.scale)[0])
  if study.start.init_from:
    mut = _mut_from_loaded(load_pretrained(study.start.init_from, **eval_options(c)))
  else:  # the random init every tiny run starts from: the trainer's model with its seed
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from im_jax.models.llama import Llama  # pylint: disable=g-import-not-at-top
    tokenizer = load_tokenizer(study.start.tokenizer)
    mcfg = experiment.model_config(c, len(tokenizer))
    mut = evaluation.ModelUnderTest(Llama(mcfg, rngs=nnx.Rngs(c.train.seed)), tokenizer,
                                    c.data.template, c.data.strip_content)
  for dataset, train, prompts, key in todo:
    value = evaluate_model(study, mut, [dataset], train, c.data.max_seq_len)
    if prompts:
      value["memorisation"] = evaluation.memorisation(mut, prompts, study.scale.max_new_tokens)
    study.store.put(baseline_name(dataset), key, value)


def baseline_work(study: Study, dataset: str
                  ) -> tuple[list[Conversation], list[Conversation], dict[str, Any]]:
  """(training examples, memorisation prompts) the baseline of `dataset` is scored on, and
  its result's key."""
  train = _baseline_train(study, dataset)
  # The training examples it is scored on are part of the key: a change in how subsets
  # are drawn must not reuse a baseline scored on other examples.
  key = {**study.base_key(), "dataset": dataset, "train_examples": ids_digest(train)}
  prompts = _baseline_prompts(study, dataset)
  if prompts:  # the memorisation floor: the untrained model on the same prompts
    key["prompts"] = ids_digest(prompts)
  return train, prompts, key


def _baseline_train(study: Study, dataset: str) -> list[Conversation]:
  """The training examples the baseline is scored on: the first of the overfitting subset."""
  if study.scale.replicas:  # replica 0's first examples, as its runs' train scores
    return _replica0(study, dataset)[:study.scale.train_eval]
  if dataset not in runs_lib.OVERFIT_DATASETS:
    return []
  subset = runs_lib.overfit_subset(study.scale, dataset)
  train = runs_lib.subset_conversations(subset, study.splits[dataset], study.max_seq_len())
  return train[:study.scale.train_eval]


def _replica0(study: Study, dataset: str) -> list[Conversation]:
  """The examples of the replicated design's replica 0 (none for another dataset)."""
  if dataset != runs_lib.REPLICATED_DATASET:
    return []
  return study.subset(runs_lib.replicated_plan(study.scale)[0])


def memorisation_prompts(study: Study, run: runs_lib.Run) -> list[Conversation]:
  return study.subset(run)[:study.scale.generations]


def _baseline_prompts(study: Study, dataset: str) -> list[Conversation]:
  """The replicated design's memorisation prompts, every memorisation replica's in turn."""
  if not study.scale.replicas or dataset != runs_lib.REPLICATED_DATASET:
    return []
  return [c for run in runs_lib.replicated_plan(study.scale)
          if run.method == "it" and "memorisation" in run.experiments
          for c in memorisation_prompts(study, run)]


def epoch_curves(workdir: pathlib.Path, steps_per_epoch: int) -> list[dict[str, Any]]:
  """Per epoch: the train output/instruction loss (the per-example measure, averaged over the
  epoch's logged steps, weighted by their examples) and the held-out one at the epoch's end."""
  run = report.load_run(workdir)
  evals = {r["step"]: r for r in run.eval}  # a rerun's duplicate final eval: keep the last
  epochs = []
  for epoch in range(1, max(r["step"] for r in run.train) // steps_per_epoch + 1):
    lo, hi = (epoch - 1) * steps_per_epoch, epoch * steps_per_epoch
    records = [r for r in run.train if lo < r["step"] <= hi]
    point = {"epoch": epoch, "step": hi}
    for group in ("output", "instruction"):
      n = sum(r.get(f"{group}_examples", 0) for r in records)
      point[f"train_{group}_loss"] = (sum(r[f"{group}_loss_per_example"] * r[f"{group}_examples"]
                                          for r in records) / n) if n else None
      held = evals.get(hi, {})
      point[f"held_out_{group}_loss"] = held.get(f"eval_{group}_loss_per_example")
    epochs.append(point)
  return epochs


HELD_OUT_CURVE = "held_out_epochs"  # WORKDIR/held_out_epochs/step_N.json (replicated)


def held_out_hook(study: Study, run: runs_lib.Run, exp: experiment.Experiment,
                  tokenizer: Any, every: int) -> loop_lib.StepHook:
  """Every `every` steps and at the end: each held-out example's losses, written to
  WORKDIR/held_out_epochs/step_N.json (kept on resume: a step's file is its model's), and
  their means logged. The same measure (`evaluation.example_losses`) as every other score
  of the study, on the model in memory."""
  c = exp.config
  held = study.splits[run.subset.dataset].held_out
  folder = exp.workdir / HELD_OUT_CURVE

  def fn(state) -> dict[str, float]:
    model = nnx.merge(exp.graphdef, state.params, *state.fixed())
    mut = evaluation.ModelUnderTest(model, tokenizer, c.data.template, c.data.strip_content)
    losses = evaluation.example_losses(mut, held, c.data.max_seq_len, c.eval.batch_size,
                                       c.loss.chunk_size)
    folder.mkdir(parents=True, exist_ok=True)
    write_faults.replace_text(folder / f"step_{int(state.step)}.json", json.dumps(losses))
    return {"held_out_output_loss_per_example": evaluation.mean(losses["output"]),
            "held_out_instruction_loss_per_example": evaluation.mean(losses["instruction"])}

  return loop_lib.StepHook(fn, every)


def held_out_epochs(workdir: pathlib.Path, steps_per_epoch: int,
                    epochs: int) -> list[dict[str, list[float | None]]]:
  """The per-example held-out losses after each epoch, from `held_out_hook`'s files."""
  out = []
  for epoch in range(1, epochs + 1):
    path = workdir / HELD_OUT_CURVE / f"step_{epoch * steps_per_epoch}.json"
    if not path.exists():
      raise FileNotFoundError(f"{path}: the held-out losses after epoch {epoch} are missing")
    out.append(json.loads(path.read_text(encoding="utf-8")))
  return out


def train(study: Study, run: runs_lib.Run) -> dict[str, Any]:
  """Trains (or resumes) the run's workdir; its curves and throughput."""
  c = study.config(run)
  workdir = study.out / "runs" / run.name
  check_mesh(c, jax.device_count(), jax.process_count())
  exp = experiment.build(c, workdir)
  tokenizer = load_tokenizer(str(exp.tokenizer_dir))
  spe = exp.train_data.steps_per_epoch
  held = study.splits[run.subset.dataset].held_out
  if study.scale.replicas:  # every example after every epoch, not only their mean
    exp.eval_data = None
    exp.hooks = exp.hooks + (held_out_hook(study, run, exp, tokenizer, spe),)
  else:
    exp.eval_data = pipeline_lib.build_pipeline(
        held, tokenizer, encode_config(c), pipeline_config(c, c.eval.batch_size, 1, False),
        shard_index=0, shard_count=1)
    exp.loop_config = dataclasses.replace(exp.loop_config, eval_every=spe)
  say(f"  training {exp.loop_config.total_steps} steps ({spe} per epoch) in {workdir}")
  result = exp.run()
  if result.preempted:
    raise StudyStopped(f"{run.name} was stopped at step {result.step} (its checkpoint is "
                       "saved): rerun the same command to resume")
  summary = report.summarize(report.load_run(workdir))
  epochs = epoch_curves(workdir, spe)
  value = {"workdir": str(workdir), "steps": result.step, "steps_per_epoch": spe,
           "epochs": epochs, "tokens": summary.tokens,
           "tokens_per_sec": summary.tokens_per_sec,
           "data_stats": exp.train_data.stats.as_dict()}
  if study.scale.replicas:
    curve = held_out_epochs(workdir, spe, len(epochs))
    for point, losses in zip(epochs, curve):
      point["held_out_output_loss"] = evaluation.mean(losses["output"])
      point["held_out_instruction_loss"] = evaluation.mean(losses["instruction"])
    value["held_out_epochs"] = curve
  return value


def run_one(study: Study, run: runs_lib.Run, datasets: Sequence[str]) -> dict[str, Any]:
  key = study.run_key(run)
  started = time.perf_counter()
  value = {"method": run.method, "seed": run.seed, "subset": dataclasses.asdict(run.subset),
           "experiments": list(run.experiments),
           "length_ratio": subsets.length_ratio(study.subset(run)), **train(study, run)}
  c = study.config(run)
  mut = _mut_from_loaded(load_pretrained(value["workdir"], **eval_options(c)))
  own = (datasets if "overfitting" in run.experiments else (run.subset.dataset,))
  curve = value.get("held_out_epochs")
  if curve:  # the last epoch's held-out losses are this model's: not computed twice
    own = tuple(d for d in own if d != run.subset.dataset)
  value.update(evaluate_model(study, mut, own, study.subset(run)[:study.scale.train_eval],
                              c.data.max_seq_len))
  if curve:
    value["held_out"][run.subset.dataset] = _with_means(curve[-1])
  if run.method == runs_lib.INSTRUCTIONS_ONLY:  # what the control's second source held
    kept, share = study.instruction_share(c, study.subset(run))
    value["control"] = {"instructions": len(kept), "example_weight": share}
  if "memorisation" in run.experiments:
    prompts = memorisation_prompts(study, run)
    value["memorisation"] = evaluation.memorisation(mut, prompts, study.scale.max_new_tokens)
  value["seconds"] = time.perf_counter() - started
  return study.store.put(run.name, key, value)


def _with_means(losses: dict[str, list]) -> dict[str, Any]:
  return {**losses, "output_mean": evaluation.mean(losses["output"]),
          "instruction_mean": evaluation.mean(losses["instruction"])}


def run_all(study: Study, runs: Sequence[runs_lib.Run], datasets: Sequence[str]) -> None:
  """Every run in order, skipping finished ones; progress and time left on stderr."""
  baseline(study, datasets)
  spent: list[float] = []
  for i, run in enumerate(runs, start=1):
    if study.store.get(run.name, study.run_key(run)) is not None:
      say(f"[{i}/{len(runs)}] {run.name}: done (from results)")
      continue
    todo = sum(1 for r in runs[i - 1:] if not study.store.path(r.name).exists())
    eta = f", about {sum(spent) / len(spent) * todo / 60:.1f} min left" if spent else ""
    say(f"[{i}/{len(runs)}] {run.name}: {', '.join(run.experiments)}{eta}")
    started = time.perf_counter()
    run_one(study, run, datasets)
    spent.append(time.perf_counter() - started)
    say(f"[{i}/{len(runs)}] {run.name}: finished in {spent[-1]:.0f} s")


PROBE_STEPS = 4


def measure_speed(study: Study) -> tuple[float, float]:
  """(training tokens/s of the model here, mean tokens per example at max_seq_len).

  A short `it` run (PROBE_STEPS steps) on the first pool examples of every dataset, in
  OUT/probe/DIGEST (the settings' digest: a probe of other settings is never resumed as this
  one); the first logged step holds the compilation and is left out.
  """
  pool = [c for s in study.splits.values() for c in s.pool[:16]]
  probe = runs_lib.Run(runs_lib.Subset("probe", "alpaca5k", len(pool)), "it", ())
  data = subsets.write_jsonl(study.out / "data" / "probe.jsonl", pool)
  c = runs_lib.config_for(probe, study.scale, data, study.start.init_from, study.start.tokenizer,
                          {"train.max_steps": PROBE_STEPS})
  workdir = study.out / "probe" / digest(study.base_key())
  check_mesh(c, jax.device_count(), jax.process_count())
  exp = experiment.build(c, workdir)
  exp.run()
  summary = report.summarize(report.load_run(workdir))
  stats = exp.train_data.stats
  return summary.tokens_per_sec, stats.kept_tokens / max(stats.kept, 1)
