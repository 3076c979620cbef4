"""Sharded train state, the jit train step (exact gradient accumulation, NEFTune) and eval step.

The NNX model is split into a static graph definition and pure state: `TrainState` holds the
parameters, optimizer state and other model variables as pytrees, and the step re-merges the
model inside one `jax.jit` with explicit in/out shardings and a donated state.

Gradient accumulation is exact under both loss normalisations: the step sums the numerator,
the denominator, the metric sums and the gradient of the numerator over its k micro-batches,
then divides once (d(sum num / sum den) = sum d num / sum den, as the denominator does not
depend on the parameters).

With `loss.kl_to_base` > 0 the state also holds `reference`: the starting parameters, frozen
(no gradient, no optimizer state, sharded like the parameters), which the loss function gets
as a second model of the same graph (train/kl.py). None otherwise.

Typical use:

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=1))
    tx, schedule = optim.make_optimizer(optim.OptimConfig(), total_steps)
    graphdef, state, shardings = create_train_state(
        lambda: Llama(config, rngs=nnx.Rngs(0)), tx, mesh, seed=0)
    loss_fn = make_loss_fn(LossConfig("sequence"), neftune_alpha=5.0)
    train_step = make_train_step(graphdef, tx, shardings, mesh, loss_fn, schedule=schedule)
    eval_step = make_eval_step(graphdef, shardings, mesh, loss_fn)
    state, metrics = train_step(state, sharding.global_batch(rows, mesh, micro_batches=k))
    sums = eval_step(state, sharding.global_batch(eval_rows, mesh))  # sum over batches, then
    metrics = loss.finalize(sums)
"""

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from im_jax.models import lora, partitioning
from im_jax.train import kl as kl_lib
from im_jax.train import neftune, optim, sharding
from im_jax.train.loss import (DENOMINATOR, NUMERATOR, Batch, LossConfig, LossSums,
                               ce_and_numerator, finalize, loss_sums, numerator_token_grads)

# loss_fn(model, batch, rng) -> sums with at least NUMERATOR and DENOMINATOR. `rng` is a key
# in training and None in evaluation (no noise, no dropout). When the state holds a reference
# model the step also passes it: loss_fn(model, batch, rng, reference=frozen_model).
LossFn = Callable[..., LossSums]
_LORA_DROPOUT = 1  # folded into the step's key: LoRA dropout's own stream (NEFTune has `rng`)


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: batches done (updates: optim.update_count(opt_state))
  params: nnx.State  # what trains: the model's nnx.Param variables, or only its LoRA adapters
  opt_state: Any
  rest: nnx.State  # the model's other variables, carried unchanged
  rng: jax.Array  # raw uint32 key; per-step keys are folded in from it
  # With LoRA: the base weights, never updated and not checkpointed (a run reloads them from
  # model.init_from); None without LoRA.
  frozen: nnx.State | None = None
  # The KL's base model: nnx.Param values like `params`, never updated; None without KL.
  # Not checkpointed: every start re-derives it (see experiment.build).
  reference: nnx.State | None = None

  def fixed(self) -> tuple[nnx.State, ...]:
    """The model's states other than `params`, for `nnx.merge(graphdef, params, *fixed)`."""
    return (self.rest,) if self.frozen is None else (self.frozen, self.rest)


# The fields a checkpoint holds: the state less `frozen` and `reference`, which every start
# re-derives from model.init_from (the layout checkpoints always had).
CHECKPOINTED = ("step", "params", "opt_state", "rest", "rng")
# Fields that checkpoints written before this definition held and a restore leaves unread:
# a hand merge once made the loop save `frozen` too (LoRA's whole base, or None without LoRA).
LEGACY_FIELDS = ("frozen",)


def checkpointed(state: TrainState) -> dict[str, Any]:
  return {name: getattr(state, name) for name in CHECKPOINTED}


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State | None, nnx.State]:
  """(graphdef, trainable, frozen, rest): with LoRA adapters only the adapters train.

  `nnx.LoRAParam` subclasses `nnx.Param`, so adapters are taken out first.
  """
  graphdef, adapters, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
  if not jax.tree.leaves(adapters):
    return graphdef, base, None, rest
  return graphdef, adapters, base, rest


def make_loss_fn(config: LossConfig = LossConfig(), neftune_alpha: float = 0.0) -> LossFn:
  """The default loss: embed, NEFTune noise (train only), hidden states, (chunked) CE."""

  def loss_fn(model: nnx.Module, batch: Batch, rng: jax.Array | None,
              reference: nnx.Module | None = None) -> LossSums:
    embeddings = model.embed(batch["tokens"])
    if rng is not None and neftune_alpha > 0:
      embeddings = neftune.add_noise(embeddings, batch["segment_ids"], neftune_alpha, rng)
    with lora.dropout_rng(None if rng is None else jax.random.fold_in(rng, _LORA_DROPOUT)):
      hidden = model.hidden_states(embeddings, batch["positions"], batch["segment_ids"])
    if config.kl_to_base > 0:
      ce, kl = kl_lib.ce_and_kl(model, hidden, reference, batch, config)
      return loss_sums(ce, batch, config.normalization, kl, config.kl_to_base,
                       sources=config.sources, example_weights=config.example_weights)
    ce, numerator = ce_and_numerator(hidden, model.output_embedding(), batch["targets"],
                                     numerator_token_grads(batch, config.normalization,
                                                           config.example_weights),
                                     config.chunk_size)
    return loss_sums(ce, batch, config.normalization, numerator=numerator,
                     sources=config.sources, example_weights=config.example_weights)

  return loss_fn


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def train_state_shardings(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                          mesh: Mesh, *, reference: bool = False,
                          rules=sharding.LOGICAL_AXIS_RULES,
                          on_indivisible: sharding.OnIndivisible = "replicate",
                          ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, abstract state, state shardings) without allocating anything.

  The abstract state holds `jax.ShapeDtypeStruct`s carrying their shardings: what
  `jax.jit(...).lower` needs to compile the train step for any devices (`python -m
  im_jax.plan`), and the layout `create_train_state` allocates. `reference`: the state holds
  a frozen copy of the parameters (the KL's base model), sharded as they are.
  """
  abstract = nnx.eval_shape(model_fn)
  graphdef, abs_params, abs_frozen, abs_rest = split_model(abstract)
  kw = dict(rules=rules, on_indivisible=on_indivisible)
  param_sh = sharding.state_shardings(abs_params, mesh, **kw)
  frozen_sh = None if abs_frozen is None else sharding.state_shardings(abs_frozen, mesh, **kw)
  rep = _replicated(mesh)
  # Optimizer moments mirror the parameters; counters and the like are replicated.
  abs_opt = jax.eval_shape(tx.init, abs_params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt,
                                 param_sh, transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
  shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh,
                         rest=sharding.state_shardings(abs_rest, mesh, **kw), rng=rep,
                         frozen=frozen_sh, reference=param_sh if reference else None)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params,
                      opt_state=abs_opt, rest=abs_rest,
                      rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)), frozen=abs_frozen,
                      reference=abs_params if reference else None)
  # `shardings` is a prefix of `shapes` (one sharding per Variable).
  abstract_state = jax.tree.map(
      lambda s, sub: jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub),
      shardings, shapes)
  return graphdef, abstract_state, shardings


def create_train_state(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                       mesh: Mesh, *, seed: int = 0, reference: bool = False,
                       rules=sharding.LOGICAL_AXIS_RULES,
                       on_indivisible: sharding.OnIndivisible = "replicate",
                       ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """Creates the train state directly in its sharded layout.

  `model_fn()` builds the model (e.g. `lambda: Llama(config, rngs=nnx.Rngs(0))`). Shapes and
  shardings come from an abstract evaluation; the real initialisation is one jit whose
  out_shardings place every parameter and optimizer moment on its shard, so no device ever
  holds the whole model. Returns (graphdef, state, state shardings).
  """
  graphdef, _, shardings = train_state_shardings(model_fn, tx, mesh, reference=reference,
                                                 rules=rules, on_indivisible=on_indivisible)
  return graphdef, init_train_state(model_fn, tx, shardings, mesh, seed=seed), shardings


def init_train_state(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                     shardings: TrainState, mesh: Mesh, *, seed: int = 0) -> TrainState:
  """The initial state, each array created on its shards (see `create_train_state`).

  When `shardings.reference` is set, the reference is a copy of the initial parameters.
  """

  def init() -> TrainState:
    _, params, frozen, rest = split_model(model_fn())
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rest=rest, rng=jax.random.PRNGKey(seed), frozen=frozen)

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings.replace(reference=None))()
  return state if shardings.reference is None else set_reference(state, shardings, mesh)


def set_reference(state: TrainState, shardings: TrainState, mesh: Mesh) -> TrainState:
  """`state` whose reference is a copy of its current parameters, in `shardings.reference`.

  A copy in its own buffers: the train step donates the whole state, parameters and
  reference alike, so the two must not share memory.
  """
  with jax.set_mesh(mesh):
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                   out_shardings=shardings.reference)(state.params)
  return state.replace(reference=copy)


def _tree_add(total, x):
  return jax.tree.map(lambda t, v: t + v.astype(t.dtype), total, x)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    shardings: TrainState, mesh: Mesh, loss_fn: LossFn, *,
                    schedule: optax.Schedule | None = None, donate: bool = True,
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`step(state, batch) -> (state, metrics)` for batches shaped [k, rows, T].

  k (the leading axis, see `sharding.global_batch`) is the number of accumulated
  micro-batches. Metrics: loss, output_loss, instruction_loss, their token counts, kl (with
  a reference model), loss_denominator, grad_norm (before clipping), skipped (1.0 when
  non-finite gradients left parameters and optimizer state untouched) and lr (when
  `schedule` is given: the schedule of `tx`, counted in updates).
  """

  def micro_grads(params, fixed, reference, batch, rng):
    def numerator(p):  # differentiated in `params` only: frozen weights get no gradient
      sums = _call_loss(loss_fn, graphdef, p, fixed, reference, batch, rng)
      return sums[NUMERATOR], sums

    grads, sums = jax.grad(numerator, has_aux=True)(params)
    return jax.lax.with_sharding_constraint(grads, shardings.params), sums

  def step(state: TrainState, batch: Batch):
    with partitioning.activation_layout(sharding.ActivationLayout(mesh)):
      return _step(state, batch)

  def _step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(state.rng, state.step)
    k = batch["tokens"].shape[0]

    def micro(i):
      return {name: value[i] for name, value in batch.items()}

    if k == 1:
      grads, sums = micro_grads(state.params, state.fixed(), state.reference, micro(0), key)
    else:
      def body(carry, i):
        g, s = micro_grads(state.params, state.fixed(), state.reference, micro(i),
                           jax.random.fold_in(key, i))
        return (_tree_add(carry[0], g), _tree_add(carry[1], s)), None

      # Accumulate in float32 whatever the parameter dtype.
      shapes = jax.eval_shape(micro_grads, state.params, state.fixed(), state.reference,
                              micro(0), key)
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)
      zeros = (jax.lax.with_sharding_constraint(zeros[0], shardings.params), zeros[1])
      (grads, sums), _ = jax.lax.scan(body, zeros, jnp.arange(k))
    denominator = sums[DENOMINATOR]
    scale = 1.0 / jnp.where(denominator > 0, denominator, 1.0)
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A batch with no weighted token (all padding: epochs are padded to equal batch counts)
    # must not move anything: AdamW would still step on its moments and its schedule. Nor
    # may non-finite gradients (one bad batch, a bf16 overflow): they would poison both.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm)
    apply = (denominator > 0) & finite
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics = finalize(sums)
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = (~finite).astype(jnp.float32)  # 1: this update was not applied
    if schedule is not None:
      # The rate this batch's update applies: the schedule at the optimizer's own count, which
      # all-padding batches do not advance (state.step counts batches).
      metrics["lr"] = jnp.asarray(schedule(optim.update_count(state.opt_state)), jnp.float32)
    # The step counter still advances: it numbers batches, so resume and per-step keys stay
    # aligned with the data.
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  jitted = jax.jit(step,
                   in_shardings=(shardings, sharding.batch_sharding(mesh, micro_batched=True)),
                   out_shardings=(shardings, _replicated(mesh)),
                   donate_argnums=(0,) if donate else ())
  return _in_mesh(jitted, mesh)


def make_eval_step(graphdef: nnx.GraphDef, shardings: TrainState, mesh: Mesh,
                   loss_fn: LossFn) -> Callable[[TrainState, Batch], LossSums]:
  """`eval_step(state, batch) -> sums` for [rows, T] batches: forward only, no noise.

  Returns sums (not means) so a loop can add them over batches and call `loss.finalize`.
  """

  def step(state: TrainState, batch: Batch) -> LossSums:
    with partitioning.activation_layout(sharding.ActivationLayout(mesh)):
      return _call_loss(loss_fn, graphdef, state.params, state.fixed(), state.reference, batch,
                        None)

  jitted = jax.jit(step,
                   in_shardings=(shardings, sharding.batch_sharding(mesh, micro_batched=False)),
                   out_shardings=_replicated(mesh))
  return _in_mesh(jitted, mesh)


def _call_loss(loss_fn: LossFn, graphdef: nnx.GraphDef, params: nnx.State,
               fixed: tuple[nnx.State, ...], reference: nnx.State | None, batch: Batch,
               rng: jax.Array | None) -> LossSums:
  """`loss_fn` on the model, and on the frozen reference model when the state has one.

  `fixed`: `TrainState.fixed()`, the model's states other than `params`. A reference exists
  only without LoRA (settings refuse both), so it pairs with `rest` alone.
  """
  model = nnx.merge(graphdef, params, *fixed)
  if reference is None:
    return loss_fn(model, batch, rng)
  # Frozen: the gradient is taken with respect to `params` only; stop_gradient says so here too.
  frozen = nnx.merge(graphdef, jax.lax.stop_gradient(reference), fixed[-1])
  return loss_fn(model, batch, rng, reference=frozen)


def _in_mesh(jitted, mesh: Mesh):
  """Runs `jitted` with `mesh` set, so model code may use mesh-relative constraints."""

  def run(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  run.jitted = jitted  # for .lower(...) (cost analysis, HLO dumps)
  return run


def host_metrics(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  """Device scalars -> Python floats (one transfer)."""
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
