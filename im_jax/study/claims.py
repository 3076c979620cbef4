"""The paper's claims, each judged from the measured intervals, never from a threshold of
our choosing: a claim is "reproduced" when its 95% interval lies on the paper's side of 0,
"opposite" when it lies on the other side, and "within noise" when it contains 0. Fewer than
MIN_EXAMPLES paired examples give "too few examples": a bootstrap over one example is a point
(its interval cannot contain 0), and over a handful it undercovers.

Differences are IT minus IM per held-out example, so the paper expects:
  - train output loss: IM higher (IT - IM < 0 on the training examples);
  - held-out output loss: IM lower (IT - IM > 0);
  - memorisation: IM's generations copy the training outputs less (IT - IM BLEU > 0);
  - the gain grows with the length ratio: gain(high) - gain(low) > 0, example by example on
    the shared held-out set;
  - the gain shrinks with more examples: gain(smallest) - gain(largest) > 0, likewise.
"""

from typing import Any

from im_jax.study import statistics


MIN_EXAMPLES = 10
VERDICTS = ("reproduced", "within noise", "opposite", "too few examples")


def _verdict(diff: dict[str, Any], expected_sign: int) -> str:
  if diff["examples"] < MIN_EXAMPLES:
    return "too few examples"
  if diff["low"] <= 0 <= diff["high"]:
    return "within noise"
  return "reproduced" if (diff["mean"] > 0) == (expected_sign > 0) else "opposite"


def _measured(diff: dict[str, Any]) -> str:
  return f"{diff['mean']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}] (n={diff['examples']})"


def verdicts(analysis: dict[str, Any]) -> list[dict[str, str]]:
  out = []

  def add(claim: str, diff: dict[str, Any], sign: int) -> None:
    out.append({"claim": claim, "measured": _measured(diff), "verdict": _verdict(diff, sign)})

  for dataset, entry in analysis["overfitting"].items():
    paired = entry["paired"].get("im")
    if paired is None:
      continue
    add(f"{entry['subset']}: IM's train output loss is higher (IT - IM < 0)",
        paired["train"], -1)
    add(f"{entry['subset']}: IM's held-out output loss is lower (IT - IM > 0)",
        paired["held_out"][dataset], +1)
  seed = analysis.get("second_seed")
  if seed:
    add(f"{seed['subset']} (seed {seed['seed']}): IM's train output loss is higher "
        "(IT - IM < 0)", seed["train"], -1)
    add(f"{seed['subset']} (seed {seed['seed']}): IM's held-out output loss is lower "
        "(IT - IM > 0)", seed["held_out"], +1)
  for key, m in analysis["memorisation"].items():
    if key.endswith(":im") and "paired_vs_it" in m:
      add(f"{key.split(':')[0]}: IM's generations copy the training outputs less "
          "(IT - IM sentence BLEU > 0)", m["paired_vs_it"]["sentence_bleu"], +1)
  for key, claim, first, last in (
      ("length_ratio", "the gain grows with the length ratio (gain high - gain low > 0)", -1, 0),
      ("data_size", "the gain shrinks with more examples (gain smallest - gain largest > 0)",
       0, -1)):
    rows = analysis[key]
    if len(rows) >= 2:
      diff = statistics.paired_difference(rows[first]["gain_per_example"],
                                          rows[last]["gain_per_example"]).as_dict()
      add(claim, diff, +1)
  return out


# The second edition's rule (docs/study_plan.md, "The verdict rule").
ALPHA = 0.05
DEPENDS = "depends on the statistic"
NOT_ACROSS_RUNS = "reproduced per example, not across runs"


def mean_reading(diff: dict[str, Any], expected_sign: int) -> str:
  """From the bootstrap interval of the mean."""
  if diff["mean_low"] <= 0 <= diff["mean_high"]:
    return "within noise"
  return "reproduced" if (diff["mean"] > 0) == (expected_sign > 0) else "opposite"


def robust_reading(diff: dict[str, Any], expected_sign: int, holm_p: float) -> str:
  """From the Holm-corrected sign test, read in the direction of the median (of the sign
  majority where the median is 0)."""
  if holm_p >= ALPHA:
    return "within noise"
  direction = diff["median"] or (diff["positive_fraction"] - diff["negative_fraction"])
  return "reproduced" if (direction > 0) == (expected_sign > 0) else "opposite"


def robust_verdict(diff: dict[str, Any], expected_sign: int, holm_p: float,
                   runs: dict[str, Any] | None = None) -> str:
  """The plan's verdict: both readings when they agree, else "depends on the statistic"; a
  per-example "reproduced" that runs do not all share (or whose t-interval holds 0) says so."""
  if diff["examples"] < MIN_EXAMPLES:
    return "too few examples"
  by_mean, by_sign = mean_reading(diff, expected_sign), robust_reading(diff, expected_sign,
                                                                       holm_p)
  if by_mean != by_sign:
    return DEPENDS
  if by_mean == "reproduced" and runs is not None:
    same_side = all((v > 0) == (expected_sign > 0) and v != 0 for v in runs["values"])
    if not same_side or runs["low"] <= 0 <= runs["high"]:
      return NOT_ACROSS_RUNS
  return by_mean
