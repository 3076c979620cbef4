"""The input pipeline: planned examples -> global rows -> this process's resumable batches.

The order of the data is a function of the plan, the seed and the global step alone, never
of the number of processes that read it (so a run resumes on another slice size with the
batches it would have seen; docs/multihost.md):

    epoch e: the kept examples (a mixture: epoch e's picks, `im_jax.data.mixture`),
      permuted by (seed, e) -> rows by `packing.plan_rows` over
      their lengths -> all-padding rows up to whole global batches of G rows
    global batch b of the run: rows [bG, (b+1)G) of its epoch; with k micro-batches, each
      micro-batch's G/k rows are split into P equal blocks and process p takes block p.

Every epoch has the same `steps_per_epoch` (the largest epoch's; a shorter one ends in
all-padding batches, which do not update: `updates`). Rows are decided from lengths only
(the data plan, `im_jax.data.plan`); a row's examples are encoded when grain reads it, by a
`grain.MapDataset` over this process's row ids. The iterator's state is
`{"layout": LAYOUT, "batches": n, "data": identity}`: the same on every process and for any
process count; `identity` names the examples' plan, so a position taken over other data is
refused (`state_problem`).

The rows of each epoch are cached next to the plan (`cache_dir`): packing 500k examples
takes seconds, reading them back milliseconds.
"""

import copy
import dataclasses
import hashlib
import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from im_jax.data import encode as encode_lib
from im_jax.data import packing as packing_lib
from im_jax.data import plan as plan_lib
from im_jax.data import records as records_lib
from im_jax.data.conversation import Conversation

LAYOUT = "im_jax.global_rows.v1"  # the iterator state's layout (see the module docstring)
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  batch_size: int = 8  # rows per batch on each process (the global batch: x processes)
  packing: str = "best_fit"  # best_fit | first_fit | none (one example per row)
  # Rows open at once while packing: more rows, less padding (LIMA at 2048: 97.3% with 64,
  # 98.4% with 256), at the cost of a slower plan.
  num_packing_bins: int = 256
  max_segments_per_row: int | None = 64
  seed: int = 0
  shuffle: bool = True
  num_epochs: int = 1
  read_threads: int = 2  # grain ReadOptions threads encoding rows (0: inline)
  micro_batches: int = 1  # gradient accumulation steps: each process's rows per micro-batch

  def __post_init__(self):
    if self.packing not in packing_lib.PACKING:
      raise ValueError(f"packing must be one of {packing_lib.PACKING}, got {self.packing!r}")
    if self.batch_size < 1 or self.num_epochs < 1 or self.num_packing_bins < 1:
      raise ValueError("batch_size, num_epochs and num_packing_bins must be >= 1")
    if self.max_segments_per_row is not None and self.max_segments_per_row < 1:
      raise ValueError(f"max_segments_per_row must be >= 1, got {self.max_segments_per_row}")
    if self.read_threads < 0:
      raise ValueError(f"read_threads must be >= 0, got {self.read_threads}")
    if self.micro_batches < 1 or self.batch_size % self.micro_batches:
      raise ValueError(f"batch_size {self.batch_size} does not split into {self.micro_batches} "
                       "micro-batches")


class DataStateRefused(ValueError):
  """A saved data position this pipeline cannot continue; one line for the user."""


class DataPipeline:
  """The batches of one process of a run (any process count reads the same global rows).

  `lengths[i]`: the shifted length of example i, 0 when it is not in this pipeline (dropped,
  held out); `get_example(i)` encodes it. Build with `build_pipeline` (conversations) or
  `from_examples` (already encoded); `run_data.build_data` uses the cached plan.
  """

  def __init__(self, get_example: Callable[[int], dict[str, np.ndarray] | None],
               lengths: np.ndarray, row_length: int, config: PipelineConfig,
               shard_index: int | None = None, shard_count: int | None = None,
               stats: encode_lib.EncodeStats | None = None, identity: str = "",
               cache_dir: pathlib.Path | None = None, write_cache: bool = False,
               epoch_examples: Callable[[int], np.ndarray] | None = None,
               example_sources: np.ndarray | None = None):
    if (shard_index is None) != (shard_count is None):
      raise ValueError("give both shard_index and shard_count, or neither")
    if shard_index is None:
      shard = grain.sharding.ShardByJaxProcess(drop_remainder=False)
      shard_index, shard_count = shard.shard_index, shard.shard_count
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    self.config = config
    self.row_length = row_length
    self.shard_index, self.shard_count = shard_index, shard_count
    self.global_batch_size = config.batch_size * shard_count
    self.example_lengths = np.asarray(lengths, np.int32)
    self.kept_indices = np.flatnonzero(self.example_lengths > 0)
    self.stats = stats or encode_lib.EncodeStats()
    digest = hashlib.sha256(identity.encode() + self.example_lengths.tobytes())
    self.identity = digest.hexdigest()[:32]  # what the saved positions are positions in
    self._get_example = get_example
    # A mixture (`im_jax.data.mixture`): each epoch's example ids (repeats allowed, ascending),
    # and each example's 1-based source for the rows' `source_ids` (several sources only).
    self._epoch_examples = epoch_examples
    self.example_sources = example_sources
    self._cache_dir, self._write_cache = cache_dir, write_cache
    self._layouts: list[tuple[np.ndarray, np.ndarray]] = []
    self._plan_epochs(config.num_epochs)

  # ----------------------------------------------------------------- the plan of rows

  def _plan_epochs(self, num_epochs: int) -> None:
    while len(self._layouts) < num_epochs:
      self._layouts.append(self._epoch_layout(len(self._layouts)))
    del self._layouts[num_epochs:]
    self.epoch_rows = np.array([len(s) - 1 for _, s in self._layouts], np.int64)
    g = self.global_batch_size
    self.steps_per_epoch = max(1, -(-int(self.epoch_rows.max()) // g))
    self.rows_per_epoch = self.steps_per_epoch * self.config.batch_size  # this process's

  def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(example ids in row order, row starts) of one epoch, from the cache when there."""
    cfg = self.config
    settings = [plan_lib.VERSION, cfg.packing, cfg.num_packing_bins, cfg.max_segments_per_row,
                cfg.shuffle, cfg.seed, epoch, self.row_length, self.identity]
    key = hashlib.sha256(repr(settings).encode()).hexdigest()[:32]
    path = self._cache_dir / f"rows-{key}.npz" if self._cache_dir is not None else None
    if path is not None and path.exists():
      try:
        with np.load(path, allow_pickle=False) as f:
          return f["ids"], f["starts"]
      except (OSError, ValueError, KeyError) as e:
        log.warning("row plan cache %s unreadable (%s): planning again", path, e)
    ids = self.kept_indices if self._epoch_examples is None else self._epoch_examples(epoch)
    if cfg.shuffle:
      ids = ids[np.random.default_rng([cfg.seed, epoch]).permutation(len(ids))]
    order, starts = packing_lib.plan_rows(
        self.example_lengths[ids], packing=cfg.packing, row_length=self.row_length,
        num_packing_bins=cfg.num_packing_bins, max_segments_per_row=cfg.max_segments_per_row)
    ids = ids[order].astype(np.int32 if len(self.example_lengths) < 2**31 else np.int64)
    if path is not None and self._write_cache:
      plan_lib.write_npz(path, ids=ids, starts=starts)
    return ids, starts

  def with_epochs(self, num_epochs: int) -> "DataPipeline":
    """The same pipeline over `num_epochs`, reusing the planned epochs."""
    other = copy.copy(self)
    other.config = dataclasses.replace(self.config, num_epochs=num_epochs)
    other._layouts = list(self._layouts)
    other._plan_epochs(num_epochs)
    return other

  @property
  def total_steps(self) -> int:
    """Batches each process yields over all epochs (the same on every process)."""
    return self.steps_per_epoch * self.config.num_epochs

  def updates(self, batches: int | None = None) -> int:
    """Optimizer updates in the first `batches` batches (default: all of them).

    A global batch updates when it has a real row; the all-padding batches closing an epoch
    that packs into fewer rows do not (every kept example carries loss weight, by the drop
    rules). So a learning-rate schedule spans these, not the batches.
    """
    batches = self.total_steps if batches is None else batches
    if not 0 <= batches <= self.total_steps:
      raise ValueError(f"batches must be in [0, {self.total_steps}], got {batches}")
    real = -(-self.epoch_rows // self.global_batch_size)
    full, rest = divmod(batches, self.steps_per_epoch)
    return int(real[:full].sum() + (min(rest, real[full]) if rest else 0))

  def global_row(self, batch: int, local_row: int) -> tuple[int, int]:
    """(epoch, row of that epoch) of this process's `local_row` of global batch `batch`."""
    epoch, within = divmod(batch, self.steps_per_epoch)
    per = self.config.batch_size // self.config.micro_batches  # per process and micro-batch
    micro, r = divmod(local_row, per)
    g = self.global_batch_size // self.config.micro_batches
    return epoch, within * self.global_batch_size + micro * g + self.shard_index * per + r

  def epoch_ids(self, epoch: int) -> np.ndarray:
    """The example ids of one epoch, in row order (repeats for an upsampled source)."""
    return self._layouts[epoch][0]

  def row_examples(self, epoch: int, row: int) -> np.ndarray:
    """The example ids of one planned row (empty for the padding rows)."""
    ids, starts = self._layouts[epoch]
    if row >= len(starts) - 1:
      return ids[:0]
    return ids[starts[row]:starts[row + 1]]

  # ------------------------------------------------------------------------- reading

  def _read_row(self, index: int) -> dict[str, np.ndarray]:
    batch, local = divmod(int(index), self.config.batch_size)
    ids = self.row_examples(*self.global_row(batch, local))
    sources = None if self.example_sources is None else self.example_sources[ids].tolist()
    return packing_lib.pack_row([self._encode(i) for i in ids], self.row_length, sources)

  def _encode(self, index) -> dict[str, np.ndarray]:
    example = self._get_example(int(index))
    if example is None:  # the plan kept it, so encoding is not deterministic
      raise RuntimeError(f"example {index} was kept by the plan but dropped when re-encoded")
    return example

  def batches_from(self, start: int) -> grain.IterDataset:
    """This process's batches from global batch `start` on."""
    rows = grain.MapDataset.range(self.total_steps * self.config.batch_size).map(self._read_row)
    batches = rows.batch(self.config.batch_size)[start:]
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=self.config.read_threads))

  def dataset(self) -> "Batches":
    """All epochs; `iter(...)` gives a checkpointable iterator (`get_state/set_state`)."""
    return Batches(self)

  def __iter__(self):
    return iter(self.dataset())

  def state_problem(self, state: Any) -> str | None:
    """Why this pipeline cannot continue from a saved iterator `state` (None: it can)."""
    if not isinstance(state, dict) or state.get("layout") != LAYOUT:
      return ("its data position is in the per-process layout of an earlier im_jax (each "
              "process packed its own shard), which this version does not read: finish that run "
              "with the version that started it, or start a new workdir")
    batches = state.get("batches")
    if not isinstance(batches, int) or not 0 <= batches <= self.total_steps:
      return f"its data position {batches!r} is not a batch of this run (0..{self.total_steps})"
    if batches and state.get("data") != self.identity:
      return ("the training data, the tokenizer or a setting that changes the examples differs "
              "from the run that wrote it (another data plan): restore them to resume, or "
              "start a new workdir")
    return None


class Batches:
  """`iter()` -> a `BatchIterator` from the start (what the training loop iterates)."""

  def __init__(self, pipeline: DataPipeline):
    self.pipeline = pipeline

  def __iter__(self) -> "BatchIterator":
    return BatchIterator(self.pipeline)


class BatchIterator:
  """This process's batches, resumable at any global batch on any process count."""

  elastic = True  # its state does not depend on the process count (checkpoint store)

  def __init__(self, pipeline: DataPipeline, start: int = 0):
    self._pipeline = pipeline
    self._start(start)

  def _start(self, batches: int) -> None:
    self.batches = batches
    self._it = iter(self._pipeline.batches_from(batches))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self.batches += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"layout": LAYOUT, "batches": self.batches, "data": self._pipeline.identity}

  def set_state(self, state: dict[str, Any]) -> None:
    problem = self._pipeline.state_problem(state)
    if problem is not None:
      raise DataStateRefused(problem)
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
    self._start(state["batches"])

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def build_pipeline(conversations: Sequence[Conversation], tokenizer: Any,
                   encode_config: encode_lib.EncodeConfig, config: PipelineConfig,
                   shard_index: int | None = None,
                   shard_count: int | None = None) -> DataPipeline:
  """A pipeline over conversations in memory, planned here (no cache, no collective)."""
  encoder = encode_lib.Encoder(tokenizer, encode_config)
  records = records_lib.Records(conversations)
  plan = plan_lib.make_plan(records, encoder, gather=lambda x: x[None])
  everything = np.ones(len(plan), bool)
  return DataPipeline(lambda i: encoder.encode(conversations[i]), plan.lengths,
                      encode_config.max_seq_len, config, shard_index, shard_count,
                      plan.stats(everything))


def from_examples(examples: Sequence[dict[str, np.ndarray] | None], row_length: int,
                  config: PipelineConfig, shard_index: int | None = None,
                  shard_count: int | None = None) -> DataPipeline:
  """A pipeline over already encoded (shifted) examples; None entries count as dropped."""
  lengths = np.array([0 if e is None else len(e["tokens"]) for e in examples], np.int32)
  return DataPipeline(examples.__getitem__, lengths, row_length, config, shard_index,
                      shard_count)
