"""From a config (configs/*.py) to a running experiment: validation, data, model, state.

Everything a run needs is built here from the ml-collections config, through the typed
configs of each layer (`EncodeConfig`, `PipelineConfig`, `LlamaConfig`, `OptimConfig`,
`LossConfig`, `MeshConfig`), so the entry point stays thin. Impossible settings fail before
any heavy work with one `ConfigError` line.
"""

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import pathlib
import re
from typing import Any, Callable, Sequence

import jax
import ml_collections
from flax import nnx

from configs import base as base_config
from im_jax import distributed, output_guard
from im_jax.checkpoint import CheckpointConfig
from im_jax.checkpoint.store import newest_meta
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
from im_jax.train import workdir_lock
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
      template=templates.TemplateConfig(c.data.template),
      loss=weights_lib.LossMaskConfig(c.loss.mode, c.loss.instruction_weight,
                                      c.loss.assistant_turns),
      max_seq_len=c.data.max_seq_len, truncation=c.data.truncation, drop_rule=c.data.drop_rule)


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


def _config_error(keys: Sequence[str], error: ValueError) -> ConfigError:
  """A typed config's ValueError as a ConfigError naming the config key it is about.

  The key is the one of `keys` whose last part (the typed field's name) comes first in the
  message; a message starting with that name gets the full key instead.
  """
  message = " ".join(str(error).split())
  found = []
  for key in keys:
    for name in {key.rsplit(".", 1)[-1], *_FIELD_NAMES.get(key, ())}:
      if m := re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message):
        found.append((m.start(), -len(name), key, name))
  if not found:
    return ConfigError(f"{'/'.join(keys)}: {message}")
  start, _, key, name = min(found)
  if start == 0:
    return ConfigError(key + message[len(name):])
  return ConfigError(f"{key}: {message}")


# Config keys whose typed field (or message) uses another name.
_FIELD_NAMES = {"optim.lr": ("learning_rate",), "data.template": ("template",),
                "model.preset": ("preset",), "train.max_steps": ("total_steps",),
                "eval.every_steps": ("eval_every",), "train.log_every": ("log_every",)}


def _typed(keys: Sequence[str], make: Callable[[], Any]) -> Any:
  try:
    return make()
  except ValueError as e:
    raise _config_error(keys, e) from None


def _section_keys(c: ml_collections.ConfigDict, section: str) -> list[str]:
  return [f"{section}.{k}" for k in c[section].keys()]


def check_keys_and_types(c: ml_collections.ConfigDict) -> None:
  """Every key is one of configs/base.py's, with its type (a config file may build its own)."""
  reference = _flat(base_config.get_config().to_dict())
  given = _flat(c.to_dict())
  for key in given:
    if key not in reference:
      raise ConfigError(unknown_key_message(key))
  for key, default in reference.items():
    _check(key in given, f"config key {key} is missing (every key is in configs/base.py)")
    value, want = given[key], type(default)
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float:  # an int is a fine float; a bool is not
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      _check(not ok or math.isfinite(value), f"{key} must be finite, got {value}")
    _check(ok, f"{key} must be a {want.__name__}, got {value!r}")


def check_override_key(key: str) -> None:
  """Raises ConfigError for a `--config.KEY` override naming no key of configs/base.py."""
  if key not in _flat(base_config.get_config().to_dict()):
    raise ConfigError(unknown_key_message(key))


def unknown_key_message(key: str) -> str:
  """`unknown config key data.formt (did you mean data.format?)`."""
  keys = list(_flat(base_config.get_config().to_dict()))
  close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
  hint = f" (did you mean {close[0]}?)" if close else " (every key is in configs/base.py)"
  return f"unknown config key {key}{hint}"


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _check_data_settings(c: ml_collections.ConfigDict) -> None:
  spec = c.data.train
  if spec.startswith(SYNTHETIC + ":"):
    count = spec.split(":", 1)[1]
    _check(count.isdigit() and int(count) > 0,
           f"data.train={spec}: synthetic:N needs a positive whole number N")
    _check(c.data.format == "", f"data.format={c.data.format} does not apply to synthetic data "
           "(leave it empty)")
  _typed(["data.format", "data.on_bad_record"],
         lambda: sources.check_options(c.data.format or None, c.data.on_bad_record))
  _check(c.data.max_examples >= 0, f"data.max_examples must be >= 0, got {c.data.max_examples}")


def check_inputs(c: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
  """The files a run reads exist, and the workdir is none of them (checked before any work)."""
  spec = c.data.train
  _check(bool(spec), "data.train is empty: give a data file, tfds:NAME:SPLIT or synthetic:N")
  data_path = output_guard.local_path(spec)
  if data_path is not None:
    _check(data_path.is_file(), f"data.train={spec}: no such file")
  tokenizer, init_from = c.data.tokenizer, c.model.init_from
  tokenizer_path = output_guard.local_path(tokenizer)
  if tokenizer_path is not None:
    _check(tokenizer_path.is_dir(), f"data.tokenizer={tokenizer}: no such folder")
  init_path = output_guard.local_path(init_from)
  if init_path is not None:
    _check(init_path.is_dir(), f"model.init_from={init_from}: no such folder")
  _check(bool(tokenizer) or bool(init_from),
         "data.tokenizer is empty and model.init_from names no model to take it from")
  workdir = pathlib.Path(workdir)
  try:
    output_guard.check_not_input(workdir, {
        f"data.train={spec}": data_path, f"data.tokenizer={tokenizer}": tokenizer_path,
        f"model.init_from={init_from}": init_path}, what="--workdir")
  except output_guard.UnsafeOutput as e:
    raise ConfigError(str(e)) from None
  _check(not workdir.exists() or workdir.is_dir(), f"--workdir {workdir} is a file, not a folder")
  _check(not (workdir / "im_jax.json").exists(),
         f"--workdir {workdir} is an im_jax CKPT folder; train in a folder of its own")
  _check(not any(workdir.glob("*.safetensors")),
         f"--workdir {workdir} is a Hugging Face model folder; train in a folder of its own")


def validate(c: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
  """Every setting that cannot work, as one line naming the key, before any heavy work.

  Builds every layer's typed config, whose own checks stay next to the code they guard;
  this adds only what crosses layers (batch over mesh, data spec, paths).
  """
  check_keys_and_types(c)
  mesh_shape = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  try:
    mesh_shape = sharding.resolve_mesh_shape(mesh_shape, num_devices)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  rows_axes = mesh_shape[0] * mesh_shape[1]
  b, k = c.train.batch_size, c.train.grad_accum
  _check(b >= 1, f"train.batch_size must be >= 1, got {b}")
  _check(k >= 1, f"train.grad_accum must be >= 1, got {k}")
  _check(b % (k * process_count) == 0,
         f"train.batch_size {b} is not divisible by train.grad_accum {k} x {process_count} "
         "processes")
  _check((b // k) % rows_axes == 0,
         f"train.batch_size / train.grad_accum = {b // k} rows per micro-batch do not split "
         f"over the data x fsdp axes ({rows_axes} devices)")
  _check(c.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {c.eval.batch_size}")
  _check(c.eval.batch_size % max(rows_axes, process_count) == 0,
         f"eval.batch_size {c.eval.batch_size} does not split over {rows_axes} data x fsdp "
         "devices")
  _check(c.train.max_steps >= 0, f"train.max_steps must be >= 0, got {c.train.max_steps}")
  _check(c.train.epochs >= 0, f"train.epochs must be >= 0, got {c.train.epochs}")
  _check(c.train.max_steps > 0 or c.train.epochs > 0,
         "set train.max_steps > 0 or train.epochs > 0")
  _check(c.train.seed >= 0, f"train.seed must be >= 0, got {c.train.seed}")
  _check(0.0 <= c.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)")
  _check(c.neftune_alpha >= 0, "neftune_alpha must be >= 0")
  _check_data_settings(c)
  # The typed configs check their own fields (loss modes, templates, dtypes, ...).
  _typed(_section_keys(c, "model"),
         lambda: LlamaConfig.preset(c.model.preset, **model_options(c)))
  _typed(_section_keys(c, "data") + _section_keys(c, "loss"), lambda: encode_config(c))
  _typed(["loss.normalization", "loss.chunk_size"],
         lambda: LossConfig(c.loss.normalization, c.loss.chunk_size))
  _typed(_section_keys(c, "optim"), lambda: optim_config(c))
  _typed(_section_keys(c, "data"), lambda: pipeline_config(c, rows=1, epochs=1, shuffle=True))
  _typed(_section_keys(c, "checkpoint"), lambda: checkpoint_config(c))
  _typed(["train.max_steps", "train.grad_accum", "train.log_every", "eval.every_steps",
          "train.max_consecutive_skips"], lambda: loop_config(c, total_steps=1))


def pipeline_config(c: ml_collections.ConfigDict, rows: int, epochs: int,
                    shuffle: bool) -> pipeline_lib.PipelineConfig:
  return pipeline_lib.PipelineConfig(
      batch_size=rows, packing=c.data.packing, max_segments_per_row=c.data.max_segments_per_row,
      seed=c.train.seed, shuffle=shuffle, num_epochs=epochs, read_threads=c.data.read_threads)


def checkpoint_config(c: ml_collections.ConfigDict) -> CheckpointConfig:
  return CheckpointConfig(c.checkpoint.every_steps, c.checkpoint.keep, c.checkpoint.async_save)


def loop_config(c: ml_collections.ConfigDict, total_steps: int) -> loop_lib.LoopConfig:
  return loop_lib.LoopConfig(
      total_steps=total_steps, grad_accum=c.train.grad_accum, log_every=c.train.log_every,
      eval_every=c.eval.every_steps, checkpoint=checkpoint_config(c),
      max_consecutive_skips=c.train.max_consecutive_skips)


def optim_config(c: ml_collections.ConfigDict) -> optim_lib.OptimConfig:
  return optim_lib.OptimConfig(
      learning_rate=c.optim.lr, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
      weight_decay=c.optim.weight_decay,
      max_grad_norm=c.optim.max_grad_norm if c.optim.max_grad_norm > 0 else None,
      warmup_ratio=c.optim.warmup_ratio, decay=c.optim.decay)


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
                          template=self.config.data.template, overwrite=True)
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
  check_inputs(c, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:  # one run per workdir; the other processes share it
    workdir_lock.acquire(workdir)
  check_resumable(c, workdir)
  if jax.process_index() == 0:  # only now: a refused resume leaves the workdir as it was
    _write_atomic(workdir / "config.json", c.to_json(indent=2) + "\n")

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
    return pipeline_lib.build_pipeline(convs, tokenizer, enc,
                                       pipeline_config(c, rows, epochs, shuffle))

  rows = c.train.batch_size // processes
  train_data = make_pipeline(train_convs, rows, max(c.train.epochs, 1), True)
  total_steps = c.train.max_steps or train_data.total_steps
  if total_steps > train_data.total_steps:  # more steps than the epochs hold: add epochs
    epochs = math.ceil(total_steps / train_data.steps_per_epoch)
    train_data = train_data.with_epochs(epochs)
  log.info("data: %s; %d steps per epoch, %d steps", train_data.stats.as_dict(),
           train_data.steps_per_epoch, total_steps)
  eval_data = None
  if held_convs:
    eval_data = make_pipeline(held_convs, c.eval.batch_size // processes, 1, False)

  mcfg = model_config(c, len(tokenizer), pretrained.config if pretrained else None)
  tx, schedule = optim_lib.make_optimizer(optim_config(c), total_steps)
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
  meta = {"config": c.to_dict(), "model_config": mcfg.to_dict(),
          "tokenizer_dir": str(tokenizer_dir.absolute()), "template": c.data.template,
          "data_stats": train_data.stats.as_dict(), loop_lib.RESUME_KEY: resume_key(c)}
  return Experiment(c, workdir, mesh, tokenizer_dir, mcfg, train_data, eval_data, graphdef,
                    state, train_step, eval_step, loop_config(c, total_steps), meta)


def check_resumable(c: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses, before any work, a workdir whose checkpoints belong to other settings."""
  newest = newest_meta(workdir)
  if newest is not None:
    loop_lib.check_same_run(newest[1], {loop_lib.RESUME_KEY: resume_key(c)},
                            workdir / "checkpoints")


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.partial")
  tmp.write_text(text)
  os.replace(tmp, path)


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
