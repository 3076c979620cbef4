"""The learning-rate schedule counts optimizer updates, and the logged lr is the applied one.

Epochs are padded to whole, equal batch counts, so an epoch that packs into fewer rows ends in
all-padding batches, on which the optimizer does not step. A one-parameter model whose loss
has gradient exactly 1 on every batch with a weighted token makes AdamW's update exactly
-lr / (1 + eps): the applied learning rate is read off the parameter, independently of the
schedule and of the step's bookkeeping.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from im_jax.configs import base
from im_jax.run import experiment, settings
from im_jax.data import pipeline as pipeline_lib
from im_jax.data.kinds import TokenKind
from im_jax.train import loss as loss_lib
from im_jax.train import optim, sharding
from im_jax.train import step as step_lib

EPS = 1e-6


class Scalar(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.zeros((), jnp.float32))


def _loss_fn(model, batch, rng):
  del rng
  weight = jnp.sum(jnp.where(batch["segment_ids"] > 0, batch["loss_weights"], 0.0))
  sums = {k: jnp.zeros((), jnp.float32) for k in loss_lib.METRIC_SUM_KEYS}
  # numerator / denominator = w: gradient 1 whenever the batch carries weight
  return {**sums, loss_lib.NUMERATOR: model.w[...] * weight, loss_lib.DENOMINATOR: weight}


def _example(n: int) -> dict[str, np.ndarray]:
  return {"tokens": np.ones(n, np.int32), "targets": np.ones(n, np.int32),
          "loss_weights": np.ones(n, np.float32),
          "target_kinds": np.full(n, TokenKind.ASSISTANT, np.int8)}


def _padded_pipeline() -> pipeline_lib.DataPipeline:
  """The issue's case: 40 examples, best fit, 2 rows per batch, 3 epochs (of 21, 20 and 19
  rows: the last two end in an all-padding batch)."""
  lengths = np.random.default_rng(7).integers(4, 48, 40)
  return pipeline_lib.from_examples(
      [_example(int(n)) for n in lengths], 64,
      pipeline_lib.PipelineConfig(batch_size=2, packing="best_fit", num_epochs=3, seed=0,
                                  read_threads=0), 0, 1)


def _hf_linear(step: int, total: int, warmup: int, peak: float) -> float:
  """transformers' get_linear_schedule_with_warmup, as the release uses it."""
  if step < warmup:
    return peak * step / max(1, warmup)
  return peak * max(0.0, (total - step) / max(1, total - warmup))


def test_logged_lr_is_applied_and_the_last_update_ends_the_schedule():
  pipe = _padded_pipeline()
  c = base.get_config()
  c.optim.lr, c.optim.eps, c.optim.warmup_ratio = 1e-3, EPS, 0.1
  # what experiment.build does for a run of every batch of the pipeline
  updates = pipe.updates(pipe.total_steps)
  tx, schedule = experiment.optimizer_for(settings.load(c), updates)
  assert 0 < updates < pipe.total_steps  # some batches are all padding
  warmup = optim.warmup_steps(settings.load(c).optim, updates)
  assert warmup == int(0.1 * updates) > 0  # the release's rounding (down)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  graphdef, state, shardings = step_lib.create_train_state(Scalar, tx, mesh)
  train_step = step_lib.make_train_step(graphdef, tx, shardings, mesh, _loss_fn,
                                        schedule=schedule, donate=False)
  applied, logged = [], []
  batches = 0
  for batch in pipe:
    batches += 1
    before = float(state.params["w"][...])
    state, metrics = train_step(state, sharding.global_batch(batch, mesh, micro_batches=1))
    delta = before - float(state.params["w"][...])
    if not batch["segment_ids"].any():
      assert delta == 0.0  # no update on all-padding batches
      continue
    applied.append(delta * (1 + EPS))
    logged.append(float(metrics["lr"]))
  assert batches == pipe.total_steps and len(applied) == updates
  assert int(optim.update_count(state.opt_state)) == updates
  np.testing.assert_allclose(logged, applied, rtol=2e-3, atol=1e-9)
  expected = [_hf_linear(u, updates, warmup, 1e-3) for u in range(updates)]
  np.testing.assert_allclose(logged, expected, rtol=1e-5, atol=1e-12)
  # the last real update uses the schedule's last step; the next one would be 0
  assert applied[-1] > 0 and float(schedule(updates)) == 0.0
  np.testing.assert_allclose(applied[-1], expected[-1], rtol=2e-3)


def test_updates_count_real_batches_of_truncated_runs():
  pipe = _padded_pipeline()
  real = [bool(batch["segment_ids"].any()) for batch in pipe]
  for batches in range(pipe.total_steps + 1):
    assert pipe.updates(batches) == sum(real[:batches])


def test_warmup_rounds_down_like_the_release():
  config = optim.OptimConfig(lr=2e-5, warmup_ratio=0.03)
  for total in range(1, 400):
    # the release: int(num_training_steps * warmup_ratio) with HF's linear schedule
    assert optim.warmup_steps(config, total) == int(total * 0.03), total
  # 33 updates: no warmup step, the first update runs at the peak; 34: one step, at 0
  assert float(optim.make_schedule(config, 33)(0)) == np.float32(2e-5)
  assert float(optim.make_schedule(config, 34)(0)) == 0.0
  for total in (33, 34, 38, 200):
    warm = optim.warmup_steps(config, total)
    schedule = optim.make_schedule(config, total)
    np.testing.assert_allclose([float(schedule(u)) for u in range(total + 1)],
                               [_hf_linear(u, total, warm, 2e-5) for u in range(total + 1)],
                               rtol=1e-5, atol=1e-12)
