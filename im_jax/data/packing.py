"""Rows of the data -> train contract, built with grain's packers.

A row (see docs/design.md) has `max_seq_len` slots of six aligned fields: `tokens`,
`targets`, `loss_weights`, `target_kinds`, `segment_ids` (1.. per example, 0 = padding) and
`positions` (0.. within each example). Examples are shifted before packing, so a segment never
predicts across its boundary, and padding is all zeros: weight 0, kind PAD.

grain's packers (`FirstFitPackIterDataset`, `BestFitPackIterDataset`) emit `<key>_segment_ids`
(1.. per bin, 0 on padding) and `<key>_positions` (0 on padding) for every non-meta feature;
we pack `tokens` as the one non-meta feature and rename its two arrays.
"""

from typing import Any

import grain
import numpy as np

from im_jax.data import encode as encode_lib

PACKING = ("first_fit", "best_fit", "none")
ROW_FIELDS = encode_lib.FIELDS + ("segment_ids", "positions")
ROW_DTYPES = {**encode_lib.FIELD_DTYPES, "segment_ids": np.int32, "positions": np.int32}
_META = tuple(f for f in encode_lib.FIELDS if f != "tokens")
_PACKERS = {"first_fit": grain.experimental.FirstFitPackIterDataset,
            "best_fit": grain.experimental.BestFitPackIterDataset}


def pack(examples: grain.IterDataset, *, packing: str, row_length: int, num_packing_bins: int,
         max_segments_per_row: int | None, seed: int) -> grain.IterDataset:
  """Shifted examples -> rows of `row_length` (the row contract)."""
  if packing == "none":
    return examples.map(lambda ex: pad_to_row(ex, row_length))
  packed = _PACKERS[packing](
      examples, length_struct={f: row_length for f in encode_lib.FIELDS},
      num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=True, meta_features=_META,
      max_sequences_per_bin=max_segments_per_row)
  return packed.map(_rename_packed)


def count_rows(lengths: np.ndarray, *, packing: str, row_length: int, num_packing_bins: int,
               max_segments_per_row: int | None, seed: int) -> int:
  """Rows that `pack` makes from examples of these lengths in this order.

  Runs the same grain packer over length-only stand-ins, so the count is exact by
  construction (first/best fit depend on lengths and order only).
  """
  if packing == "none":
    return len(lengths)
  stand_ins = grain.MapDataset.source(lengths).map(
      lambda n: {"tokens": np.zeros(int(n), np.int8)}).to_iter_dataset(
          grain.ReadOptions(num_threads=0))
  packed = _PACKERS[packing](
      stand_ins, length_struct={"tokens": row_length}, num_packing_bins=num_packing_bins,
      seed=seed, shuffle_bins=True, max_sequences_per_bin=max_segments_per_row)
  return sum(1 for _ in packed)


def _rename_packed(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  row = {f: packed[f] for f in encode_lib.FIELDS}
  row["segment_ids"] = packed["tokens_segment_ids"]
  row["positions"] = packed["tokens_positions"]
  return {f: np.asarray(row[f], ROW_DTYPES[f]) for f in ROW_FIELDS}


def pad_to_row(example: dict[str, np.ndarray], row_length: int) -> dict[str, np.ndarray]:
  """One example per row, padded (the paper's layout)."""
  n = len(example["tokens"])
  row = empty_row(row_length)
  for f in encode_lib.FIELDS:
    row[f][:n] = example[f]
  row["segment_ids"][:n] = 1
  row["positions"][:n] = np.arange(n)
  return row


def empty_row(row_length: int) -> dict[str, np.ndarray]:
  """An all-padding row: pads a process's epoch to the common batch count."""
  return {f: np.zeros(row_length, ROW_DTYPES[f]) for f in ROW_FIELDS}


def split_row(row: dict[str, Any]) -> list[dict[str, np.ndarray]]:
  """The examples packed in one row, in segment order (padding dropped)."""
  segment_ids = np.asarray(row["segment_ids"])
  out = []
  for segment in np.unique(segment_ids[segment_ids > 0]):
    where = segment_ids == segment
    out.append({f: np.asarray(row[f])[where] for f in ROW_FIELDS if f != "segment_ids"})
  return out
