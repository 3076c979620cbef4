"""Paired differences with bootstrap confidence intervals, robust readings, runs, Holm.

Every comparison pairs the same examples under two models (IT and IM see the same held-out
examples), so the differences per example are resampled, not the two means separately:
that removes the example-to-example spread both models share. Beside the mean, the median,
a trimmed mean and the sign test say whether a result rests on a few examples; across runs,
the unit is a training run.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

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


TRIM = 0.2  # the trimmed mean cuts this share from each end


@dataclasses.dataclass(frozen=True)
class RobustDifference:
  """Paired differences a - b read four ways: the mean, the median and the 20% trimmed mean,
  each with a percentile bootstrap interval (the same resamples for all three), and the
  exact two-sided sign test (ties left out). One outlier moves the mean, not the others."""
  examples: int
  mean: float
  mean_low: float
  mean_high: float
  median: float
  median_low: float
  median_high: float
  trimmed_mean: float
  trimmed_low: float
  trimmed_high: float
  positive_fraction: float  # share of examples where a > b
  negative_fraction: float
  sign_p: float  # exact two-sided binomial test of positives vs negatives

  def as_dict(self) -> dict[str, float | int]:
    return dataclasses.asdict(self)


def sign_test(diffs: np.ndarray) -> float:
  """Exact two-sided sign test of the differences' signs (zeros dropped); 1.0 with none."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  positive, negative = int(np.sum(diffs > 0)), int(np.sum(diffs < 0))
  if positive + negative == 0:
    return 1.0
  return float(stats.binomtest(positive, positive + negative, 0.5).pvalue)


def robust_difference(diffs: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                      seed: int = 0) -> RobustDifference:
  from scipy import stats  # pylint: disable=g-import-not-at-top

  diffs = np.asarray(diffs, float)
  if diffs.size == 0:
    raise ValueError("no example has both values")
  rng = np.random.default_rng(seed)
  samples = diffs[rng.integers(0, diffs.size, (resamples, diffs.size))]
  tail = (1 - level) / 2 * 100

  def interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)

  return RobustDifference(
      int(diffs.size), float(diffs.mean()), *interval(samples.mean(axis=1)),
      float(np.median(diffs)), *interval(np.median(samples, axis=1)),
      float(stats.trim_mean(diffs, TRIM)), *interval(stats.trim_mean(samples, TRIM, axis=1)),
      float(np.mean(diffs > 0)), float(np.mean(diffs < 0)), sign_test(diffs))


@dataclasses.dataclass(frozen=True)
class AcrossRuns:
  """One value per training run: their mean and spread, a t-interval and the exact sign test
  over runs (with 3 runs the smallest two-sided p is 0.25: consistency, not significance)."""
  values: tuple[float, ...]
  mean: float
  sd: float
  low: float
  high: float
  sign_p: float

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "values": list(self.values)}


def across_runs(values: Sequence[float], level: float = LEVEL) -> AcrossRuns:
  from scipy import stats  # pylint: disable=g-import-not-at-top

  x = np.asarray(values, float)
  if x.size < 2:
    raise ValueError(f"an across-run interval needs 2 runs or more, got {x.size}")
  sd = float(x.std(ddof=1))
  half = float(stats.t.ppf((1 + level) / 2, x.size - 1)) * sd / np.sqrt(x.size)
  return AcrossRuns(tuple(float(v) for v in x), float(x.mean()), sd, float(x.mean() - half),
                    float(x.mean() + half), sign_test(x))


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values (family-wise error), in the order given."""
  p = np.asarray(pvalues, float)
  order = np.argsort(p, kind="stable")
  adjusted = np.empty_like(p)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (p.size - rank) * p[i]))
    adjusted[i] = running
  return [float(v) for v in adjusted]
