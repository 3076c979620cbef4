"""From a config (configs/*.py) to a running experiment: model, state, loop (data: run_data).

Everything a run needs is built here from the typed config (`settings.RunConfig`, built and
validated once by the entry point), through the typed configs of each layer, so the entry
point stays thin. Impossible settings, bad paths, a busy workdir or one holding another run's
checkpoints fail before any heavy work with one line; config.json is written only after
those checks.
"""

import dataclasses
import logging
import pathlib
import tempfile
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from im_jax import distributed, hub, paths
from im_jax.checkpoint.store import newest_meta
from im_jax.convert import hf_export
from im_jax.convert.load import HF_PREFIX, LORA_BASE, load_pretrained
from im_jax.data import packing
from im_jax.data import pipeline as pipeline_lib
from im_jax.eval import loss_eval
from im_jax.models import lora as lora_lib
from im_jax.models.llama import Llama, LlamaConfig
from im_jax.run.run_data import build_data, check_data_position, plan_cache_dir
from im_jax.run.settings import (ConfigError, RunConfig, check, check_inputs, lora_config,
                                 loop_config, loss_config, model_options, train_sources)
from im_jax.train import loop as loop_lib
from im_jax.train import device_memory
from im_jax.train import optim as optim_lib
from im_jax.train import sharding, step as step_lib
from im_jax.train import workdir_lock

log = logging.getLogger(__name__)

# Model.


def model_config(c: RunConfig, vocab_needed: int,
                 pretrained: LlamaConfig | None = None) -> LlamaConfig:
  if pretrained is not None:
    config = pretrained
  else:
    config = LlamaConfig.preset(c.model.preset, **model_options(c))
    if config.vocab_size < vocab_needed and c.model.preset == "tiny":
      config = config.replace(vocab_size=vocab_needed)  # tiny adapts to its tokenizer
  config = config.replace(lora=lora_config(c))
  check(config.vocab_size >= vocab_needed,
         f"the tokenizer has {vocab_needed} tokens but the model's vocabulary is "
         f"{config.vocab_size}")
  return config


@dataclasses.dataclass
class Steps:
  """The compiled-to-be computations of a run, before any array exists."""

  model_fn: Callable[[], nnx.Module]
  tx: Any  # optax.GradientTransformation
  graphdef: nnx.GraphDef
  abstract_state: step_lib.TrainState  # ShapeDtypeStructs carrying their shardings
  shardings: step_lib.TrainState
  train_step: Callable
  eval_step: Callable


def build_steps(c: RunConfig, mcfg: LlamaConfig, mesh: jax.sharding.Mesh,
                updates: int) -> Steps:
  """The train and eval steps of a run: what the trainer runs and `im_jax.plan` compiles.

  `updates`: the optimizer updates the learning-rate schedule spans. With `loss.kl_to_base`
  > 0 the state holds the frozen reference model, so the plan counts its memory; with LoRA
  the reference is the base the adapters sit on (no copy).
  """
  model_fn = lambda: Llama(mcfg, rngs=nnx.Rngs(c.train.seed))
  tx, schedule = optimizer_for(c, updates)
  losses = loss_config(c)
  graphdef, abstract_state, shardings = step_lib.train_state_shardings(
      model_fn, tx, mesh, reference=losses.kl_to_base > 0 and not mcfg.lora.enabled)
  loss_fn = step_lib.make_loss_fn(losses, neftune_alpha=c.neftune_alpha)
  train_step = step_lib.make_train_step(graphdef, tx, shardings, mesh, loss_fn, schedule=schedule)
  # Held-out eval shares `python -m im_jax.eval loss`'s loss function and reduction.
  eval_step = step_lib.make_eval_step(graphdef, shardings, mesh,
                                      loss_eval.make_eval_loss_fn(losses))
  return Steps(model_fn, tx, graphdef, abstract_state, shardings, train_step, eval_step)


def train_batch_shapes(c: RunConfig, mesh: jax.sharding.Mesh
                       ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global train batch `[grad_accum, rows per micro-batch, max_seq_len]` per field."""
  k = c.train.grad_accum
  shape = (k, c.train.batch_size // k, c.data.max_seq_len)
  batch_sharding = sharding.batch_sharding(mesh, micro_batched=True)
  dtypes = dict(packing.ROW_DTYPES)
  if loss_config(c).sources:  # a mixture of several sources: rows say whose each token is
    dtypes[packing.SOURCE_IDS] = np.int32
  return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
          for name, dtype in dtypes.items()}


def optimizer_for(c: RunConfig, updates: int) -> tuple[Any, Any]:
  """(AdamW, its schedule) spanning `updates` optimizer updates.

  A run's updates are its batches less the all-padding ones closing an epoch that packs into
  fewer rows (`DataPipeline.updates`): those do not update.
  """
  return optim_lib.make_optimizer(c.optim, updates)


@dataclasses.dataclass
class Experiment:
  config: RunConfig
  workdir: pathlib.Path
  mesh: jax.sharding.Mesh
  tokenizer_dir: pathlib.Path
  model_config: LlamaConfig
  train_data: pipeline_lib.DataPipeline
  eval_data: pipeline_lib.DataPipeline | None
  graphdef: nnx.GraphDef
  state: step_lib.TrainState
  train_step: Callable
  eval_step: Callable
  loop_config: loop_lib.LoopConfig
  meta: dict[str, Any]
  hooks: tuple[loop_lib.StepHook, ...] = ()  # benchmark scores (eval.harness_tasks)

  def export_hf(self, state: step_lib.TrainState) -> pathlib.Path:
    """Writes the trained model as a Hugging Face folder to WORKDIR/hf (replacing it).

    In a multi-process run every process must call it (see `distributed.fetchable`).
    """
    out = self.workdir / "hf"
    params = state.params
    if state.frozen is not None:  # LoRA: the merged model, W + alpha/r * B A
      model = nnx.merge(self.graphdef, state.params, *state.fixed())
      params = lora_lib.merged_state(model, self.model_config.lora.scale)
    # Every process takes part in gathering parameters sharded across hosts; process 0 writes.
    params = distributed.fetchable(params)
    if distributed.is_main_process():
      with tempfile.TemporaryDirectory() as tmp:  # a gs:// workdir: written here, uploaded
        local = pathlib.Path(tmp) / "hf" if paths.is_remote(out) else out
        hf_export.export_hf(local, params, self.model_config, str(self.tokenizer_dir),
                            template=self.config.data.template,
                            strip_content=self.config.data.strip_content, overwrite=True,
                            metadata=export_metadata(self.config))
        if local != out:  # config.json last: an upload cut short is no loadable folder
          paths.remove_tree(out)
          paths.upload_tree(local, out, last="config.json")
      log.info("exported a Hugging Face model to %s", out)
    distributed.sync("export_hf")  # no process returns before the folder is complete
    return out

  def run(self) -> loop_lib.LoopResult:
    device_memory.log_step_memory(self.train_step, self.state,
                               train_batch_shapes(self.config, self.mesh), self.mesh)
    eval_batches = None if self.eval_data is None else (lambda: iter(self.eval_data.dataset()))
    return loop_lib.run(workdir=str(self.workdir), state=self.state, train_step=self.train_step,
                        mesh=self.mesh, train_batches=self.train_data.dataset(),
                        config=self.loop_config, meta=self.meta, eval_step=self.eval_step,
                        eval_batches=eval_batches, eval_finalize=loss_eval.finalize,
                        hooks=self.hooks, sinks=(self.config.log,))


def build(c: RunConfig, workdir: str | pathlib.Path) -> Experiment:
  """The run of `c` (validated for these devices by the entry point: `settings.validate`)."""
  remote = paths.is_remote(workdir)
  workdir = paths.path(workdir)  # a local folder or gs://BUCKET/...
  check_inputs(c, workdir)
  check_resumable(c, workdir)  # reads only: a refused run leaves every file as it was
  harness_tasks = prepare_harness_tasks(c)  # reads (task files, cached datasets) only
  if remote:  # before any work: may this run write there?
    paths.check_ready(workdir, what="--workdir", write=True)
  else:
    workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:  # one run per workdir; the other processes share it
    workdir_lock.acquire(workdir)
    paths.write_text(workdir / "config.json", c.to_json(indent=2) + "\n")  # whole or not at all

  mesh = sharding.make_mesh(c.mesh)
  pretrained = None
  if c.model.init_from:  # placed straight into the parameters' shardings
    try:  # a gs:// model is read from a local copy (made once, kept in a cache)
      pretrained = load_pretrained(paths.fetch(c.model.init_from, what="model.init_from"),
                                   shardings=sharding.sharding_fn(mesh), **model_options(c))
    except (OSError, ValueError, KeyError) as e:  # a missing folder, an unsupported config
      raise ConfigError(f"model.init_from={c.model.init_from}: {e}") from None
    check(not pretrained.config.lora.enabled,
          f"model.init_from={c.model.init_from} is a LoRA run: export it merged "
          "(python -m im_jax.convert to-hf) and start from that folder")
  data = build_data(c, workdir, pretrained.tokenizer_dir if pretrained else None,
                    cache_dir=plan_cache_dir(workdir))
  train_data, eval_data, total_steps = data.train, data.eval, data.total_steps
  check_data_position(workdir, train_data)
  log.info("data: %s; %d batches per epoch, %d batches, %d updates", train_data.stats.as_dict(),
           train_data.steps_per_epoch, total_steps, data.updates)
  if data.mixture is not None:
    log.info("%s", data.mixture.describe())
    for source in data.mixture.sources:
      if source.template not in (None, c.data.template):
        log.warning("source %s trains with template %s; the exported model carries "
                    "data.template=%s (im_jax_export.json says so)", source.name,
                    source.template, c.data.template)
  tokenizer_dir = data.tokenizer_dir

  mcfg = model_config(c, data.vocab_size, pretrained.config if pretrained else None)
  steps = build_steps(c, mcfg, mesh, data.updates)
  state = step_lib.init_train_state(steps.model_fn, steps.tx,
                                    steps.shardings.replace(reference=None), mesh,
                                    seed=c.train.seed)
  if pretrained is not None:
    # Adam's moments start at zero whatever the parameters are, so only these change; with
    # LoRA they are the frozen base, and the adapters keep their initialisation.
    weights = nnx.state(pretrained.model, nnx.Param)
    state = (state.replace(frozen=weights) if mcfg.lora.enabled else
             state.replace(params=weights))
    del pretrained, weights
  if steps.shardings.reference is not None:
    # The KL's base model: the starting parameters, copied before any update. Every start
    # (a resume too) has them here already (init_from is read, or the seed re-initialises),
    # so checkpoints do not store it (train/loop.py) and resume_key pins init_from.
    state = step_lib.set_reference(state, steps.shardings, mesh)
  graphdef, train_step, eval_step = steps.graphdef, steps.train_step, steps.eval_step
  meta = {"config": c.to_dict(), "model_config": mcfg.to_dict(),
          "tokenizer_dir": str(tokenizer_dir.absolute()), "template": c.data.template,
          "strip_content": c.data.strip_content,
          "data_stats": train_data.stats.as_dict(), loop_lib.RESUME_KEY: resume_key(c),
          "export_metadata": export_metadata(c)}  # for `im_jax.convert to-hf` too
  if mcfg.lora.enabled:  # checkpoints hold adapters only: where their base weights are
    meta[LORA_BASE] = absolute_spec(c.model.init_from)
  hooks = () if harness_tasks is None else (
      harness_hook(c, harness_tasks, mesh, graphdef, tokenizer_dir),)
  return Experiment(c, workdir, mesh, tokenizer_dir, mcfg, train_data, eval_data, graphdef,
                    state, train_step, eval_step, loop_config(c, total_steps), meta, hooks)


def prepare_harness_tasks(c: RunConfig) -> Any:
  """eval.harness_tasks checked and built (None when off): a bad name, task file or missing
  dataset stops the run before any work, naming the key."""
  if not c.eval.harness_tasks:
    return None
  try:
    from im_jax.eval import harness  # pylint: disable=g-import-not-at-top  (lm-eval: optional)
    return harness.prepare_tasks(c.eval.harness_tasks, limit=c.eval.harness_limit or None,
                                 include_path=c.eval.harness_include_path or None)
  except ImportError as e:
    raise ConfigError(f"eval.harness_tasks needs lm-eval (pip install lm-eval==0.4.13): {e}"
                      ) from None
  except ValueError as e:
    raise ConfigError(f"eval.harness_tasks={c.eval.harness_tasks}: {e}") from None


def harness_hook(c: RunConfig, tasks: Any, mesh: jax.sharding.Mesh,
                 graphdef: nnx.GraphDef, tokenizer_dir: pathlib.Path) -> loop_lib.StepHook:
  """lm-eval tasks on the training state (LoRA adapters applied), rows over the run's mesh,
  logged as harness/TASK/METRIC every eval.harness_every_steps and at the end."""
  from im_jax.eval import harness  # pylint: disable=g-import-not-at-top

  evaluate = harness.make_training_hook(
      tasks, tokenizer_dir=str(tokenizer_dir), template=c.data.template,
      strip_content=c.data.strip_content, mesh=mesh, batch_size=c.eval.batch_size)
  return loop_lib.StepHook(
      lambda state: evaluate(nnx.merge(graphdef, state.params, *state.fixed())),
      c.eval.harness_every_steps)


def export_metadata(c: RunConfig) -> dict[str, Any]:
  """What `im_jax_export.json` says of the training data: the template the export's chat
  template renders (data.template's), and each source with any override it trained under."""
  return {"template": c.data.template, "strip_content": c.data.strip_content,
          "data": c.data.train,
          "sources": [{"name": s.name, "source": s.spec, "weight": s.weight,
                       "format": s.format or c.data.format or "detected",
                       "template": s.template or c.data.template}
                      for s in train_sources(c)]}


def absolute_spec(spec: str) -> str:
  """`model.init_from` as an absolute local folder (`hf:` kept; a Hub name resolved to its
  cached snapshot), valid from any directory."""
  prefix = HF_PREFIX if spec.startswith(HF_PREFIX) else ""
  if paths.is_remote(spec):  # already absolute
    return spec
  try:
    folder = hub.folder(spec)
  except hub.HubError:  # nowhere to be found: settings.check_inputs says so before any run
    folder = pathlib.Path(spec.removeprefix(prefix))
  return prefix + str(folder.absolute())


def check_resumable(c: RunConfig, workdir: pathlib.Path) -> None:
  """Refuses, before any work, a workdir whose checkpoints belong to other settings."""
  newest = newest_meta(workdir)
  if newest is not None:
    loop_lib.check_same_run(newest[1], {loop_lib.RESUME_KEY: resume_key(c)},
                            workdir / "checkpoints")


def resume_key(c: RunConfig) -> dict[str, Any]:
  """The settings a resumed run must share with the run that wrote the checkpoints.

  Data, loss, optimiser, schedule and model numerics (and, with the KL term, the starting
  model it is measured against); logging, evaluation, checkpointing and the mesh shape
  (restores re-shard) may change between the two.
  """
  keys = c.to_dict()  # the keys as written, as the ConfigDict's to_dict gave them
  data = {k: v for k, v in keys["data"].items() if k != "read_threads"}
  train = {k: v for k, v in keys["train"].items() if k != "log_every"}
  model = {k: keys["model"][k] for k in ("preset", "param_dtype", "compute_dtype", "scan_layers")}
  if c.model.lora.rank > 0:  # only then: full fine-tuning runs keep the keys they had
    model.update(lora=keys["model"]["lora"], init_from=absolute_spec(c.model.init_from))
  loss = keys["loss"]
  if c.loss.kl_to_base > 0:  # the reference is re-read from init_from on resume
    model["init_from"] = c.model.init_from
  else:  # off, kl_type means nothing; absent, workdirs from before these keys still resume
    del loss["kl_to_base"], loss["kl_type"]
  return {"data": data, "loss": loss, "optim": keys["optim"], "train": train,
          "model": model, "neftune_alpha": c.neftune_alpha}
