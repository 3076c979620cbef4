"""The cpu budget rule: subset sizes from SmolLM2's measured training speed.

Rule (fixed before any result): measure training tokens/s on this machine with a short run
of the real model (`probe` in the runner), count the tokens each planned run trains on
(examples x epochs, cut at max_seq_len) and the forward passes of its evaluations (a forward
token costs about a third of a training token; a generated token about as much as a training
token, decoding one token per row at a time), and scale every subset size by one factor so
the whole study fits `BUDGET_SECONDS` (2 hours of a 2-core machine: the issue allows up to 3,
and a 3-hour work session must also hold the report), keeping a fifth of it for compilation,
loading and everything the estimate leaves out. Sizes only shrink; the
held-out sets never change.
"""

import dataclasses
from collections.abc import Sequence

from im_jax.study import runs as runs_lib
from im_jax.study import scales

BUDGET_SECONDS = 2 * 3600
SAFETY = 0.8  # the share of the budget the estimate may fill
FORWARD_COST = 1 / 3  # an evaluation token vs a training token
MIN_SIZE = 16


def estimate_seconds(scale: scales.Scale, runs: Sequence[runs_lib.Run],
                     tokens_per_example: float, datasets: int, tokens_per_sec: float) -> float:
  """Estimated wall time of the study's training and evaluation."""
  epochs = scale.overrides.get("train.epochs", 2)
  train = sum(r.subset.size for r in runs) * epochs * tokens_per_example
  evals = 0.0
  for r in runs:
    held = scale.held_out * (datasets if "overfitting" in r.experiments else 1)
    evals += (held * epochs + scale.train_eval) * tokens_per_example * FORWARD_COST
    if "memorisation" in r.experiments:
      evals += scale.generations * scale.max_new_tokens
  baseline = scale.held_out * datasets * tokens_per_example * FORWARD_COST
  return (train + evals + baseline) / tokens_per_sec


def _scaled(scale: scales.Scale, factor: float) -> scales.Scale:
  def size(n: int, floor: int = MIN_SIZE) -> int:
    return max(floor, int(n * factor) // 8 * 8)

  # The i-th data size never drops below MIN_SIZE * 2**i: the sizes stay distinct.
  sizes = tuple(size(n, MIN_SIZE * 2**i) for i, n in enumerate(sorted(scale.sizes)))
  return dataclasses.replace(scale, overfit_size=max(size(scale.overfit_size), sizes[-1]),
                             sizes=sizes, ratio_size=size(scale.ratio_size))


def fit(scale: scales.Scale, tokens_per_example: float, tokens_per_sec: float,
        budget_seconds: float = BUDGET_SECONDS) -> tuple[scales.Scale, dict[str, float]]:
  """The scale with every subset size scaled by the largest factor <= 1 (to 1/64) whose
  estimate fits SAFETY x the budget; a ValueError when even the smallest sizes do not."""

  def estimate(factor: float) -> float:
    fitted = _scaled(scale, factor)
    return estimate_seconds(fitted, runs_lib.make_plan(fitted), tokens_per_example, 3,
                            tokens_per_sec)

  target = SAFETY * budget_seconds
  low, high = 0.0, 1.0
  if estimate(high) > target:
    if estimate(low) > target:
      raise ValueError(f"at {tokens_per_sec:.0f} tokens/s the smallest study takes about "
                       f"{estimate(low) / 3600:.1f} h, over the {target / 3600:.1f} h "
                       f"({SAFETY:.0%} of the {budget_seconds / 3600:.1f} h budget) the cpu "
                       "scale plans for")
    for _ in range(6):  # estimate grows with the factor: bisect
      middle = (low + high) / 2
      low, high = (middle, high) if estimate(middle) <= target else (low, middle)
    high = low
  return _scaled(scale, high), {
      "tokens_per_sec": tokens_per_sec, "tokens_per_example": tokens_per_example,
      "budget_seconds": budget_seconds, "estimate_at_full_size": estimate(1.0),
      "factor": high, "estimate_seconds": estimate(high)}


# The second edition's rule (docs/study_plan.md, "The pilot and the sizing rule").
REPLICATED_BUDGET_SECONDS = 5.5 * 3600  # of the 6 CPU-hours the issue allows
RUN_LIMIT_SECONDS = 45 * 60
GENERATION_SECONDS = 10 * 60


def pilot_decision(it: dict, im: dict, runs: int, epochs: int, size: int) -> dict:
  """What the pilot pair (replica 0's IT and IM results) says the edition should run: `size`
  examples per subset when `runs` runs of the pair's mean wall time fit the budget, else
  32; twice the epochs (20) when IT's held-out loss did not turn upward, within the same
  rule (the size drops to 32 first)."""
  t = it["seconds"] + im["seconds"]
  per_run = t / 2
  means = [e["held_out_output_loss"] for e in it["epochs"]]
  it_best = 1 + min(range(len(means)), key=means.__getitem__)  # the untrained model aside
  overfits = it_best < len(means)
  new_epochs = epochs if overfits else 2 * epochs
  scale_time = new_epochs / epochs  # a run's time grows with its epochs

  def fits(n: int) -> bool:
    run = per_run * scale_time * n / size
    return (runs * run + GENERATION_SECONDS <= REPLICATED_BUDGET_SECONDS
            and run <= RUN_LIMIT_SECONDS)

  new_size = size if fits(size) else 32
  fitting = fits(new_size)
  run_estimate = per_run * scale_time * new_size / size
  return {"pilot_seconds": [it["seconds"], im["seconds"]], "t": t,
          "estimate_seconds": runs * run_estimate + GENERATION_SECONDS,
          "run_estimate_seconds": run_estimate,
          "budget_seconds": REPLICATED_BUDGET_SECONDS, "run_limit_seconds": RUN_LIMIT_SECONDS,
          "tokens_per_sec": [it.get("tokens_per_sec"), im.get("tokens_per_sec")],
          "it_held_out_by_epoch": means, "it_best_epoch": it_best, "it_overfits": overfits,
          "size": new_size, "epochs": new_epochs,
          "fits_in_budget": fitting,
          # a design that does not fit is no decision: the plan has to change (the study stops)
          "decision": ("keep the design" if (new_size, new_epochs) == (size, epochs) and fitting
                       else f"{new_size} examples per subset, {new_epochs} epochs"
                       + ("" if fitting else ": over the budget or the 45-minute run limit"))}
