"""The grain input pipeline: conversations -> packed, sharded, resumable batches.

Per process and epoch:

    kept example indices -> this process's shard -> shuffle(seed, epoch) -> encode (map)
      -> pack (grain first/best fit, or one example per row) -> all-padding rows up to the
      common row count -> batch

and the epochs are chained (`InterleaveIterDataset` with `cycle_length=1`), so packing never
mixes epochs and the whole run is one grain iterator with `get_state()/set_state()`.

Exact, equal batch counts: before training, `DataPipeline` encodes every example once (the
plan) to learn its length and whether it is dropped, then runs the same grain packer over
length-only stand-ins for every process's shard and epoch. Every process pads each epoch to
the largest row count over processes and epochs, rounded up to a whole batch, so all
processes yield `steps_per_epoch` batches in every epoch, known before iterating.
"""

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from im_jax.data import encode as encode_lib
from im_jax.data import packing as packing_lib
from im_jax.data.conversation import Conversation


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  batch_size: int = 8  # rows per batch on each process
  packing: str = "best_fit"  # best_fit | first_fit | none (one example per row)
  # Bins grain's packer fills before emitting them: more bins, less padding (LIMA at 2048:
  # 97.3% with 64, 98.4% with 256), at the cost of a slower first batch.
  num_packing_bins: int = 256
  max_segments_per_row: int | None = 64
  seed: int = 0
  shuffle: bool = True
  num_epochs: int = 1
  read_threads: int = 2  # grain ReadOptions threads for the encode map (0: inline)
  # Worker processes encoding examples (grain mp_prefetch; 0: none). They encode only: packing
  # stays in this process and sees the same example order, so batches and counts are the same.
  # Outside absl.app.run call absl.flags.FLAGS.mark_as_parsed() first, under __main__ guard.
  num_workers: int = 0
  cache_examples: bool = False  # keep the plan's encoded examples instead of re-encoding

  def __post_init__(self):
    if self.packing not in packing_lib.PACKING:
      raise ValueError(f"packing must be one of {packing_lib.PACKING}, got {self.packing!r}")
    if self.batch_size < 1 or self.num_epochs < 1 or self.num_packing_bins < 1:
      raise ValueError("batch_size, num_epochs and num_packing_bins must be >= 1")
    if self.max_segments_per_row is not None and self.max_segments_per_row < 1:
      raise ValueError(f"max_segments_per_row must be >= 1, got {self.max_segments_per_row}")
    for name in ("read_threads", "num_workers"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _epoch_seed(seed: int, epoch: int) -> int:
  return (seed * 1_000_003 + epoch) % (2**31)


class DataPipeline:
  """Batches for one process (shard) of a data-parallel run.

  Build with `build_pipeline` (from conversations) or `from_examples` (already encoded).
  """

  def __init__(self, get_example: Callable[[int], dict[str, np.ndarray] | None],
               num_source_examples: int, row_length: int, config: PipelineConfig,
               shard_index: int | None = None, shard_count: int | None = None,
               stats: encode_lib.EncodeStats | None = None):
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
    self.stats = stats or encode_lib.EncodeStats()
    # The plan: encode everything once for lengths and drops.
    lengths = np.zeros(num_source_examples, np.int64)
    cache: dict[int, dict[str, np.ndarray]] = {}
    for i in range(num_source_examples):
      example = get_example(i)
      if example is not None:
        lengths[i] = len(example["tokens"])
        if config.cache_examples:
          cache[i] = example
    self._get_example = cache.__getitem__ if config.cache_examples else get_example
    self.kept_indices = np.flatnonzero(lengths > 0)
    self.example_lengths = lengths
    self._count_all_rows()

  def _count_all_rows(self) -> None:
    # rows[s, e]: packed rows of shard s in epoch e, counted with grain's own packer.
    config = self.config
    self.rows = np.array([[self._count_rows(s, e) for e in range(config.num_epochs)]
                          for s in range(self.shard_count)], np.int64)
    batch = config.batch_size
    self.rows_per_epoch = max(1, -(-int(self.rows.max()) // batch)) * batch
    self.steps_per_epoch = self.rows_per_epoch // batch

  def with_epochs(self, num_epochs: int) -> "DataPipeline":
    """The same pipeline over `num_epochs`, reusing the encoding plan (no re-encoding)."""
    other = copy.copy(self)
    other.config = dataclasses.replace(self.config, num_epochs=num_epochs)
    other._count_all_rows()
    return other

  @property
  def total_steps(self) -> int:
    """Batches each process yields over all epochs."""
    return self.steps_per_epoch * self.config.num_epochs

  def updates(self, batches: int | None = None) -> int:
    """Optimizer updates in the first `batches` batches (default: all of them).

    A global batch updates when some process has a real row in it; the all-padding batches
    closing an epoch that packs into fewer rows do not (every kept example carries loss
    weight, by the drop rules). So a learning-rate schedule spans these, not the batches.
    """
    batches = self.total_steps if batches is None else batches
    if not 0 <= batches <= self.total_steps:
      raise ValueError(f"batches must be in [0, {self.total_steps}], got {batches}")
    real = -(-self.rows.max(axis=0) // self.config.batch_size)  # per epoch, over processes
    full, rest = divmod(batches, self.steps_per_epoch)
    return int(real[:full].sum() + (min(rest, real[full]) if rest else 0))

  def padding_rows(self) -> np.ndarray:
    """All-padding rows added per (shard, epoch) to equalise batch counts."""
    return self.rows_per_epoch - self.rows

  def _shard_indices(self, shard_index: int, epoch: int) -> grain.MapDataset:
    ds = grain.MapDataset.source(self.kept_indices)[shard_index::self.shard_count]
    if self.config.shuffle:
      ds = ds.shuffle(seed=_epoch_seed(self.config.seed, epoch))
    return ds

  def _pack_kwargs(self, epoch: int) -> dict[str, Any]:
    cfg = self.config
    return dict(packing=cfg.packing, row_length=self.row_length,
                num_packing_bins=cfg.num_packing_bins,
                max_segments_per_row=cfg.max_segments_per_row,
                seed=_epoch_seed(cfg.seed, epoch))

  def _count_rows(self, shard_index: int, epoch: int) -> int:
    order = np.asarray(list(self._shard_indices(shard_index, epoch)), np.int64)
    return packing_lib.count_rows(self.example_lengths[order], **self._pack_kwargs(epoch))

  def _encode(self, index) -> dict[str, np.ndarray]:
    example = self._get_example(int(index))
    if example is None:  # the plan kept it, so encoding is not deterministic
      raise RuntimeError(f"example {index} was kept by the plan but dropped when re-encoded")
    return example

  def epoch_dataset(self, epoch: int) -> grain.IterDataset:
    """This process's batches for one epoch: exactly `steps_per_epoch` of them."""
    read = grain.ReadOptions(num_threads=self.config.read_threads)
    examples = self._shard_indices(self.shard_index, epoch).map(self._encode)
    examples = examples.to_iter_dataset(read)
    if self.config.num_workers:
      examples = examples.mp_prefetch(grain.MultiprocessingOptions(self.config.num_workers))
    rows = packing_lib.pack(examples, **self._pack_kwargs(epoch))
    row_length = self.row_length
    padding = grain.MapDataset.range(int(self.padding_rows()[self.shard_index, epoch])).map(
        lambda _: packing_lib.empty_row(row_length))
    rows = grain.experimental.InterleaveIterDataset(
        [rows, padding.to_iter_dataset()], cycle_length=1)
    return rows.batch(self.config.batch_size, drop_remainder=False)

  def dataset(self) -> grain.IterDataset:
    """All epochs chained; `iter(...)` gives a checkpointable grain iterator."""
    epochs = grain.MapDataset.range(self.config.num_epochs).map(self.epoch_dataset)
    return grain.experimental.InterleaveIterDataset(epochs, cycle_length=1)

  def __iter__(self):
    return iter(self.dataset())


def build_pipeline(conversations: Sequence[Conversation], tokenizer: Any,
                   encode_config: encode_lib.EncodeConfig, config: PipelineConfig,
                   shard_index: int | None = None,
                   shard_count: int | None = None) -> DataPipeline:
  """The training pipeline for this process (sharded by JAX process unless told)."""
  encoder = encode_lib.Encoder(tokenizer, encode_config)
  stats = encode_lib.EncodeStats()
  counting = {"on": True}

  def get_example(i: int):
    # Count during the plan only (one pass over every example), not on re-encodes.
    return encoder.encode(conversations[i], stats if counting["on"] else None)

  pipeline = DataPipeline(get_example, len(conversations), encode_config.max_seq_len, config,
                          shard_index, shard_count, stats)
  counting["on"] = False
  return pipeline


def from_examples(examples: Sequence[dict[str, np.ndarray] | None], row_length: int,
                  config: PipelineConfig, shard_index: int | None = None,
                  shard_count: int | None = None) -> DataPipeline:
  """A pipeline over already encoded (shifted) examples; None entries count as dropped."""
  return DataPipeline(examples.__getitem__, len(examples), row_length, config,
                      shard_index, shard_count)
