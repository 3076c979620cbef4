"""A run's data, from the config to planned pipelines: the data half of the wiring.

Reads each `data.train` source (random access, indexes cached), resolves the tokenizer,
plans every example once (or reads the cached plan: `im_jax.data.plan`), splits held-out
examples and builds the train and eval pipelines; `--dry-run` and training share it.
"""

import dataclasses
import hashlib
import math
import pathlib
import tempfile
from typing import Sequence

import jax
import numpy as np

from im_jax import distributed, hub, paths
from im_jax.checkpoint.store import newest_meta, saved_data_state
from im_jax.data import mixture
from im_jax.data import pipeline as pipeline_lib
from im_jax.data import plan as plan_lib
from im_jax.data import records as records_lib
from im_jax.data import synthetic
from im_jax.data.conversation import Conversation
from im_jax.data.encode import Encoder
from im_jax.data.stats import load_tokenizer
from im_jax.run.settings import (SYNTHETIC, ConfigError, RunConfig, check, encode_config,
                                 pipeline_config, train_sources)

def open_source_records(c: RunConfig, source: mixture.Source,
                        cache_dir: pathlib.Path | None = None) -> records_lib.Records:
  """A training source's records, random access (a text file through a byte index, cached
  in `cache_dir` by `records.save_indexes()`)."""
  spec = source.spec
  check(bool(spec), "data.train is empty: give a data file, tfds:NAME:SPLIT or synthetic:N")
  if spec.startswith(SYNTHETIC + ":"):
    return records_lib.Records(
        synthetic.make_conversations(int(spec.split(":", 1)[1]), seed=c.train.seed))
  # a gs:// file is read from a local copy
  return records_lib.open_records(paths.fetch(spec, what="data.train"),
                                  format=source.format or c.data.format or None,
                                  on_bad_record=c.data.on_bad_record,
                                  index_cache=cache_dir)


def _good_conversations(records: records_lib.Records, limit: int) -> list[Conversation]:
  """The first `limit` (0: all) readable conversations (a synthetic tokenizer's texts)."""
  out = []
  for i in range(len(records)):
    record = records.read(i)
    if isinstance(record, Conversation):
      out.append(record)
      if len(out) == limit:
        break
  return out


def resolve_tokenizer_dir(c: RunConfig, workdir: pathlib.Path,
                          records: records_lib.Records,
                          pretrained_tokenizer_dir: pathlib.Path | None) -> pathlib.Path:
  if c.data.tokenizer == SYNTHETIC and paths.is_remote(workdir):
    return _remote_synthetic_tokenizer(workdir / "tokenizer",
                                       _good_conversations(records, c.data.max_examples))
  if c.data.tokenizer == SYNTHETIC:
    out = workdir / "tokenizer"
    # A resumed run must reuse the same one; process 0 writes it, the others wait to read it.
    if not (out / "tokenizer.json").exists() and distributed.is_main_process():
      texts = synthetic.tokenizer_texts(_good_conversations(records, c.data.max_examples))
      synthetic.train_tokenizer(texts, out)
    distributed.sync("synthetic_tokenizer")
    return out
  if c.data.tokenizer:
    return hub.folder(paths.fetch(c.data.tokenizer, what="data.tokenizer"))
  check(pretrained_tokenizer_dir is not None,
         "data.tokenizer is empty and model.init_from names no model to take it from")
  return pathlib.Path(pretrained_tokenizer_dir)


def _remote_synthetic_tokenizer(out, conversations: Sequence[Conversation]) -> pathlib.Path:
  """A synthetic tokenizer kept in a gs:// workdir: trained locally once (process 0),
  uploaded, and read by every process (and every resume) from a local copy."""
  if not (out / "tokenizer.json").exists() and distributed.is_main_process():
    with tempfile.TemporaryDirectory() as tmp:
      local = synthetic.train_tokenizer(synthetic.tokenizer_texts(list(conversations)),
                                        pathlib.Path(tmp) / "tokenizer")
      paths.upload_tree(local, out, last="tokenizer.json")
  distributed.sync("synthetic_tokenizer")
  return pathlib.Path(paths.fetch(out, what="data.tokenizer"))


@dataclasses.dataclass
class RunData:
  """A run's data, read, encoded and planned: what training and `--dry-run` share."""

  tokenizer_dir: pathlib.Path
  vocab_size: int
  train: pipeline_lib.DataPipeline
  eval: pipeline_lib.DataPipeline | None
  total_steps: int  # batches
  updates: int  # optimizer updates: batches less the all-padding ones closing short epochs
  held_out_examples: int
  mixture: "mixture.Mixture | None" = None  # data.train in the mixture syntax
  sources: list[dict] | None = None  # a mixture's per-source table (`mixture.source_table`)


PLAN_DIR = "data_plan"  # WORKDIR/data_plan: the cached data plan (im_jax.data.plan)


def _example_plan(c: RunConfig, source: mixture.Source,
                  records: records_lib.Records, tokenizer, tokenizer_dir: pathlib.Path,
                  cache_dir: pathlib.Path | None,
                  write_cache: bool) -> tuple[plan_lib.ExamplePlan, str]:
  """The plan of every record of one source, read from the cache or made (each process its
  share). A mixture plans each source on its own (its own format and template)."""
  enc = encode_config(c, source)
  settings = {"encode": repr(enc), "format": source.format or c.data.format,
              "on_bad_record": c.data.on_bad_record}
  if source.spec.startswith(SYNTHETIC + ":"):
    settings.update(synthetic=source.spec, seed=c.train.seed)
  cacheable = bool(records.files) or "synthetic" in settings  # not tfds: no files to hash
  key = plan_lib.plan_key(records.digests(), tokenizer_dir, settings)
  path = cache_dir / f"{key}.npz" if cache_dir is not None and cacheable else None
  plan = plan_lib.load_cached(path) if path is not None else None
  if not plan_lib.all_processes(plan is not None, key):  # all plan together, or none does
    plan = None
  if plan is None:
    plan = plan_lib.make_plan(records, Encoder(tokenizer, enc),
                              on_bad_record=c.data.on_bad_record,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
    plan_lib.check_plan(plan, source.spec, c.data.on_bad_record, records.skipped)
    if path is not None and write_cache and distributed.is_main_process():
      plan_lib.save_cached(path, plan)
  else:  # checked again for its log of skipped records
    plan_lib.check_plan(plan, source.spec, c.data.on_bad_record, records.skipped)
  if write_cache:  # the data proved good: its file indexes are worth keeping
    records.save_indexes()
  return plan, key


def build_data(c: RunConfig, tokenizer_home: pathlib.Path,
               pretrained_tokenizer_dir: pathlib.Path | None, *,
               cache_dir: pathlib.Path | None = None, write_cache: bool = True) -> RunData:
  """Reads and plans the data (from `cache_dir`'s plan when its inputs are unchanged; see
  `im_jax.data.plan`), splits it and plans its batches. A synthetic tokenizer is trained into
  `tokenizer_home`/tokenizer unless one is there. A mixture (`im_jax.data.mixture`) lays its
  sources end to end, each planned, split and checked on its own."""
  processes = jax.process_count()
  sources = train_sources(c)
  parts = [open_source_records(c, source, cache_dir) for source in sources]
  records = records_lib.Concatenated(parts)
  tokenizer_dir = resolve_tokenizer_dir(c, tokenizer_home, records, pretrained_tokenizer_dir)
  tokenizer = load_tokenizer(str(tokenizer_dir))
  plans, keys, trains, helds = [], [], [], []
  for source, part in zip(sources, parts):
    plan, key = _example_plan(c, source, part, tokenizer, tokenizer_dir, cache_dir, write_cache)
    train, held = plan.select(c.data.eval_fraction, c.data.max_examples)
    if len(sources) == 1:
      check(bool(train.any()), f"no training examples left in {source.spec}")
    else:
      dropped = plan.stats(train).dropped
      check(bool((train & (plan.lengths > 0)).any()),
            f"data.train: source {source.name} ({source.spec}) has no training example left: "
            f"{int(train.sum())} after the held-out split and data.max_examples, dropped: "
            + (", ".join(f"{n} {why}" for why, n in dropped.items()) or "none"))
    plans.append(plan)
    keys.append(key)
    trains.append(train)
    helds.append(held)
  plan = plan_lib.ExamplePlan.concatenate(plans)
  train, held = np.concatenate(trains), np.concatenate(helds)
  encoders = [Encoder(tokenizer, encode_config(c, source)) for source in sources]
  offsets = records.offsets

  def get_example(i: int):
    return encoders[int(np.searchsorted(offsets, i, side="right")) - 1].encode(records.read(i))

  mix = None
  identity = keys[0]  # a plain spec: the single source's plan (positions saved before resume)
  if mixture.is_mixture(c.data.train):
    kept = [np.flatnonzero(m & (p.lengths > 0)) + offsets[s]
            for s, (m, p) in enumerate(zip(trains, plans))]
    mix = mixture.Mixture(sources, offsets, kept, c.train.seed)
    identity = ",".join(keys) + ":" + mix.identity()
  example_sources = None
  if len(sources) > 1:  # rows say whose each example is; one source adds nothing
    example_sources = (np.searchsorted(offsets, np.arange(len(plan)), side="right")
                       ).astype(np.int32)

  def make_pipeline(mask, rows, epochs, shuffle, micro_batches=1, epoch_examples=None):
    config = dataclasses.replace(pipeline_config(c, rows, epochs, shuffle),
                                 micro_batches=micro_batches)
    return pipeline_lib.DataPipeline(
        get_example, np.where(mask, plan.lengths, 0), c.data.max_seq_len, config,
        stats=plan.stats(mask), identity=identity, cache_dir=cache_dir, write_cache=write_cache,
        epoch_examples=epoch_examples, example_sources=example_sources)

  rows = c.train.batch_size // processes
  train_data = make_pipeline(train, rows, max(c.train.epochs, 1), True, c.train.grad_accum,
                             mix.epoch_examples if mix is not None else None)
  total_steps = c.train.max_steps or train_data.total_steps
  if total_steps > train_data.total_steps:  # more steps than the epochs hold: add epochs
    epochs = math.ceil(total_steps / train_data.steps_per_epoch)
    train_data = train_data.with_epochs(epochs)
  eval_data = None
  if held.any():
    eval_data = make_pipeline(held, c.eval.batch_size // processes, 1, False)
  table = None
  if mix is not None:
    picks = np.concatenate([train_data.epoch_ids(e)
                            for e in range(train_data.config.num_epochs)])
    table = mixture.source_table(sources, offsets, plan.lengths,
                                 [p.stats(m).as_dict() for p, m in zip(plans, trains)],
                                 [int(h.sum()) for h in helds], picks)
  return RunData(tokenizer_dir, len(tokenizer), train_data, eval_data, total_steps,
                 train_data.updates(total_steps), int(held.sum()), mix, table)


def plan_cache_dir(workdir) -> pathlib.Path:
  """Where the run's data plan is cached: WORKDIR/data_plan, or for a gs:// workdir a local
  folder named after it (numpy reads and writes local files; each host plans once)."""
  if not paths.is_remote(workdir):
    return pathlib.Path(workdir) / PLAN_DIR
  digest = hashlib.blake2b(str(workdir).encode(), digest_size=8).hexdigest()
  return paths.cache_root() / PLAN_DIR / digest


def check_data_position(workdir: pathlib.Path, train_data: pipeline_lib.DataPipeline) -> None:
  """Refuses, in one line and before any model work, a newest checkpoint whose data position
  this run cannot continue (another data plan, or an earlier im_jax's per-process layout).
  A position of this layout continues on any number of processes."""
  newest = newest_meta(workdir)
  if newest is None:
    return
  try:
    saved = saved_data_state(workdir / "checkpoints" / str(newest[0]))
  except (OSError, ValueError):
    return  # damaged: the restore falls back to an older checkpoint and says so
  if saved is None:
    return
  count, state = saved
  problem = train_data.state_problem(state)
  if problem is None:
    return
  where = f"checkpoint {newest[0]} in {workdir / 'checkpoints'}"
  if count != jax.process_count():
    where += (f" was written by {count} process(es) and this run has {jax.process_count()} "
              f"(rerun with {count} processes)")
  raise ConfigError(f"{where}: {problem}")
