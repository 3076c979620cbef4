"""AdamW with the paper's defaults, a weight-decay mask, clipping and warmup schedules.

Defaults follow the paper (docs/paper.md, Paper recipes): learning rate 2e-5, betas (0.9, 0.98),
eps 1e-6, weight decay 0, warmup ratio 0.03 then linear decay to 0. Gradient clipping by global
norm (1.0 by default; the paper does not state one; None or <= 0 turns it off, as the config key
does).

Weight decay (when non-zero) applies to weight matrices, *including* the token embeddings and
the output projection, as the Hugging Face Trainer / open-instruct setup the paper used does;
it is masked off norms and biases (decaying a norm scale towards 0 would shrink activations,
and biases carry no capacity worth regularising).
"""

import dataclasses
import math
from typing import Any, Literal

import jax
import optax
from flax import nnx

Decay = Literal["linear", "cosine", "constant"]

# A parameter whose path contains one of these names is never decayed.
NO_DECAY_NAMES = ("norm", "bias")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 2e-5  # the config keys' names (optim.lr, ...): errors name the key
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-6
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0  # None or <= 0: no clipping
  warmup_ratio: float = 0.03
  decay: Decay = "linear"  # after warmup, down to 0 at the last step

  def __post_init__(self):
    if not (math.isfinite(self.lr) and self.lr >= 0):
      raise ValueError(f"lr must be finite and >= 0, got {self.lr}")
    for name in ("b1", "b2"):  # AdamW's moment decay rates
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if not (math.isfinite(self.eps) and self.eps > 0):
      raise ValueError(f"eps must be finite and > 0, got {self.eps}")
    if self.max_grad_norm is not None and not math.isfinite(self.max_grad_norm):
      raise ValueError(f"max_grad_norm must be finite, got {self.max_grad_norm}")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
    if not 0.0 <= self.warmup_ratio < 1.0:
      raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
    if self.decay not in ("linear", "cosine", "constant"):
      raise ValueError(f"decay must be linear, cosine or constant, got {self.decay!r}")


def warmup_steps(config: OptimConfig, total_steps: int) -> int:
  # Rounded down, as the paper's release does: int(num_training_steps * warmup_ratio).
  return int(config.warmup_ratio * total_steps)


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer update (0-based): linear warmup from 0, then decay to 0.

  Like HF's get_linear_schedule_with_warmup, the first update has learning rate 0 when there
  is a warmup, and the rate reaches 0 at `total_steps`. `total_steps` counts updates, not
  batches: a batch with no weighted token (epoch padding) does not update (see `step.py`).
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  peak = config.lr
  warm = warmup_steps(config, total_steps)
  rest = max(total_steps - warm, 1)
  if config.decay == "linear":
    after = optax.linear_schedule(peak, 0.0, rest)
  elif config.decay == "cosine":
    after = optax.cosine_decay_schedule(peak, rest)
  else:
    after = optax.constant_schedule(peak)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)).lower())
        break
  return names


def _matrix_rank(variable: Any) -> int:
  """Rank not counting a scanned `layers` axis, so stacked norms still count as vectors."""
  axes = getattr(variable, "logical_axes", None)
  shape = variable.shape
  if axes is None:
    return len(shape)
  return sum(1 for name in axes if name != "layers")


def decay_mask(params: Any) -> Any:
  """A tree of bools like `params` (an nnx.State of Params): True where weight decay applies."""

  def decays(path, variable) -> bool:
    if any(bad in name for name in _path_names(path) for bad in NO_DECAY_NAMES):
      return False
    return _matrix_rank(variable) >= 2

  return jax.tree_util.tree_map_with_path(
      decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def update_count(opt_state: Any) -> jax.Array:
  """Updates the optimizer has applied: the count its learning-rate schedule is evaluated at."""
  counts = [s.count for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  if not counts:
    raise ValueError("the optimizer has no learning-rate schedule state")
  return counts[0]


def make_optimizer(config: OptimConfig,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ optional global-norm clipping) and its schedule, for `total_steps` updates."""
  schedule = make_schedule(config, total_steps)
  adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay, mask=decay_mask)
  if config.max_grad_norm is None or config.max_grad_norm <= 0:
    return adamw, schedule
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw), schedule
