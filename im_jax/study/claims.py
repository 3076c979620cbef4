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
