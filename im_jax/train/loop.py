"""The training loop: steps, periodic evaluation, checkpoints, exact resume, preemption.

A run in a workdir that already has checkpoints continues from the newest readable one: the
train state (parameters, optimiser state, step, RNG) and the data position (global batches read) are
restored, so the resumed run sees the same batches and produces the same losses and
parameters as an uninterrupted one. Per-step randomness is `fold_in(rng, step)`, a pure
function of the restored state.

An update whose gradients are not finite is skipped by the step (parameters and optimiser
state untouched) and counted (`skipped_steps` in the metrics); after
`max_consecutive_skips` in a row (checked at logging steps) the run stops with
`TrainingStopped`. Parameters are checked finite before every save, so a checkpoint never
holds NaNs.

SIGTERM (a Cloud TPU preemption notice) sets a flag; at the next step boundary every process
agrees on it, a checkpoint is written by all processes together, and the loop returns.

A write that fails for lack of space or permission (a checkpoint, whose asynchronous failure
surfaces at the next save or the final wait, or a metrics record) ends the run with
`write_faults.WriteFailed`: one line naming the path, the reason and the newest intact
checkpoint, from which a rerun resumes.
"""

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from im_jax import write_faults
from im_jax.checkpoint import CheckpointConfig, CheckpointStore
from im_jax.train import loss as loss_lib
from im_jax.train import sharding
from im_jax.train.metrics_log import MetricsLogger, SinkFactory
from im_jax.train.step import LEGACY_FIELDS, TrainState, checkpointed, host_metrics

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  total_steps: int
  grad_accum: int = 1  # micro-batches per optimizer step (the batch's rows split k ways)
  log_every: int = 1
  eval_every: int = 0  # 0: evaluate only at the end (when eval data is given)
  checkpoint: CheckpointConfig = CheckpointConfig()
  # Updates skipped in a row for non-finite gradients before the run stops (see the step).
  max_consecutive_skips: int = 10

  def __post_init__(self):
    for name, low in (("total_steps", 1), ("grad_accum", 1), ("log_every", 1), ("eval_every", 0),
                      ("max_consecutive_skips", 1)):
      if getattr(self, name) < low:
        raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class StepHook:
  """An evaluation of the current state that the loop runs and logs: every `every` steps
  (0: only at the end) and at the end of the run, after its final checkpoint. `fn(state)`
  returns metrics for metrics.jsonl / TensorBoard / W&B; every process calls it (it may be
  collective), process 0 writes. The top-level wiring builds these (benchmark scores through
  lm-eval: `im_jax.run.experiment`), so the loop knows nothing of what they compute."""

  fn: Callable[[TrainState], dict[str, float]]
  every: int = 0


@dataclasses.dataclass(frozen=True)
class LoopResult:
  state: TrainState
  step: int  # train steps (batches) done; all-padding batches do not update
  preempted: bool
  resumed_from: int | None
  last_metrics: dict[str, float]
  last_eval: dict[str, float]


class ResumeMismatch(ValueError):
  """The workdir's checkpoints belong to a run with other settings."""


class TrainingStopped(RuntimeError):
  """Training cannot go on (non-finite gradients or parameters); one line for the user."""


class _SkipCounter:
  """Counts updates the step skipped; read only at logging steps (which wait anyway)."""

  def __init__(self, limit: int):
    self.limit = limit
    self.in_a_row = 0
    self._pending: list[jax.Array] = []

  def add(self, metrics: dict[str, jax.Array]) -> None:
    if "skipped" in metrics:
      self._pending.append(metrics["skipped"])

  def flush(self, step: int) -> int:
    """Skips since the last flush; raises when `limit` were skipped in a row."""
    flags = [bool(f) for f in jax.device_get(self._pending)]
    self._pending = []
    for flag in flags:
      self.in_a_row = self.in_a_row + 1 if flag else 0
      if self.in_a_row >= self.limit:
        raise TrainingStopped(
            f"stopped at step {step}: {self.in_a_row} updates in a row skipped for non-finite "
            "gradients (train.max_consecutive_skips); the checkpoints hold the last good "
            "parameters: lower optim.lr, check the data, or use float32")
    return sum(flags)


@jax.jit
def _finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(params: Any) -> bool:
  leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(np.asarray(_finite(leaves).addressable_data(0)))


# meta[RESUME_KEY]: the settings a resumed run must share with the one that saved (data,
# loss, schedule, batch, model); anything else (logging, eval, mesh shape) may change.
RESUME_KEY = "resume_key"


def resume_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """`key: saved -> now` for each resume setting that differs between two runs' metas."""
  before, after = saved.get(RESUME_KEY), now.get(RESUME_KEY)
  if before is None or after is None:
    return []
  before, after = (traverse_util.flatten_dict(t, sep=".") for t in (before, after))
  missing = "(absent)"
  return [f"{k}: {before.get(k, missing)!r} -> {after.get(k, missing)!r}"
          for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]


def check_same_run(saved: dict[str, Any], now: dict[str, Any], directory) -> None:
  """Raises ResumeMismatch, one `key: saved -> now` line per changed setting."""
  changed = resume_mismatch(saved, now)
  if changed:
    raise ResumeMismatch(
        f"{directory} holds checkpoints of a run with other settings; use a new workdir, or "
        "restore these settings to resume:\n" + "\n".join("  " + line for line in changed))


class _Preemption:
  """SIGTERM -> flag; restores the previous handler on exit (main thread only)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint at the next step boundary")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """True when any process was asked to stop (all processes must stop together).

    With several processes this is a collective that waits for the queued steps, so the
    loop asks only at logging steps, which every process reaches together.
    """
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.any(flags))


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs with the current shardings: what a restore should produce."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def evaluate(state: TrainState, eval_step: Callable, batches: Iterable[Batch],
             mesh: jax.sharding.Mesh,
             finalize: Callable[[Any], Any] = loss_lib.finalize) -> dict[str, float]:
  """Sums the eval step's loss sums over all batches, then divides once (`finalize`)."""
  total = None
  for local in batches:
    sums = eval_step(state, sharding.global_batch(local, mesh))
    total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
  if total is None:
    return {}
  return {f"eval_{k}": v for k, v in host_metrics(finalize(total)).items()}


def run(*, workdir: str, state: TrainState, train_step: Callable, mesh: jax.sharding.Mesh,
        train_batches: Any, config: LoopConfig, meta: dict[str, Any],
        eval_step: Callable | None = None,
        eval_batches: Callable[[], Iterable[Batch]] | None = None,
        eval_finalize: Callable[[Any], Any] = loss_lib.finalize,
        logger: MetricsLogger | None = None, hooks: Sequence[StepHook] = (),
        sinks: Sequence[SinkFactory] = ()) -> LoopResult:
  """Trains until `config.total_steps`, resuming from `workdir`'s checkpoints if any.

  Args:
    state: a freshly created (sharded) train state; replaced by the checkpoint if one exists.
    train_step: `step(state, global_batch) -> (state, metrics)` (see `step.make_train_step`).
    train_batches: a grain dataset (or anything whose `iter()` has `get_state/set_state`)
      yielding this process's rows for one optimizer step: `[rows, T]` numpy arrays.
    meta: JSON-able run description stored with every checkpoint (config, model config).
    eval_batches: returns a fresh iterable of this process's held-out batches.
    eval_finalize: summed eval sums -> metrics (`eval.loss_eval.finalize` for the eval
      step built from `eval.loss_eval.make_eval_loss_fn`).
    hooks: further evaluations to run and log (`StepHook`).
    sinks: further destinations of the metrics (`metrics_log.SinkFactory`: W&B), built by the
      top of the program.
  """
  store = CheckpointStore(workdir, config.checkpoint)
  iterator = iter(train_batches)
  restored = store.restore_latest(abstract_like(checkpointed(state)), data_iterator=iterator,
                                  ignored_fields=LEGACY_FIELDS)
  start = 0
  if restored is not None:
    check_same_run(restored.meta, meta, store.directory)
    # Checkpoints hold neither `frozen` (LoRA's base weights) nor the KL reference: this start
    # loaded both from model.init_from (the store reported damaged checkpoints).
    state, start = state.replace(**restored.state), restored.step
    log.info("resumed from checkpoint %d in %s", start, store.directory)
  own_logger = logger is None
  last_metrics: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  preempted = False
  step = start
  saved = start if restored is not None else -1  # the newest step saved (or being saved)
  skips = _SkipCounter(config.max_consecutive_skips)

  saving = None  # the newest step whose save was started: what a pathless write error names

  def save(force: bool = False) -> bool:
    nonlocal saving
    if not force and step % config.checkpoint.every_steps:
      return False
    if not _all_finite(state.params):
      raise TrainingStopped(f"stopped at step {step}: the parameters are not finite; not saving "
                            f"them (the newest checkpoint is step {saved})")
    saving = step
    return store.save(step, checkpointed(state), iterator.get_state(), meta, force=True)

  def run_eval() -> None:
    nonlocal last_eval
    if eval_step is not None and eval_batches is not None:
      last_eval = evaluate(state, eval_step, eval_batches(), mesh, eval_finalize)
      if last_eval:
        logger.write({"step": step, **last_eval})

  def run_hook(hook: StepHook) -> None:
    metrics = hook.fn(state)
    if metrics:
      logger.write({"step": step, **metrics})

  closed = False
  try:
    if own_logger:
      logger = MetricsLogger(workdir, total_steps=config.total_steps, start_step=start,
                             sinks=sinks, run_config=meta.get("config"))
    with _Preemption() as preemption:
      # Throughput over each logging interval: steps are dispatched asynchronously, so
      # only the wall time between two synchronising log points is honest.
      interval_tokens, interval_start = 0, time.perf_counter()
      while step < config.total_steps:
        local = _next_batch(iterator, step)
        # Non-padding tokens; every process holds an equal share of the rows.
        interval_tokens += int(np.count_nonzero(local["segment_ids"])) * jax.process_count()
        state, metrics = train_step(
            state, sharding.global_batch(local, mesh, micro_batches=config.grad_accum))
        step += 1
        skips.add(metrics)
        if step % config.log_every == 0 or step == config.total_steps:
          last_metrics = host_metrics(metrics)  # waits for the step
          last_metrics.pop("skipped", None)  # this step's flag; the interval's count instead
          last_metrics["skipped_steps"] = skips.flush(step)
          now = time.perf_counter()
          logger.write({"step": step, **last_metrics, "tokens": interval_tokens,
                        "tokens_per_sec": interval_tokens / max(now - interval_start, 1e-9)})
          interval_tokens, interval_start = 0, now
        if config.eval_every and step % config.eval_every == 0 and step < config.total_steps:
          run_eval()
        for hook in hooks:
          if hook.every and step % hook.every == 0 and step < config.total_steps:
            run_hook(hook)
        if (jax.process_count() == 1 or step % config.log_every == 0) and preemption.agreed():
          save(force=True)
          store.wait()
          log.warning("preempted: checkpoint %d written, stopping", step)
          preempted = True
          break
        if save():
          saved = step
      if not preempted:
        run_eval()
        if saved != step:
          save(force=True)
        for hook in hooks:
          run_hook(hook)
      store.wait()  # inside the try: an asynchronous save's failure surfaces here
    closed = True
    _close(store, logger if own_logger else None)  # their failures are write failures too
  except Exception as e:  # a full disk (or read-only, over quota): one line, what is safe
    if not closed:  # a failed save raises again on close: keep the first error
      _close(store, logger if own_logger else None, quietly=True)
    failure = _write_failure(e, store, saving)
    if failure is None:
      raise
    raise failure from e
  except BaseException:  # KeyboardInterrupt
    if not closed:
      _close(store, logger if own_logger else None, quietly=True)
    raise
  return LoopResult(state=state, step=step, preempted=preempted,
                    resumed_from=None if restored is None else restored.step,
                    last_metrics=last_metrics, last_eval=last_eval)


def _close(store: CheckpointStore, logger: MetricsLogger | None, quietly: bool = False) -> None:
  """Closes the store (waiting for its saves), then the logger, even when the first fails;
  raises the first failure unless `quietly` (after another error, which is the one to say)."""
  first = None
  for close in (store.close, logger.close if logger is not None else None):
    try:
      if close is not None:
        close()
    except Exception as e:  # noqa: BLE001
      first = first or e
  if first is not None and not quietly:
    raise first


def _write_failure(error: Exception, store: CheckpointStore,
                   saving: int | None) -> write_faults.WriteFailed | None:
  """A write failure (checkpoint, metrics) as one line naming the newest intact checkpoint;
  None for any other error. The metrics writers name their files; an error that names none
  comes from a checkpoint's writers (grain's data position, say): it names step `saving`."""
  failure = write_faults.find(error)
  if failure is None:
    return None
  try:
    steps = store.steps()  # complete steps only: Orbax renames a step into place when whole
  except Exception:  # noqa: BLE001 - the store's own state may be broken by the failure
    steps = []
  path = None
  if not failure.path and saving is not None and saving not in steps:
    path = f"{store.directory}/{saving}"
  if steps:
    return write_faults.failed_write(error, safe=f"checkpoint {steps[-1]} is intact",
                                     rerun="the same command to resume", path=path)
  return write_faults.failed_write(error, safe="no checkpoint was complete yet",
                                   rerun="the same command to start again", path=path)


def _next_batch(iterator: Iterator[Batch], step: int) -> Batch:
  try:
    return next(iterator)
  except StopIteration:
    raise TrainingStopped(
        f"the data ran out before step {step + 1}: the pipeline must yield at least "
        "total_steps batches (raise data epochs or lower train.max_steps)") from None
