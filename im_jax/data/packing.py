"""Rows of the data -> train contract: which examples share a row, and the row itself.

A row (see docs/design.md) has `max_seq_len` slots of six aligned fields: `tokens`,
`targets`, `loss_weights`, `target_kinds`, `segment_ids` (1.. per example, 0 = padding) and
`positions` (0.. within each example). Examples are shifted before packing, so a segment never
predicts across its boundary, and padding is all zeros: weight 0, kind PAD.

`plan_rows` decides the rows from lengths alone (the data plan), before any example is
encoded for training; `pack_row` builds one row from its encoded examples when it is read.
The packing modes keep the meaning grain's packers gave them: up to `num_packing_bins` rows
are open at once; `first_fit` puts an example into the first open row it fits (tokens and
`max_segments_per_row`), `best_fit` into the fullest one it fits; an example that fits none
closes every open row (in the order they were opened) and opens the next round. `none`: one
example per row (the paper's layout).
"""

import numpy as np

from im_jax.data import encode as encode_lib

PACKING = ("first_fit", "best_fit", "none")
ROW_FIELDS = encode_lib.FIELDS + ("segment_ids", "positions")
ROW_DTYPES = {**encode_lib.FIELD_DTYPES, "segment_ids": np.int32, "positions": np.int32}
SOURCE_IDS = "source_ids"  # int32, only in rows of a mixture of several sources (pack_row)


def plan_rows(lengths: np.ndarray, *, packing: str, row_length: int, num_packing_bins: int,
              max_segments_per_row: int | None) -> tuple[np.ndarray, np.ndarray]:
  """(order, starts): row r holds the examples at positions `order[starts[r]:starts[r+1]]`
  of `lengths` (each <= row_length), in that order. Deterministic: lengths and order only."""
  n = len(lengths)
  if packing == "none":
    return np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64)
  if packing not in PACKING:
    raise ValueError(f"packing must be one of {PACKING}, got {packing!r}")
  bins = num_packing_bins
  most = max_segments_per_row or n + 1
  free = np.zeros(bins, np.int64)  # room left in each open row
  count = np.zeros(bins, np.int64)  # examples in each open row
  members: list[list[int]] = [[] for _ in range(bins)]
  opened = 0
  rows: list[list[int]] = []
  best = packing == "best_fit"
  for position, length in enumerate(np.asarray(lengths).tolist()):
    fits = (free[:opened] >= length) & (count[:opened] < most)
    if fits.any():
      choice = (int(np.argmin(np.where(fits, free[:opened], row_length + 1))) if best
                else int(fits.argmax()))
    else:
      if opened == bins:  # a full round: close every open row
        rows.extend(members)
        members = [[] for _ in range(bins)]
        count[:] = 0
        opened = 0
      choice, opened = opened, opened + 1
      free[choice] = row_length
    free[choice] -= length
    count[choice] += 1
    members[choice].append(position)
  rows.extend(members[:opened])
  order = np.fromiter((p for row in rows for p in row), np.int64, n)
  starts = np.zeros(len(rows) + 1, np.int64)
  np.cumsum([len(row) for row in rows], out=starts[1:])
  return order, starts


def pack_row(examples: list[dict[str, np.ndarray]], row_length: int,
             sources: list[int] | None = None) -> dict[str, np.ndarray]:
  """Shifted examples side by side in one row of `row_length` (the row contract).

  `sources` (a mixture of several sources): each example's 1-based source, written to every
  position of it as the optional `source_ids` field (0 on padding) for per-source metrics.
  """
  row = empty_row(row_length)
  if sources is not None:
    row[SOURCE_IDS] = np.zeros(row_length, np.int32)
  at = 0
  for segment, example in enumerate(examples, start=1):
    n = len(example["tokens"])
    if at + n > row_length:
      raise ValueError(f"examples of {at + n} positions do not fit a row of {row_length}")
    for f in encode_lib.FIELDS:
      row[f][at:at + n] = example[f]
    row["segment_ids"][at:at + n] = segment
    row["positions"][at:at + n] = np.arange(n)
    if sources is not None:
      row[SOURCE_IDS][at:at + n] = sources[segment - 1]
    at += n
  return row


def pad_to_row(example: dict[str, np.ndarray], row_length: int) -> dict[str, np.ndarray]:
  """One example per row, padded (the paper's layout)."""
  return pack_row([example], row_length)


def empty_row(row_length: int) -> dict[str, np.ndarray]:
  """An all-padding row: pads an epoch to whole global batches."""
  return {f: np.zeros(row_length, ROW_DTYPES[f]) for f in ROW_FIELDS}


def split_row(row: dict) -> list[dict[str, np.ndarray]]:
  """The examples packed in one row, in segment order (padding dropped)."""
  segment_ids = np.asarray(row["segment_ids"])
  out = []
  for segment in np.unique(segment_ids[segment_ids > 0]):
    where = segment_ids == segment
    out.append({f: np.asarray(row[f])[where] for f in ROW_FIELDS if f != "segment_ids"})
  return out
