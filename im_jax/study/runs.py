"""The runs of a study: which subset each method trains on, for which experiments.

A run is identified by its subset, method and seed; experiments that need the same training
share the run (the largest Alpaca size is the overfitting experiment's Alpaca subset). Every
run has the same seed, data order and hyperparameters as the others: only the data file and
the method differ (the second_seed experiment repeats the LIMA pair, both with another seed).
`config_for` builds its config from configs/paper.py plus the scale's overrides (typed and
validated: `settings.load`), so each run is an ordinary `python -m im_jax.train` workdir.
"""

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

from im_jax.run import settings
from im_jax.configs import paper
from im_jax.data.conversation import Conversation
from im_jax.study import scales, subsets

OVERFIT_DATASETS = ("lima", "alpaca5k")
SIZE_DATASET = "alpaca5k"
RATIO_DATASET = "dolly3k"


@dataclasses.dataclass(frozen=True)
class Subset:
  name: str  # e.g. "alpaca5k_n64", "dolly3k_low_n16"
  dataset: str  # the dataset whose held-out set measures it
  size: int
  band: str = ""  # "low" / "high" for length-ratio subsets
  offset: int = 0  # where in the pool it starts: replicas are disjoint slices of it


@dataclasses.dataclass(frozen=True)
class Run:
  subset: Subset
  method: str
  experiments: tuple[str, ...]  # overfitting, memorisation, data_size, ...
  seed: int = 0  # train.seed: init (random-init models), data order, NEFTune noise

  @property
  def name(self) -> str:
    return f"{self.subset.name}_{self.method}" + (f"_seed{self.seed}" if self.seed else "")


# The headline comparison (IT vs IM on LIMA, the paper's few-examples regime) again with
# this seed: how much of a difference one seed's data order and noise make.
SECOND_SEED = 1
EXPERIMENTS = ("overfitting", "memorisation", "data_size", "length_ratio", "second_seed")
REPLICATED_DATASET = "lima"
# The control of the second edition: IT on the subset plus, as separate sequences of their
# own, each example's instruction (system and user messages) with loss on its every token.
INSTRUCTIONS_ONLY = "it_instr"


def methods(scale: scales.Scale) -> tuple[str, ...]:
  """it and im, then the scale's extra methods that configs/paper.py knows, then its
  controls."""
  return (scales.CORE_METHODS + tuple(m for m in scale.extra_methods if m in paper.METHODS)
          + scale.controls)


def replicated_plan(scale: scales.Scale) -> list[Run]:
  """The second edition: replica r is the r-th disjoint slice of the pool, trained with seed
  r by every method; the first replicas also serve memorisation, as many as hold
  `scale.generations` training prompts together (each scored by the models trained on it)."""
  runs = []
  n = scale.overfit_size
  for r in range(scale.replicas):
    subset = Subset(f"{REPLICATED_DATASET}_r{r}_n{n}", REPLICATED_DATASET, n, offset=r * n)
    experiments = (("overfitting", "memorisation") if r * n < scale.generations
                   else ("overfitting",))
    runs += [Run(subset, method, experiments, seed=r) for method in methods(scale)]
  return runs


def make_plan(scale: scales.Scale, only: tuple[str, ...] = ()) -> list[Run]:
  """The runs of the chosen experiments (all when `only` is empty), in running order.

  A run always lists every experiment it serves, whatever `only` picks, so its result (and
  the evaluations it holds) is the same with or without `--only`.
  """
  if scale.replicas:
    if only:
      raise ValueError(f"the {scale.name} scale runs one design whole: --only does not apply")
    return replicated_plan(scale)
  chosen = only or EXPERIMENTS
  unknown = sorted(set(chosen) - set(EXPERIMENTS))
  if unknown:
    raise ValueError(f"unknown experiment {unknown[0]!r}: choose from {', '.join(EXPERIMENTS)}")
  wanted: dict[tuple[Subset, str, int], set[str]] = {}

  def add(subset: Subset, method_names, experiment, seed=0):
    for method in method_names:
      wanted.setdefault((subset, method, seed), set()).add(experiment)

  for dataset in OVERFIT_DATASETS:
    subset = overfit_subset(scale, dataset)
    add(subset, methods(scale), "overfitting")
    add(subset, scales.CORE_METHODS, "memorisation")
  for size in scale.sizes:
    add(Subset(f"{SIZE_DATASET}_n{size}", SIZE_DATASET, size), scales.CORE_METHODS,
        "data_size")
  for band in ("low", "high"):
    add(Subset(f"{RATIO_DATASET}_{band}_n{scale.ratio_size}", RATIO_DATASET,
               scale.ratio_size, band), scales.CORE_METHODS, "length_ratio")
  add(overfit_subset(scale, OVERFIT_DATASETS[0]), scales.CORE_METHODS, "second_seed",
      SECOND_SEED)
  return [Run(subset, method, tuple(e for e in EXPERIMENTS if e in exps), seed)
          for (subset, method, seed), exps in wanted.items() if exps & set(chosen)]


def overfit_subset(scale: scales.Scale, dataset: str) -> Subset:
  return Subset(f"{dataset}_n{scale.overfit_size}", dataset, scale.overfit_size)


def needed_datasets(runs: list[Run]) -> tuple[str, ...]:
  """Datasets whose held-out sets are evaluated: all three when a run serves the overfitting
  experiment (the other datasets are its out-of-distribution sets), else those trained on."""
  if any("overfitting" in r.experiments for r in runs):
    return subsets.DATASETS
  return tuple(d for d in subsets.DATASETS if any(r.subset.dataset == d for r in runs))


def subset_conversations(subset: Subset, split: subsets.DatasetSplit, max_seq_len: int):
  if subset.band:
    # About 3 tokens per word at most (template and a small BPE included): no output is cut.
    return subsets.ratio_bands(split, subset.size, max_seq_len // 3)[subset.band]
  return subsets.first(split, subset.size, subset.offset)


def instructions_file(data_file: pathlib.Path) -> pathlib.Path:
  return data_file.with_name(f"{data_file.stem}_instructions.jsonl")


def instructions_only(conversations: Sequence[Conversation]) -> list[Conversation]:
  """Each example without its assistant messages: under loss `im` exactly the tokens IM adds
  to IT's (system and user content), predicted from the same template header."""
  return [dataclasses.replace(c, messages=tuple(m for m in c.messages if m.role != "assistant"),
                              id=f"{c.id}/instruction")
          for c in conversations]


def config_for(run: Run, scale: scales.Scale, data_file: pathlib.Path, init_from: str,
               tokenizer: str, overrides: dict[str, Any] | None = None,
               instructions_weight: float = 1.0) -> settings.RunConfig:
  """The paper recipe for this run's data and method, with the scale's overrides (then
  `overrides`), as the typed config. The control's instruction sequences each count as
  `instructions_weight` of an example (the share IM gives an example's instruction)."""
  control = run.method == INSTRUCTIONS_ONLY
  c = paper.get_config(f"{data_file},{'it' if control else run.method},{scale.model}")
  if control:  # both sources once per epoch (equal weights, as many kept examples each)
    c.data.train = (f"{data_file}@1,{instructions_file(data_file)}@1@loss=im"
                    f"@drop_rule=no_weight@example_weight={instructions_weight:.6g}"
                    "@name=instructions")
  c.data.eval_fraction = 0.0  # the study's own held-out set replaces the hashed split
  c.train.log_every = 1  # per-step train losses: the per-epoch train curve averages them
  c.train.seed = run.seed
  if init_from:
    c.model.init_from = init_from
  if tokenizer:
    c.data.tokenizer = tokenizer
  for key, value in {**scale.overrides, **(overrides or {})}.items():
    *sections, name = key.split(".")
    target = c
    for section in sections:
      target = target[section]
    target[name] = value
  return settings.load(c)
