"""A checkpoint store for training runs, on top of `ocp.CheckpointManager`.

Each checkpoint `WORKDIR/checkpoints/<step>/` holds three items:
- `state`: any pytree of (sharded) jax arrays: parameters, optimiser state, step, RNG key data;
- `data`: the grain iterator position, one JSON file per JAX process;
- `meta`: a JSON object (the run config, the model config, ...).

Orbax writes each save into a temporary folder and renames it when complete, so an interrupted
save never shows up as a step. A finished checkpoint can still be damaged later (a truncated
copy, a lost file): `restore_latest` reports it and falls back to the previous one.
"""

import dataclasses
import json
import logging
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 500
  keep: int = 3  # the newest K are kept
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  state: Any
  meta: dict
  skipped: tuple[tuple[int, str], ...] = ()  # (step, reason) of damaged newer checkpoints


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
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
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
    return sorted(self._manager.all_steps(read=True))

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

  def restore_latest(self, abstract_state: Any, data_iterator=None) -> Restored | None:
    """Restores the newest readable checkpoint, falling back past damaged ones.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with the shardings wanted now,
    so a checkpoint written on another mesh shape is re-sharded on restore. If
    `data_iterator` is given its position is restored in place.
    Returns None when there is no checkpoint at all; raises if every one is damaged.
    """
    steps = self.steps()
    skipped = []
    for step in reversed(steps):
      try:
        restored = self._restore_step(step, abstract_state, data_iterator)
      except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        log.warning("checkpoint %s/%d is incomplete or corrupt (%s); trying an older one",
                    self.directory, step, reason)
        skipped.append((step, reason))
        continue
      return dataclasses.replace(restored, skipped=tuple(skipped))
    if steps:
      raise RuntimeError(
          f"no readable checkpoint in {self.directory}: "
          + "; ".join(f"step {s}: {r}" for s, r in skipped))
    return None

  def _restore_step(self, step: int, abstract_state: Any, data_iterator) -> Restored:
    step_dir = self.directory / str(step)
    items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
    if data_iterator is not None:
      if not (step_dir / DATA).is_dir():
        raise FileNotFoundError(f"{step_dir / DATA} is missing")
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    state = out[STATE]
    # Orbax restores lazily in places; touch every array so damage surfaces here.
    jax.block_until_ready(state)
    return Restored(step=step, state=state, meta=dict(out[META]))
