"""Orbax checkpoints of a training run: state, data-iterator position and metadata."""

from im_jax.checkpoint.store import (CheckpointConfig, CheckpointStore, Restored,
                                     UnreadableCheckpoints)

__all__ = ["CheckpointConfig", "CheckpointStore", "Restored", "UnreadableCheckpoints"]
