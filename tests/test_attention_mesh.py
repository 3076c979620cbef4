"""Each attention path that runs per device under the mesh (splash in interpret mode, blocked)
trains 3 steps on a (2, 2, 2) mesh, rows and heads split, to the XLA path's losses and
parameters. The XLA reference is computed once for both."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from im_jax.models.llama import Llama, LlamaConfig
from im_jax.train import optim, sharding, step as step_lib
from im_jax.train.loss import LossConfig
from tests import train_rows


@functools.cache
def _three_steps(impl: str):
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  batches = [train_rows.pack(train_rows.make_examples(seed, 12, 512, 5, 40), 4, 128)
             for seed in range(3)]
  config = LlamaConfig.preset("tiny", scan_layers=True, attention_impl=impl)
  tx, _ = optim.make_optimizer(optim.OptimConfig(lr=1e-3), 3)
  graphdef, state, shardings = step_lib.create_train_state(
      lambda: Llama(config, rngs=nnx.Rngs(0)), tx, mesh, seed=0)
  train_step = step_lib.make_train_step(graphdef, tx, shardings, mesh,
                                        step_lib.make_loss_fn(LossConfig()), donate=False)
  losses = []
  for rows in batches:
    state, metrics = train_step(state, sharding.global_batch(rows, mesh, micro_batches=1))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


@pytest.mark.parametrize("impl", ["splash", "blocked"])
def test_three_steps_on_a_mesh_equal_xla(impl):
  losses, params = _three_steps(impl)
  want_losses, want_params = _three_steps("xla")
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, want_params)
