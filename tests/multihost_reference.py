"""One process that trains on exactly the global batches of an N-process run (test helper).

`python -m tests.multihost_reference --shards N <the same flags as python -m im_jax.train>`

In an N-process run each process packs and batches its own shard of the examples
(`ShardByJaxProcess`), and the global batch is the processes' rows side by side. A plain
1-process run packs all examples together, so its batches (and losses) differ by design. This
driver builds the same experiment in one process, then replaces its data with the N shard
pipelines, each built exactly as process i of the N-process run builds its own, and feeds the
concatenation of their batches: the global batch the N-process run assembles with
`jax.make_array_from_process_local_data` (processes own consecutive blocks of the mesh's data
axes). Model, optimizer, mesh shape and steps are those of the real entry point.
"""

import dataclasses
import math

import numpy as np
from absl import app, flags

# The train entry point's flags (--config, --workdir) and main().
from im_jax.train import __main__ as train_main

_SHARDS = flags.DEFINE_integer("shards", 2, "processes of the run to reproduce")


class _ConcatIterator:
  """Yields the shards' batches side by side; its state is the list of the shards' states."""

  def __init__(self, iterators):
    self._iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    batches = [next(it) for it in self._iterators]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return {"shards": [it.get_state() for it in self._iterators]}

  def set_state(self, state):
    for it, s in zip(self._iterators, state["shards"]):
      it.set_state(s)


class _ConcatData:

  def __init__(self, pipelines):
    self.pipelines = pipelines

  def dataset(self):
    return self

  def __iter__(self):
    return _ConcatIterator([iter(p.dataset()) for p in self.pipelines])


def _shard_pipelines(exp, shards: int):
  """The pipelines processes 0..shards-1 build in `experiment.build` (same plan and epochs)."""
  from im_jax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from im_jax.data.stats import load_tokenizer  # pylint: disable=g-import-not-at-top
  from im_jax import experiment  # pylint: disable=g-import-not-at-top

  c = exp.config
  convs, _ = experiment.split_held_out(experiment.load_train_conversations(c),
                                       c.data.eval_fraction)
  tokenizer = load_tokenizer(str(exp.tokenizer_dir))
  enc = experiment.encode_config(c)
  base = dataclasses.replace(exp.train_data.config, batch_size=c.train.batch_size // shards,
                             num_epochs=max(c.train.epochs, 1))

  def build(epochs):
    cfg = dataclasses.replace(base, num_epochs=epochs)
    return [pipeline_lib.build_pipeline(convs, tokenizer, enc, cfg, shard_index=i,
                                        shard_count=shards) for i in range(shards)]

  pipelines = build(base.num_epochs)
  total = c.train.max_steps or pipelines[0].total_steps
  if total > pipelines[0].total_steps:  # as experiment.build: more steps than epochs hold
    pipelines = build(math.ceil(total / pipelines[0].steps_per_epoch))
  return pipelines


def main(argv) -> int:
  del argv
  from im_jax import experiment  # pylint: disable=g-import-not-at-top

  real_build = experiment.build

  def build(c, workdir):
    exp = real_build(c, workdir)
    pipelines = _shard_pipelines(exp, _SHARDS.value)
    # The schedule spans the updates of the one-process plan; it must be the sharded run's.
    steps = exp.loop_config.total_steps
    if pipelines[0].updates(steps) != exp.train_data.updates(steps):
      raise RuntimeError("the reference's schedule differs from the sharded run's: its plan "
                         "has other all-padding batches; change the test's data or steps")
    exp.train_data = _ConcatData(pipelines)
    return exp

  experiment.build = build
  return train_main.main([])


if __name__ == "__main__":
  app.run(main)
