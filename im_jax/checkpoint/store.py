"""A checkpoint store for training runs, on top of `ocp.CheckpointManager`.

Each checkpoint `WORKDIR/checkpoints/<step>/` holds three items:
- `state`: any pytree of (sharded) jax arrays: parameters, optimiser state, step, RNG key data;
- `data`: the data iterator's position, one JSON file per JAX process (`process_i-of-N.json`);
  read here, so an iterator whose positions do not depend on N restores on any process count;
- `meta`: a JSON object (the run config, the model config, ...).

Orbax writes each save into a temporary folder and renames it when complete, so an interrupted
save never shows up as a step. A finished checkpoint can still be damaged later (a truncated
copy, a lost file, an emptied folder): `restore_latest` falls back to the previous one and
moves the damaged folder aside to `WORKDIR/damaged_checkpoints/<step>` (never deleted: a
person may want to look at it), so the resumed run can save that step again.

The workdir may be a `gs://` folder (`im_jax.paths`): orbax then writes each step straight
into its final folder and marks it complete with a `commit_success.txt` object (no rename
in a bucket), so a save cut short leaves a step folder without it, which restore treats as
an unfinished save and moves aside like a damaged one.
"""

import dataclasses
import json
import logging
import pathlib
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from im_jax import paths

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"
DAMAGED_DIR = "damaged_checkpoints"  # next to checkpoints/, where damaged steps are moved


class UnreadableCheckpoints(RuntimeError):
  """Every checkpoint of a workdir is damaged; one line for the user."""


class ProcessCountChanged(ValueError):
  """A healthy checkpoint whose data position is tied to another process count (not damage:
  nothing is moved); one line for the user."""


def saved_data_state(step_dir: pathlib.Path) -> tuple[int, Any] | None:
  """(processes that wrote it, process 0's data position) of a step folder; None if it has
  no data positions. Raises OSError/ValueError when they do not read."""
  files = sorted((step_dir / DATA).glob("process_*-of-*.json")) if (step_dir / DATA).is_dir() \
      else []
  if not files:
    return None
  count = int(files[0].stem.rsplit("-of-", 1)[1])
  return count, json.loads((step_dir / DATA / f"process_0-of-{count}.json").read_text())


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 500
  keep: int = 3  # the newest K are kept
  async_save: bool = True

  def __post_init__(self):
    for name in ("every_steps", "keep"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  state: Any
  meta: dict
  skipped: tuple[tuple[int, str], ...] = ()  # (step, reason) of damaged newer checkpoints
  moved: tuple[str, ...] = ()  # where those were moved (by process 0)
  data_state: Any = None  # the saved iterator position, set on the iterator by restore_latest


class _IteratorSnapshot:
  """The iterator position taken when `save` is called.

  grain's handler reads `get_state()` when it writes, which under async saving happens after
  training has moved the iterator on; a snapshot pins the position to the saved step.
  """

  def __init__(self, state: dict):
    self._encoded = json.dumps(state, indent=2).encode()

  def get_state(self) -> bytes:
    return self._encoded


class CheckpointStore:
  """Saves every `every_steps` steps (or when forced), keeps the newest `keep`."""

  def __init__(self, workdir: str | pathlib.Path, config: CheckpointConfig = CheckpointConfig()):
    workdir = paths.path(workdir)
    self.directory = (workdir if paths.is_remote(workdir) else workdir.absolute()) / "checkpoints"
    self.config = config
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep,
        save_interval_steps=config.every_steps,
        enable_async_checkpointing=config.async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            STATE: ocp.StandardCheckpointHandler(),
            DATA: grain.checkpoint.CheckpointHandler(),
            META: ocp.JsonCheckpointHandler(),
        },
    )

  def steps(self) -> list[int]:
    self._manager.reload()  # what is on disk now (another process may have saved)
    return sorted(self._manager.all_steps())

  def _step_folders(self) -> list[int]:
    """Every `<step>` folder, complete or not (an emptied one is no orbax step)."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir()
                  if p.name.isdigit() and p.is_dir())

  def save(self, step: int, state: Any, data_state: dict | None, meta: dict,
           force: bool = False) -> bool:
    """Starts saving `step` if it is due (or `force`); returns whether it did."""
    # Decided here, not by orbax, whose manager also saves whenever it has no checkpoint yet
    # (step 1 of every run: a full-model write nobody asked for).
    if not force and step % self.config.every_steps:
      return False
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    if data_state is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def restore_latest(self, abstract_state: Any, data_iterator=None,
                     ignored_fields: tuple[str, ...] = ()) -> Restored | None:
    """Restores the newest readable checkpoint, moving damaged newer ones aside.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with the shardings wanted now,
    so a checkpoint written on another mesh shape is re-sharded on restore. If
    `data_iterator` is given its position is restored in place.
    `ignored_fields`: top-level keys an older layout of a dict state stored and this one no
    longer restores; a checkpoint holding them (and otherwise the fields asked for) restores
    without reading them.
    Returns None when there is no checkpoint at all. Raises if every one is damaged, and
    then moves nothing: starting over is the user's decision. A checkpoint written by another
    number of processes is restored when the iterator says its positions do not depend on it
    (`data_iterator.elastic`), else refused with `ProcessCountChanged`; a position the
    iterator refuses (`set_state` raises) is refused as it says: neither is damage.
    """
    complete = set(self.steps())
    skipped = []
    for step in reversed(self._step_folders()):
      if step not in complete:
        reason = "not a complete checkpoint (files missing)"
      else:
        self._check_process_count(step, data_iterator)
        reason = self._try_restore(step, abstract_state, data_iterator, ignored_fields)
        if isinstance(reason, Restored):
          if data_iterator is not None:
            data_iterator.set_state(reason.data_state)
          moved = self._move_aside(skipped)
          return dataclasses.replace(reason, skipped=tuple(skipped), moved=tuple(moved))
      skipped.append((step, reason))
    if skipped:
      raise UnreadableCheckpoints(
          f"no readable checkpoint in {self.directory} ("
          + "; ".join(f"step {s}: {r}" for s, r in skipped)
          + "): move the folder away to start over")
    return None

  def _check_process_count(self, step: int, data_iterator) -> None:
    if data_iterator is None or getattr(data_iterator, "elastic", False):
      return
    try:
      saved = saved_data_state(self.directory / str(step))
    except (OSError, ValueError):
      return  # unreadable: the restore reports it as damage
    if saved is not None and saved[0] != jax.process_count():
      raise ProcessCountChanged(
          f"checkpoint {step} in {self.directory} was written by {saved[0]} process(es) and "
          f"this run has {jax.process_count()}: its data position is tied to the process "
          f"count; rerun with {saved[0]} processes (nothing was moved)")

  def _try_restore(self, step: int, abstract_state: Any, data_iterator,
                   ignored_fields: tuple[str, ...]) -> Restored | str:
    """The restored checkpoint, or why it cannot be read (the same on every process)."""
    try:
      restored = self._restore_step(step, abstract_state, data_iterator, ignored_fields)
      reason = ""
    except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
      restored, reason = None, f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if jax.process_count() > 1:  # damage one process sees is damage for all
      failed = multihost_utils.process_allgather(np.asarray(restored is None, np.int32))
      if np.any(failed) and restored is not None:
        restored, reason = None, "unreadable on another process"
    return restored if restored is not None else reason

  def _move_aside(self, damaged: list[tuple[int, str]]) -> list[str]:
    """Renames damaged step folders into WORKDIR/damaged_checkpoints/ (process 0)."""
    moved = []
    if damaged and jax.process_index() == 0:
      target_root = self.directory.parent / DAMAGED_DIR
      target_root.mkdir(exist_ok=True)
      for step, reason in damaged:
        target, n = target_root / str(step), 1
        while target.exists():  # damaged twice: keep both
          target, n = target_root / f"{step}.{n}", n + 1
        paths.move(self.directory / str(step), target)
        log.warning("checkpoint %d is damaged (%s): moved to %s, resuming from an older one",
                    step, reason, target)
        moved.append(str(target))
    if damaged:
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("checkpoint_move_aside")
      self._manager.reload()
    return moved

  def _restore_step(self, step: int, abstract_state: Any, data_iterator,
                    ignored_fields: tuple[str, ...] = ()) -> Restored:
    step_dir = self.directory / str(step)
    if not (step_dir / META).is_dir():
      raise FileNotFoundError(f"{step_dir / META} is missing")
    items = {META: ocp.args.JsonRestore()}
    partial = self._holds_only_extra(step, abstract_state, ignored_fields)
    if not partial:
      items[STATE] = ocp.args.StandardRestore(abstract_state)
    data_state = None
    if data_iterator is not None:
      # Read here rather than by grain's handler, which reads only this process count's file.
      saved = saved_data_state(step_dir)
      if saved is None:
        raise FileNotFoundError(f"{step_dir / DATA} is missing")
      count, data_state = saved
      if count == jax.process_count():
        data_state = json.loads(
            (step_dir / DATA / f"process_{jax.process_index()}-of-{count}.json").read_text())
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    if partial:
      # The standard handler restores whole trees only; the pytree handler underneath it
      # (same files) can leave the ignored fields unread.
      args = ocp.args.PyTreeRestore(
          item=abstract_state, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
      with ocp.PyTreeCheckpointer() as checkpointer:
        state = checkpointer.restore(step_dir / STATE, args=args)
    else:
      state = out[STATE]
    # Orbax restores lazily in places; touch every array so damage surfaces here.
    jax.block_until_ready(state)
    return Restored(step=step, state=state, meta=dict(out[META]), data_state=data_state)

  def _holds_only_extra(self, step: int, abstract_state: Any,
                        ignored_fields: tuple[str, ...]) -> bool:
    """Whether step's state holds every field of `abstract_state` plus only ignored ones."""
    if not ignored_fields or not isinstance(abstract_state, dict):
      return False
    stored = self._manager.item_metadata(step)[STATE]
    tree = getattr(stored, "tree", stored)
    if not isinstance(tree, dict):
      return False
    extra = set(tree) - set(abstract_state)
    return bool(extra) and extra <= set(ignored_fields) and set(abstract_state) <= set(tree)


def newest_meta(workdir: str | pathlib.Path) -> tuple[int, dict] | None:
  """(step, meta) of the newest checkpoint whose metadata reads, without orbax or JAX work.

  For checks before a run builds anything (is this workdir's run the same run?).
  """
  directory = paths.path(workdir) / "checkpoints"
  if not directory.is_dir():
    return None
  steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
  for step in steps:
    try:
      return step, json.loads((directory / str(step) / META / "metadata").read_text())
    except (OSError, ValueError):
      continue
  return None
