"""From the ml-collections config (configs/base.py) to every layer's typed config, validated.

Each layer's typed config (`LlamaConfig`, `EncodeConfig`, `LossConfig`, `OptimConfig`,
`PipelineConfig`, `CheckpointConfig`, `LoopConfig`) checks its own fields, next to the code
they guard; `validate` builds all of them up front and adds only the rules that cross layers
(the batch over the mesh, the data spec), so every bad setting is one `ConfigError` line
naming its key before any work. `check_inputs` checks the files a run reads and where it
writes.
"""

import difflib
import math
import os
import pathlib
import re
from typing import Any, Callable, Sequence

import ml_collections

from im_jax.configs import base as base_config
from im_jax import hub, model_files, output_guard, paths
from im_jax.checkpoint import CheckpointConfig
from im_jax.convert.load import read_pretrained
from im_jax.data import encode as encode_lib
from im_jax.data import mixture
from im_jax.data import pipeline as pipeline_lib
from im_jax.data import sources, templates
from im_jax.data import weights as weights_lib
from im_jax.models.llama import LlamaConfig
from im_jax.models.lora import LoraConfig, parse_targets
from im_jax.train import loop as loop_lib
from im_jax.train import optim as optim_lib
from im_jax.train import sharding
from im_jax.train.loss import LossConfig
from im_jax.run import wandb_log
from im_jax.run.wandb_log import WandbConfig

SYNTHETIC = "synthetic"


class ConfigError(ValueError):
  """An impossible or inconsistent setting; the message is one line for the user."""


def check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def train_sources(c: ml_collections.ConfigDict) -> list[mixture.Source]:
  """`data.train`'s sources (one for a plain spec; see `im_jax.data.mixture`)."""
  try:
    return mixture.parse(c.data.train)
  except mixture.MixtureError as e:
    raise ConfigError(str(e)) from None


def encode_config(c: ml_collections.ConfigDict,
                  template: str | None = None) -> encode_lib.EncodeConfig:
  """The run's encoding; `template` (a mixture source's override) replaces data.template."""
  return encode_lib.EncodeConfig(
      template=templates.TemplateConfig(template or c.data.template,
                                        strip_content=c.data.strip_content),
      loss=weights_lib.LossMaskConfig(c.loss.mode, c.loss.instruction_weight,
                                      c.loss.assistant_turns),
      max_seq_len=c.data.max_seq_len, truncation=c.data.truncation,
      drop_rule=c.data.drop_rule or None)  # "": by loss mode


def model_options(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """The runtime options of the JAX model, applied to presets and pretrained configs alike."""
  return dict(scan_layers=c.model.scan_layers, remat_policy=c.model.remat_policy,
              param_dtype=c.model.param_dtype, compute_dtype=c.model.compute_dtype,
              attention_impl=c.model.attention_impl)


def lora_config(c: ml_collections.ConfigDict) -> LoraConfig:
  lora = c.model.lora
  return LoraConfig(lora.rank, lora.alpha, parse_targets(lora.targets), lora.dropout)


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
    check(key in given, f"config key {key} is missing (every key is in im_jax/configs/base.py)")
    value, want = given[key], type(default)
    if default is None:  # a placeholder (data.strip_content): unset, or a value of its type
      *sections, name = key.split(".")
      section = base_config.get_config()
      for part in sections:
        section = section[part]
      want = section.get_type(name)
      check(value is None or isinstance(value, want),
            f"{key} must be a {want.__name__} or unset, got {value!r}")
      continue
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float:  # an int is a fine float; a bool is not
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      check(not ok or math.isfinite(value), f"{key} must be finite, got {value}")
    check(ok, f"{key} must be a {want.__name__}, got {value!r}")


def check_override_key(key: str) -> None:
  """Raises ConfigError for a `--config.KEY` override naming no key of configs/base.py."""
  if key not in _flat(base_config.get_config().to_dict()):
    raise ConfigError(unknown_key_message(key))


def unknown_key_message(key: str) -> str:
  """`unknown config key data.formt (did you mean data.format?)`."""
  keys = list(_flat(base_config.get_config().to_dict()))
  close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
  hint = f" (did you mean {close[0]}?)" if close else " (every key is in im_jax/configs/base.py)"
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
  for source in train_sources(c):
    spec = source.spec
    if spec.startswith(SYNTHETIC + ":"):
      count = spec.split(":", 1)[1]
      check(count.isdigit() and int(count) > 0,
             f"data.train={spec}: synthetic:N needs a positive whole number N")
      check(c.data.format == "" and source.format is None,
             f"data.format={c.data.format or source.format} does not apply to synthetic data "
             "(leave it empty)")
  _typed(["data.format", "data.on_bad_record"],
         lambda: sources.check_options(c.data.format or None, c.data.on_bad_record))
  check(c.data.max_examples >= 0, f"data.max_examples must be >= 0, got {c.data.max_examples}")


def _hub_path(key: str, spec: str, resolve: Callable[[str], pathlib.Path]) -> pathlib.Path:
  try:
    return resolve(spec)
  except hub.HubError as e:
    raise ConfigError(f"{key}={spec}: {e}") from None


def _hub_hint(spec: str) -> str:
  """For a missing `ORG/NAME`: Hub names take the hf: prefix (a bare one is a local path)."""
  looks_like_hub = re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith(".")
  return f" (a Hugging Face Hub name is written hf:{spec})" if looks_like_hub else ""


def _check_model_files(spec: str | pathlib.Path, tokenizer_only: bool = False) -> None:
  """A damaged model or tokenizer file (cut short, unparsable, a shard missing, a tensor
  that disagrees with config.json) stops the run here, before the workdir is touched: one
  line `FILE: what is wrong` from the loader every command shares (convert.load)."""
  try:
    if tokenizer_only:
      model_files.check_tokenizer_files(spec)
    else:
      read_pretrained(spec)
  except model_files.ModelFileError as e:  # names its file
    raise ConfigError(str(e)) from None
  except (OSError, ValueError, KeyError) as e:  # not a model folder, an unsupported format
    raise ConfigError(f"{'data.tokenizer' if tokenizer_only else 'model.init_from'}={spec}: "
                      f"{' '.join(str(e).split())}") from None


def _remote_input(key: str, spec: str) -> str:
  """A gs:// input: its bucket reachable and the object (or folder) there."""
  try:
    paths.check_ready(spec, what=key)
    found = paths.path(spec.removeprefix(hub.PREFIX)).exists()
  except paths.CloudError as e:
    raise ConfigError(str(e)) from None
  check(found, f"{key}={spec}: no such object or folder")
  return spec.removeprefix(hub.PREFIX)


def check_inputs(c: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
  """The files a run reads exist, and the workdir is none of them (checked before any work).

  `hf:` names are resolved here (a local path, else the Hugging Face cache): see `hub`.
  Any of them, and the workdir, may be gs:// paths (`paths`): their buckets are checked.
  """
  check(bool(c.data.train),
         "data.train is empty: give a data file, tfds:NAME:SPLIT or synthetic:N")
  inputs = {}
  for source in train_sources(c):
    spec = source.spec
    if paths.is_remote(spec):
      data_path = _remote_input("data.train", spec)
    elif spec.startswith(hub.PREFIX):
      files = _hub_path("data.train", spec, hub.dataset_files)
      data_path = pathlib.Path(os.path.commonpath(files))
    else:
      data_path = output_guard.local_path(spec)
      if data_path is not None:
        check(data_path.is_file(), f"data.train={spec}: no such file{_hub_hint(spec)}")
    inputs[f"data.train={spec}"] = data_path
  tokenizer, init_from = c.data.tokenizer, c.model.init_from
  tokenizer_path = None
  if paths.is_remote(tokenizer):
    tokenizer_path = _remote_input("data.tokenizer", tokenizer)
  elif tokenizer and tokenizer != SYNTHETIC:
    tokenizer_path = _hub_path("data.tokenizer", tokenizer, hub.folder)
    check(tokenizer_path.is_dir(),
          f"data.tokenizer={tokenizer}: no such folder{_hub_hint(tokenizer)}")
  init_path = None
  if paths.is_remote(init_from):
    init_path = _remote_input("model.init_from", init_from)
  elif init_from:
    init_path = _hub_path("model.init_from", init_from, hub.folder)
    check(init_path.is_dir(), f"model.init_from={init_from}: no such folder{_hub_hint(init_from)}")
    _check_model_files(init_from)
  if tokenizer_path is not None and not paths.is_remote(tokenizer_path):  # a copy is checked
    _check_model_files(tokenizer_path, tokenizer_only=True)
  check(bool(tokenizer) or bool(init_from),
         "data.tokenizer is empty and model.init_from names no model to take it from")
  tasks_dir = c.eval.harness_include_path
  check(not tasks_dir or pathlib.Path(tasks_dir).is_dir(),
        f"eval.harness_include_path={tasks_dir}: no such folder")
  try:
    wandb_log.check_logged_in(wandb_config(c))
  except wandb_log.WandbUnavailable as e:
    raise ConfigError(str(e)) from None
  try:
    paths.check_ready(workdir, what="--workdir")
    workdir = paths.path(workdir)
  except paths.CloudError as e:
    raise ConfigError(str(e)) from None
  try:
    output_guard.check_not_input(workdir, {
        **inputs, f"data.tokenizer={tokenizer}": tokenizer_path,
        f"model.init_from={init_from}": init_path}, what="--workdir")
  except output_guard.UnsafeOutput as e:
    raise ConfigError(str(e)) from None
  check(not workdir.exists() or workdir.is_dir(), f"--workdir {workdir} is a file, not a folder")
  check(not (workdir / "im_jax.json").exists(),
         f"--workdir {workdir} is an im_jax CKPT folder; train in a folder of its own")
  check(not any(workdir.glob("*.safetensors")),
         f"--workdir {workdir} is a Hugging Face model folder; train in a folder of its own")


def validate(c: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
  """Every setting that cannot work, as one line naming the key, before any heavy work.

  Builds every layer's typed config, whose own checks stay next to the code they guard;
  this adds only what crosses layers (batch over mesh, data spec, paths).
  """
  check_keys_and_types(c)
  for axis in sharding.MESH_AXES:
    size = c.mesh[axis]
    check(size >= 1 or size == -1, f"mesh.{axis} must be >= 1 or -1, got {size}")
  mesh_shape = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  try:
    mesh_shape = sharding.resolve_mesh_shape(mesh_shape, num_devices)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  rows_axes = mesh_shape[0] * mesh_shape[1]
  b, k = c.train.batch_size, c.train.grad_accum
  check(b >= 1, f"train.batch_size must be >= 1, got {b}")
  check(k >= 1, f"train.grad_accum must be >= 1, got {k}")
  check(b % (k * process_count) == 0,
         f"train.batch_size {b} is not divisible by train.grad_accum {k} x {process_count} "
         "processes")
  check((b // k) % rows_axes == 0,
         f"train.batch_size / train.grad_accum = {b // k} rows per micro-batch do not split "
         f"over the data x fsdp axes ({rows_axes} devices)")
  check(c.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {c.eval.batch_size}")
  check(c.eval.batch_size % max(rows_axes, process_count) == 0,
         f"eval.batch_size {c.eval.batch_size} does not split over {rows_axes} data x fsdp "
         "devices")
  check(c.eval.harness_every_steps >= 0,
        f"eval.harness_every_steps must be >= 0, got {c.eval.harness_every_steps}")
  check(c.eval.harness_limit >= 0, f"eval.harness_limit must be >= 0, got {c.eval.harness_limit}")
  check(all(n.strip() for n in c.eval.harness_tasks.split(",")) or not c.eval.harness_tasks,
        f"eval.harness_tasks={c.eval.harness_tasks}: an empty name between commas")
  check(c.train.max_steps >= 0, f"train.max_steps must be >= 0, got {c.train.max_steps}")
  check(c.train.epochs >= 0, f"train.epochs must be >= 0, got {c.train.epochs}")
  check(c.train.max_steps > 0 or c.train.epochs > 0,
         "set train.max_steps > 0 or train.epochs > 0")
  check(c.train.seed >= 0, f"train.seed must be >= 0, got {c.train.seed}")
  check(0.0 <= c.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)")
  check(c.neftune_alpha >= 0, "neftune_alpha must be >= 0")
  _check_data_settings(c)
  # The typed configs check their own fields (loss modes, templates, dtypes, ...).
  _typed(_section_keys(c, "model"),
         lambda: LlamaConfig.preset(c.model.preset, **model_options(c)))
  lora = _typed([f"model.lora.{k}" for k in c.model.lora.keys()], lambda: lora_config(c))
  check(not lora.enabled or bool(c.model.init_from),
         f"model.lora.rank={lora.rank} needs model.init_from: adapters train on a pretrained base")
  _typed(_section_keys(c, "data") + _section_keys(c, "loss"), lambda: encode_config(c))
  _typed(["loss.normalization", "loss.chunk_size", "loss.kl_to_base", "loss.kl_type"],
         lambda: loss_config(c))
  _typed(_section_keys(c, "optim"), lambda: optim_config(c))
  _typed(_section_keys(c, "data"), lambda: pipeline_config(c, rows=1, epochs=1, shuffle=True))
  _typed(_section_keys(c, "checkpoint"), lambda: checkpoint_config(c))
  _typed(_section_keys(c, "log"), lambda: wandb_config(c))
  _typed(["train.max_steps", "train.grad_accum", "train.log_every", "eval.every_steps",
          "train.max_consecutive_skips"], lambda: loop_config(c, total_steps=1))


def loss_config(c: ml_collections.ConfigDict) -> LossConfig:
  names = [source.name for source in train_sources(c)]
  return LossConfig(c.loss.normalization, c.loss.chunk_size, c.loss.kl_to_base,
                    c.loss.kl_type, tuple(names) if len(names) > 1 else ())


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


def wandb_config(c: ml_collections.ConfigDict) -> WandbConfig:
  return WandbConfig.from_keys(c.log.wandb_project, c.log.wandb_entity, c.log.wandb_run_name,
                               c.log.wandb_tags)


def optim_config(c: ml_collections.ConfigDict) -> optim_lib.OptimConfig:
  return optim_lib.OptimConfig(
      learning_rate=c.optim.lr, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
      weight_decay=c.optim.weight_decay,
      max_grad_norm=c.optim.max_grad_norm if c.optim.max_grad_norm > 0 else None,
      warmup_ratio=c.optim.warmup_ratio, decay=c.optim.decay)
