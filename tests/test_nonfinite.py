"""Non-finite gradients in the training loop: skipped, counted, stopped, never saved.

A non-finite value is injected into chosen batches (an inf loss weight on one token, so the
loss and every gradient of that step are non-finite); the loop runs the real jit step.
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from im_jax.checkpoint import CheckpointConfig
from im_jax.models.llama import Llama, LlamaConfig
from im_jax.train import loop, loss, optim, sharding, step
from im_jax.train.metrics_log import read_metrics
from tests import train_rows

pytestmark = [pytest.mark.slow]  # trains through subprocesses

CONFIG = LlamaConfig.preset("tiny", vocab_size=128, num_heads=4, num_kv_heads=2, head_dim=8,
                            num_layers=1)
STEPS = 6


class _Batches:
  """A resumable batch source (like a grain iterator) that poisons the chosen steps."""

  def __init__(self, poisoned: set[int]):
    self.poisoned, self.index = poisoned, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.index += 1
    rows = dict(train_rows.pack(train_rows.make_examples(self.index, 16, CONFIG.vocab_size, 5,
                                                         14), 8, 32))
    if self.index in self.poisoned:
      rows["loss_weights"] = rows["loss_weights"].copy()
      rows["loss_weights"][tuple(np.argwhere(rows["loss_weights"] > 0)[0])] = np.inf
    return rows

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


@pytest.fixture(scope="module")
def setup():
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  tx, _ = optim.make_optimizer(optim.OptimConfig(lr=1e-3, warmup_ratio=0.0), STEPS)
  graphdef, state, shardings = step.create_train_state(
      lambda: Llama(CONFIG, rngs=nnx.Rngs(0)), tx, mesh)
  train_step = step.make_train_step(graphdef, tx, shardings, mesh,
                                    step.make_loss_fn(loss.LossConfig("sequence")), donate=False)
  return mesh, state, train_step


def test_the_step_skips_a_non_finite_update(setup):
  # Parameters and optimiser state exactly as they were; the next good batch trains.
  mesh, state, train_step = setup
  batches = _Batches(poisoned={2})
  state, metrics = train_step(state, sharding.global_batch(next(batches), mesh, micro_batches=1))
  assert float(metrics["skipped"]) == 0
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = train_step(state, sharding.global_batch(next(batches), mesh, micro_batches=1))
  assert float(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["grad_norm"]))
  assert int(state.step) == 2  # the batch is consumed: data and step keys stay aligned
  for got, want in zip(jax.tree.leaves(jax.device_get((state.params, state.opt_state))),
                       jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(got, want)
  state, metrics = train_step(state, sharding.global_batch(next(batches), mesh, micro_batches=1))
  after = jax.tree.leaves(jax.device_get(state.params))
  assert float(metrics["skipped"]) == 0 and all(np.all(np.isfinite(x)) for x in after)
  assert any(not np.array_equal(a, b) for a, b in zip(after, jax.tree.leaves(before[0])))


def _run(setup, workdir, poisoned, limit, log_every=1):
  mesh, state, train_step = setup
  config = loop.LoopConfig(total_steps=STEPS, log_every=log_every, max_consecutive_skips=limit,
                           checkpoint=CheckpointConfig(every_steps=2, keep=10, async_save=False))
  return loop.run(workdir=str(workdir), state=state, train_step=train_step, mesh=mesh,
                  train_batches=_Batches(poisoned), config=config, meta={})


def _saved_params_finite(workdir) -> dict[int, bool]:
  out = {}
  for step_dir in sorted((workdir / "checkpoints").iterdir()):
    state = ocp.StandardCheckpointer().restore(step_dir / "state")
    out[int(step_dir.name)] = all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
  return out


def test_isolated_bad_batches_are_skipped_and_counted(setup, tmp_path):
  result = _run(setup, tmp_path, poisoned={2, 5}, limit=2)
  assert result.step == STEPS
  records = read_metrics(tmp_path)
  assert [r["skipped_steps"] for r in records] == [0, 1, 0, 0, 1, 0]
  assert all(np.isfinite(r["loss"]) for r in records if r["step"] not in (2, 5))
  assert _saved_params_finite(tmp_path) == {2: True, 4: True, 6: True}


def test_consecutive_skips_stop_the_run_in_one_line(setup, tmp_path):
  with pytest.raises(loop.TrainingStopped) as info:
    _run(setup, tmp_path, poisoned={3, 4, 5, 6}, limit=3)
  message = str(info.value)
  assert "\n" not in message and message.startswith("stopped at step 5: 3 updates in a row")
  assert "train.max_consecutive_skips" in message
  # Step 4's checkpoint was written while skipping: it holds step 2's (finite) parameters.
  assert _saved_params_finite(tmp_path) == {2: True, 4: True}


def test_skips_are_counted_between_logging_steps(setup, tmp_path):
  result = _run(setup, tmp_path, poisoned={1, 2, 4}, limit=3, log_every=3)
  assert result.step == STEPS
  assert [(r["step"], r["skipped_steps"]) for r in read_metrics(tmp_path)] == [(3, 2), (6, 1)]


def test_non_finite_parameters_are_never_saved(setup, tmp_path):
  # Parameters that are already non-finite (whatever made them so) are refused at the save.
  mesh, state, train_step = setup
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(np.inf)
  poisoned = state.replace(params=jax.tree.unflatten(treedef, leaves))
  with pytest.raises(loop.TrainingStopped, match="the parameters are not finite; not saving"):
    _run((mesh, poisoned, train_step), tmp_path, poisoned=set(), limit=100)
  assert not any((tmp_path / "checkpoints").glob("[0-9]*"))
