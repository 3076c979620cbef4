"""From a config (configs/*.py) to a running experiment: validation, data, model, state.

Everything a run needs is built here from the ml-collections config, through the typed
configs of each layer (`EncodeConfig`, `PipelineConfig`, `LlamaConfig`, `OptimConfig`,
`LossConfig`, `MeshConfig`), so the entry point stays thin. Impossible settings fail before
any heavy work with one `ConfigError` line.
"""

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
from typing import Any, Callable, Sequence

import jax
import ml_collections
from flax import nnx

from im_jax import distributed
from im_jax.checkpoint import CheckpointConfig
from im_jax.convert import hf_export
from im_jax.convert.load import load_pretrained
from im_jax.data import encode as encode_lib
from im_jax.data import pipeline as pipeline_lib
from im_jax.data import sources, synthetic, templates
from im_jax.data import weights as weights_lib
from im_jax.data.conversation import Conversation
from im_jax.data.stats import load_tokenizer
from im_jax.eval import loss_eval
from im_jax.models.llama import Llama, LlamaConfig
from im_jax.train import loop as loop_lib
from im_jax.train import optim as optim_lib
from im_jax.train import sharding, step as step_lib
from im_jax.train.loss import LossConfig

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"


class ConfigError(ValueError):
  """An impossible or inconsistent setting; the message is one line for the user."""


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


# Data.


def load_train_conversations(c: ml_collections.ConfigDict) -> Sequence[Conversation]:
  spec = c.data.train
  _check(bool(spec), "data.train is empty: give a data file, tfds:NAME:SPLIT or synthetic:N")
  if spec.startswith(SYNTHETIC + ":"):
    conversations = synthetic.make_conversations(int(spec.split(":", 1)[1]), seed=c.train.seed)
  else:
    conversations = sources.load_conversations(spec, format=c.data.format or None,
                                               on_bad_record=c.data.on_bad_record)
  limit = c.data.max_examples  # the split is per example: a subset keeps its held-out part
  return list(conversations)[:limit] if limit > 0 else conversations


def is_held_out(conversation: Conversation, fraction: float) -> bool:
  """Stable split by a hash of the example's id (or content): the same for every run."""
  if fraction <= 0:
    return False
  key = conversation.id
  if key is None:
    key = json.dumps([[m.role, m.content] for m in conversation.messages])
  value = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
  return value < fraction


def split_held_out(conversations: Sequence[Conversation], fraction: float
                   ) -> tuple[list[Conversation], list[Conversation]]:
  train, held = [], []
  for conv in conversations:
    (held if is_held_out(conv, fraction) else train).append(conv)
  return train, held


def encode_config(c: ml_collections.ConfigDict) -> encode_lib.EncodeConfig:
  return encode_lib.EncodeConfig(
      template=templates.TemplateConfig(c.data.template, strip_content=c.data.strip_content),
      loss=weights_lib.LossMaskConfig(c.loss.mode, c.loss.instruction_weight,
                                      c.loss.assistant_turns),
      max_seq_len=c.data.max_seq_len, truncation=c.data.truncation,
      drop_rule=c.data.drop_rule or None)  # "": by loss mode


def resolve_tokenizer_dir(c: ml_collections.ConfigDict, workdir: pathlib.Path,
                          conversations: Sequence[Conversation],
                          pretrained_tokenizer_dir: pathlib.Path | None) -> pathlib.Path:
  if c.data.tokenizer == SYNTHETIC:
    out = workdir / "tokenizer"
    # A resumed run must reuse the same one; process 0 writes it, the others wait to read it.
    if not (out / "tokenizer.json").exists() and distributed.is_main_process():
      synthetic.train_tokenizer(synthetic.tokenizer_texts(list(conversations)), out)
    distributed.sync("synthetic_tokenizer")
    return out
  if c.data.tokenizer:
    return pathlib.Path(c.data.tokenizer)
  _check(pretrained_tokenizer_dir is not None,
         "data.tokenizer is empty and model.init_from names no model to take it from")
  return pathlib.Path(pretrained_tokenizer_dir)


# Model.


def model_options(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """The runtime options of the JAX model, applied to presets and pretrained configs alike."""
  return dict(scan_layers=c.model.scan_layers, remat_policy=c.model.remat_policy,
              param_dtype=c.model.param_dtype, compute_dtype=c.model.compute_dtype,
              attention_impl=c.model.attention_impl)


def model_config(c: ml_collections.ConfigDict, vocab_needed: int,
                 pretrained: LlamaConfig | None = None) -> LlamaConfig:
  if pretrained is not None:
    config = pretrained
  else:
    config = LlamaConfig.preset(c.model.preset, **model_options(c))
    if config.vocab_size < vocab_needed and c.model.preset == "tiny":
      config = config.replace(vocab_size=vocab_needed)  # tiny adapts to its tokenizer
  _check(config.vocab_size >= vocab_needed,
         f"the tokenizer has {vocab_needed} tokens but the model's vocabulary is "
         f"{config.vocab_size}")
  return config


def validate(c: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
  """The settings that cannot work, as one clear line each (before any heavy work)."""
  mesh_shape = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  try:
    mesh_shape = sharding.resolve_mesh_shape(mesh_shape, num_devices)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  rows_axes = mesh_shape[0] * mesh_shape[1]
  b, k = c.train.batch_size, c.train.grad_accum
  _check(k >= 1, f"train.grad_accum must be >= 1, got {k}")
  _check(b % (k * process_count) == 0,
         f"train.batch_size {b} is not divisible by train.grad_accum {k} x {process_count} "
         "processes")
  _check((b // k) % rows_axes == 0,
         f"train.batch_size / train.grad_accum = {b // k} rows per micro-batch do not split "
         f"over the data x fsdp axes ({rows_axes} devices)")
  _check(c.eval.batch_size % max(rows_axes, process_count) == 0,
         f"eval.batch_size {c.eval.batch_size} does not split over {rows_axes} data x fsdp "
         "devices")
  _check(c.train.max_steps > 0 or c.train.epochs > 0,
         "set train.max_steps > 0 or train.epochs > 0")
  _check(0.0 <= c.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)")
  _check(c.neftune_alpha >= 0, "neftune_alpha must be >= 0")
  try:  # the typed configs check their own fields (loss modes, templates, ...)
    encode_config(c)
    LossConfig(c.loss.normalization, c.loss.chunk_size)
    optim_config(c)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def optim_config(c: ml_collections.ConfigDict) -> optim_lib.OptimConfig:
  return optim_lib.OptimConfig(
      learning_rate=c.optim.lr, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
      weight_decay=c.optim.weight_decay,
      max_grad_norm=c.optim.max_grad_norm if c.optim.max_grad_norm > 0 else None,
      warmup_ratio=c.optim.warmup_ratio, decay=c.optim.decay)


def optimizer_for(c: ml_collections.ConfigDict, train_data: pipeline_lib.DataPipeline,
                  total_steps: int) -> tuple[Any, Any, int]:
  """(AdamW, its schedule, updates) for a run of `total_steps` batches of `train_data`.

  The schedule spans the updates those batches hold: the all-padding batches closing an epoch
  that packs into fewer rows do not update.
  """
  updates = train_data.updates(total_steps)
  tx, schedule = optim_lib.make_optimizer(optim_config(c), updates)
  return tx, schedule, updates


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
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

  def export_hf(self, state: step_lib.TrainState) -> pathlib.Path:
    """Writes the trained model as a Hugging Face folder to WORKDIR/hf (replacing it).

    In a multi-process run every process must call it (see `distributed.fetchable`).
    """
    out = self.workdir / "hf"
    # Every process takes part in gathering parameters sharded across hosts; process 0 writes.
    params = distributed.fetchable(state.params)
    if distributed.is_main_process():
      hf_export.export_hf(out, params, self.model_config, str(self.tokenizer_dir),
                          template=self.config.data.template,
                          strip_content=self.config.data.strip_content, overwrite=True)
      log.info("exported a Hugging Face model to %s", out)
    distributed.sync("export_hf")  # no process returns before the folder is complete
    return out

  def run(self) -> loop_lib.LoopResult:
    eval_batches = None if self.eval_data is None else (lambda: iter(self.eval_data.dataset()))
    return loop_lib.run(workdir=str(self.workdir), state=self.state, train_step=self.train_step,
                        mesh=self.mesh, train_batches=self.train_data.dataset(),
                        config=self.loop_config, meta=self.meta, eval_step=self.eval_step,
                        eval_batches=eval_batches, eval_finalize=loss_eval.finalize)


def build(c: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Experiment:
  workdir = pathlib.Path(workdir)
  processes = jax.process_count()
  validate(c, jax.device_count(), processes)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(c.to_json(indent=2) + "\n")

  mesh = sharding.make_mesh(sharding.MeshConfig(c.mesh.data, c.mesh.fsdp, c.mesh.tensor))
  pretrained = None
  if c.model.init_from:  # placed straight into the parameters' shardings
    try:
      pretrained = load_pretrained(c.model.init_from, shardings=sharding.sharding_fn(mesh),
                                   **model_options(c))
    except (OSError, ValueError, KeyError) as e:  # a missing folder, an unsupported config
      raise ConfigError(f"model.init_from={c.model.init_from}: {e}") from None
  conversations = load_train_conversations(c)
  train_convs, held_convs = split_held_out(conversations, c.data.eval_fraction)
  _check(len(train_convs) > 0, f"no training examples left in {c.data.train}")
  tokenizer_dir = resolve_tokenizer_dir(c, workdir, conversations,
                                        pretrained.tokenizer_dir if pretrained else None)
  tokenizer = load_tokenizer(str(tokenizer_dir))
  enc = encode_config(c)

  def make_pipeline(convs, rows, epochs, shuffle):
    cfg = pipeline_lib.PipelineConfig(
        batch_size=rows, packing=c.data.packing, max_segments_per_row=c.data.max_segments_per_row,
        seed=c.train.seed, shuffle=shuffle, num_epochs=epochs, read_threads=c.data.read_threads)
    return pipeline_lib.build_pipeline(convs, tokenizer, enc, cfg)

  rows = c.train.batch_size // processes
  train_data = make_pipeline(train_convs, rows, max(c.train.epochs, 1), True)
  total_steps = c.train.max_steps or train_data.total_steps
  if total_steps > train_data.total_steps:  # more steps than the epochs hold: add epochs
    epochs = math.ceil(total_steps / train_data.steps_per_epoch)
    train_data = train_data.with_epochs(epochs)
  tx, schedule, updates = optimizer_for(c, train_data, total_steps)
  log.info("data: %s; %d batches per epoch, %d batches, %d updates", train_data.stats.as_dict(),
           train_data.steps_per_epoch, total_steps, updates)
  eval_data = None
  if held_convs:
    eval_data = make_pipeline(held_convs, c.eval.batch_size // processes, 1, False)

  mcfg = model_config(c, len(tokenizer), pretrained.config if pretrained else None)
  graphdef, state, shardings = step_lib.create_train_state(
      lambda: Llama(mcfg, rngs=nnx.Rngs(c.train.seed)), tx, mesh, seed=c.train.seed)
  if pretrained is not None:
    # Adam's moments start at zero whatever the parameters are, so only these change.
    state = state.replace(params=nnx.state(pretrained.model, nnx.Param))
    del pretrained
  loss_fn = step_lib.make_loss_fn(LossConfig(c.loss.normalization, c.loss.chunk_size),
                                  neftune_alpha=c.neftune_alpha)
  train_step = step_lib.make_train_step(graphdef, tx, shardings, mesh, loss_fn, schedule=schedule)
  # Held-out eval shares `python -m im_jax.eval loss`'s loss function and reduction.
  eval_step = step_lib.make_eval_step(
      graphdef, shardings, mesh,
      loss_eval.make_eval_loss_fn(LossConfig(c.loss.normalization, c.loss.chunk_size)))
  loop_config = loop_lib.LoopConfig(
      total_steps=total_steps, grad_accum=c.train.grad_accum, log_every=c.train.log_every,
      eval_every=c.eval.every_steps,
      checkpoint=CheckpointConfig(c.checkpoint.every_steps, c.checkpoint.keep,
                                  c.checkpoint.async_save))
  meta = {"config": c.to_dict(), "model_config": mcfg.to_dict(),
          "tokenizer_dir": str(tokenizer_dir.absolute()), "template": c.data.template,
          "strip_content": c.data.strip_content,
          "data_stats": train_data.stats.as_dict(), loop_lib.RESUME_KEY: resume_key(c)}
  return Experiment(c, workdir, mesh, tokenizer_dir, mcfg, train_data, eval_data, graphdef,
                    state, train_step, eval_step, loop_config, meta)


def resume_key(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings a resumed run must share with the run that wrote the checkpoints.

  Data, loss, optimiser, schedule and model numerics; logging, evaluation, checkpointing and
  the mesh shape (restores re-shard) may change between the two.
  """
  data = {k: v for k, v in c.data.to_dict().items() if k != "read_threads"}
  train = {k: v for k, v in c.train.to_dict().items() if k != "log_every"}
  model = {k: c.model[k] for k in ("preset", "param_dtype", "compute_dtype", "scan_layers")}
  return {"data": data, "loss": c.loss.to_dict(), "optim": c.optim.to_dict(), "train": train,
          "model": model, "neftune_alpha": c.neftune_alpha}
