"""Paired differences with bootstrap confidence intervals.

Every comparison pairs the same examples under two models (IT and IM see the same held-out
examples), so the differences per example are resampled, not the two means separately:
that removes the example-to-example spread both models share.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  mean: float  # mean over examples of a - b
  low: float  # the bootstrap interval of that mean
  high: float
  examples: int
  positive_fraction: float  # share of examples where a > b

  @property
  def excludes_zero(self) -> bool:
    return self.low > 0 or self.high < 0

  def as_dict(self) -> dict[str, float | int | bool]:
    return {**dataclasses.asdict(self), "excludes_zero": self.excludes_zero}


def paired_difference(a: Sequence[float | None], b: Sequence[float | None],
                      resamples: int = RESAMPLES, level: float = LEVEL,
                      seed: int = 0) -> PairedDifference:
  """Mean of a - b over the examples both have, with a percentile bootstrap interval."""
  if len(a) != len(b):
    raise ValueError(f"paired lists differ in length: {len(a)} vs {len(b)}")
  diffs = np.array([x - y for x, y in zip(a, b) if x is not None and y is not None], float)
  if diffs.size == 0:
    raise ValueError("no example has both values")
  rng = np.random.default_rng(seed)
  means = diffs[rng.integers(0, diffs.size, (resamples, diffs.size))].mean(axis=1)
  tail = (1 - level) / 2 * 100
  low, high = np.percentile(means, [tail, 100 - tail])
  return PairedDifference(float(diffs.mean()), float(low), float(high), int(diffs.size),
                          float(np.mean(diffs > 0)))
