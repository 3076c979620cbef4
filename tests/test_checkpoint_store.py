"""CheckpointStore: save/restore, damaged-newest fallback, re-sharding, iterator position."""

import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from im_jax.checkpoint import CheckpointConfig, CheckpointStore, UnreadableCheckpoints


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _state(step: int, mesh):
  w = jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8) + step
  return {
      "w": jax.device_put(w, NamedSharding(mesh, P("data", "fsdp"))),
      "step": jnp.asarray(step, jnp.int32),
  }


def _abstract(mesh, spec):
  return {
      "w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, spec)),
      "step": jax.ShapeDtypeStruct((), jnp.int32),
  }


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())


def _save_steps(workdir, mesh, steps, it=None):
  store = CheckpointStore(workdir, CheckpointConfig(every_steps=1, keep=5))
  for s in steps:
    if it is not None:
      next(it)
    assert store.save(s, _state(s, mesh), it.get_state() if it else None, {"run": "x", "step": s})
  store.close()


def test_restore_newest_and_reshard(tmp_path):
  mesh = _mesh((4, 2))
  _save_steps(tmp_path, mesh, [1, 2, 3])
  other = _mesh((2, 4))
  store = CheckpointStore(tmp_path)
  got = store.restore_latest(_abstract(other, P("fsdp", None)))
  assert got.step == 3 and got.meta == {"run": "x", "step": 3} and got.skipped == ()
  np.testing.assert_array_equal(np.asarray(got.state["w"]), np.asarray(_state(3, mesh)["w"]))
  assert got.state["w"].sharding.spec == P("fsdp", None)
  assert got.state["w"].sharding.mesh.devices.shape == (2, 4)


def _damage_by_truncation(step_dir: pathlib.Path):
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.stat().st_size > 0]
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _damage_by_deletion(step_dir: pathlib.Path):
  for f in (step_dir / "state").rglob("*"):
    if f.is_file():
      f.unlink()


def _damage_by_flipping(step_dir: pathlib.Path):
  # Every byte of every data file: no single lucky byte decides whether damage is seen.
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.stat().st_size > 0]
  for f in files:
    f.write_bytes(bytes(b ^ 0x5A for b in f.read_bytes()))


def _damage_by_emptying(step_dir: pathlib.Path):
  for f in sorted(step_dir.rglob("*"), reverse=True):
    f.unlink() if f.is_file() else f.rmdir()


DAMAGE = [_damage_by_truncation, _damage_by_deletion, _damage_by_flipping, _damage_by_emptying]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.removeprefix("_damage_by_"))
def test_damaged_newest_is_moved_aside_and_its_step_saved_again(tmp_path, damage):
  mesh = _mesh((4, 2))
  _save_steps(tmp_path, mesh, [1, 2, 3])
  damage(tmp_path / "checkpoints" / "3")
  files_before = sorted(p.relative_to(tmp_path / "checkpoints" / "3")
                        for p in (tmp_path / "checkpoints" / "3").rglob("*"))
  store = CheckpointStore(tmp_path, CheckpointConfig(every_steps=1, keep=5))
  got = store.restore_latest(_abstract(mesh, P("data", "fsdp")))
  assert got.step == 2
  assert [s for s, _ in got.skipped] == [3]
  np.testing.assert_array_equal(np.asarray(got.state["w"]), np.asarray(_state(2, mesh)["w"]))
  # Renamed, not deleted: every file a person may want to inspect is still there.
  aside = tmp_path / "damaged_checkpoints" / "3"
  assert got.moved == (str(aside),) and not (tmp_path / "checkpoints" / "3").exists()
  assert sorted(p.relative_to(aside) for p in aside.rglob("*")) == files_before
  assert store.save(3, _state(3, mesh), None, {"run": "x", "step": 3})  # the resumed run saves
  store.close()
  assert CheckpointStore(tmp_path).steps() == [1, 2, 3]


def test_all_damaged_is_an_error_and_empty_is_none(tmp_path):
  mesh = _mesh((8, 1))
  assert CheckpointStore(tmp_path / "empty").restore_latest(_abstract(mesh, P())) is None
  _save_steps(tmp_path, mesh, [1])
  _damage_by_deletion(tmp_path / "checkpoints" / "1")
  with pytest.raises(RuntimeError, match="no readable checkpoint"):
    CheckpointStore(tmp_path).restore_latest(_abstract(mesh, P()))
  assert (tmp_path / "checkpoints" / "1").is_dir()  # nothing moved: starting over is the user's call


def test_iterator_position_is_the_one_at_save_time(tmp_path):
  mesh = _mesh((8, 1))
  it = _iterator()
  _save_steps(tmp_path, mesh, [1, 2], it=it)
  expected = [next(it) for _ in range(5)]  # what follows the step-2 position
  fresh = _iterator()
  got = CheckpointStore(tmp_path).restore_latest(_abstract(mesh, P()), data_iterator=fresh)
  assert got.step == 2
  assert [next(fresh) for _ in range(5)] == expected


def test_saves_only_when_due_or_forced(tmp_path):
  mesh = _mesh((8, 1))
  store = CheckpointStore(tmp_path, CheckpointConfig(every_steps=4, keep=5))
  saved = [s for s in range(1, 10) if store.save(s, _state(s, mesh), None, {})]
  assert saved == [4, 8]
  assert store.save(9, _state(9, mesh), None, {}, force=True)
  store.close()
  assert CheckpointStore(tmp_path).steps() == [4, 8, 9]


@pytest.mark.parametrize("legacy", [None, "array"])
def test_legacy_fields_are_left_unread(tmp_path, legacy):
  """A checkpoint whose state holds a field this layout dropped (the LoRA base once saved as
  `frozen`: a tree of arrays, or None without LoRA) restores when the field is declared
  legacy, and is not taken for the current layout otherwise."""
  mesh = _mesh((4, 2))
  old = dict(_state(5, mesh), frozen=None if legacy is None else {"base": jnp.ones((32, 32))})
  store = CheckpointStore(tmp_path, CheckpointConfig(every_steps=1))
  store.save(5, old, None, {"run": "x"})
  store.close()
  with pytest.raises(UnreadableCheckpoints):  # undeclared: a layout mismatch, as before
    CheckpointStore(tmp_path).restore_latest(_abstract(mesh, P("data", "fsdp")))
  got = CheckpointStore(tmp_path).restore_latest(_abstract(mesh, P("data", "fsdp")),
                                                 ignored_fields=("frozen",))
  assert got.step == 5 and got.skipped == () and set(got.state) == {"w", "step"}
  np.testing.assert_array_equal(np.asarray(got.state["w"]), np.asarray(old["w"]))
  assert got.state["w"].sharding.spec == P("data", "fsdp")
  assert not (tmp_path / "damaged_checkpoints").exists()
