"""From the ml-collections config (configs/base.py) to one typed `RunConfig`, validated.

`load` turns the ConfigDict a config file builds into a `RunConfig`: one frozen section per
config section, whose fields are the section's keys (`run.optim.lr` is `optim.lr`). Sections
that are one layer's config are that config (`OptimConfig`, `CheckpointConfig`, `MeshConfig`,
`WandbConfig`); the others are plain sections here, from which the layers' configs are built
(`encode_config`, `loss_config`, `pipeline_config`, `loop_config`). Every typed config checks
its own fields next to the code they guard and starts its message with the field's name, so
the section's name in front of it is the key the user wrote: every bad setting is one
`ConfigError` line naming its key before any work. `check_mesh` adds what depends on the
devices; `check_inputs` checks the files a run reads and where it writes. Only this module
(with the config files and entry points) knows ml-collections: the rest takes the typed config.
"""

import dataclasses
import difflib
import json
import math
import os
import pathlib
import re
from typing import Any, Callable, Sequence

import ml_collections
from flax import traverse_util

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
# Every key with its default, in configs/base.py's order (ConfigDict.to_dict sorts).
_BASE_TREE = json.loads(base_config.get_config().to_json())


class ConfigError(ValueError):
  """An impossible or inconsistent setting; the message is one line for the user."""


def check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _at_least(section: Any, lows: dict[str, int]) -> None:
  for name, low in lows.items():
    if getattr(section, name) < low:
      raise ValueError(f"{name} must be >= {low}, got {getattr(section, name)}")


# The sections that are no single layer's config. Field order is configs/base.py's.


@dataclasses.dataclass(frozen=True)
class LoraSection:
  rank: int
  alpha: float
  targets: str  # comma-separated, as written
  dropout: float


@dataclasses.dataclass(frozen=True)
class ModelSection:
  preset: str
  init_from: str
  scan_layers: bool
  remat_policy: str
  param_dtype: str
  compute_dtype: str
  attention_impl: str
  lora: LoraSection


@dataclasses.dataclass(frozen=True)
class DataSection:
  train: str
  format: str
  tokenizer: str
  template: str
  max_seq_len: int
  truncation: str
  strip_content: bool | None
  drop_rule: str
  packing: str
  max_segments_per_row: int
  eval_fraction: float
  max_examples: int
  on_bad_record: str
  read_threads: int

  def __post_init__(self):
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError("eval_fraction must be in [0, 1)")
    _at_least(self, {"max_examples": 0})


@dataclasses.dataclass(frozen=True)
class LossSection:
  mode: str
  instruction_weight: float
  normalization: str
  assistant_turns: str
  chunk_size: int
  kl_to_base: float
  kl_type: str


@dataclasses.dataclass(frozen=True)
class TrainSection:
  batch_size: int
  max_steps: int
  epochs: int
  seed: int
  grad_accum: int
  log_every: int
  max_consecutive_skips: int

  def __post_init__(self):
    _at_least(self, {"batch_size": 1, "grad_accum": 1, "max_steps": 0, "epochs": 0, "seed": 0,
                     "log_every": 1, "max_consecutive_skips": 1})


@dataclasses.dataclass(frozen=True)
class EvalSection:
  every_steps: int
  batch_size: int
  harness_tasks: str
  harness_every_steps: int
  harness_limit: int
  harness_include_path: str

  def __post_init__(self):
    _at_least(self, {"every_steps": 0, "batch_size": 1, "harness_every_steps": 0,
                     "harness_limit": 0})
    if self.harness_tasks and not all(n.strip() for n in self.harness_tasks.split(",")):
      raise ValueError(f"harness_tasks={self.harness_tasks}: an empty name between commas")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A run's whole config, typed and validated (`load`): a section per config section."""

  model: ModelSection
  data: DataSection
  loss: LossSection
  optim: optim_lib.OptimConfig
  train: TrainSection
  mesh: sharding.MeshConfig
  checkpoint: CheckpointConfig
  eval: EvalSection
  log: WandbConfig
  neftune_alpha: float
  export_hf: bool

  def to_dict(self) -> dict[str, Any]:
    """The keys as written, sorted as the ConfigDict's `to_dict` sorts them: the checkpoints'
    meta and the resume check hold exactly what they held when they took the ConfigDict."""
    return json.loads(self.to_json(sort_keys=True))

  def to_json(self, **kwargs) -> str:
    """As the ConfigDict's `to_json` (configs/base.py's order): config.json, byte for byte."""
    def take(node: Any, keys: dict[str, Any]) -> dict[str, Any]:
      return {k: take(getattr(node, k), v) if isinstance(v, dict) else getattr(node, k)
              for k, v in keys.items()}
    return json.dumps(take(self, _BASE_TREE), **kwargs)


def _config_error(sections: Sequence[str], error: ValueError) -> ConfigError:
  """A typed config's ValueError as a ConfigError naming its key: the message starts with
  the field it is about, and the field is the key's last part in one of `sections`."""
  message = " ".join(str(error).split())
  field = re.match(r"\w*", message).group()
  for section in sections:
    if field and f"{section}.{field}" in _BASE_KEYS:
      return ConfigError(f"{section}.{message}")
  return ConfigError(f"{'/'.join(sections)}: {message}")


def _typed(sections: Sequence[str], make: Callable[[], Any]) -> Any:
  """`make()`, its ValueError named by the key (a ConfigError already is)."""
  try:
    return make()
  except ConfigError:
    raise
  except ValueError as e:
    raise _config_error(sections, e) from None


def load(c: ml_collections.ConfigDict) -> RunConfig:
  """The typed config of `c`: every setting that cannot work, as one line naming the key,
  before any heavy work. What depends on the devices is `check_mesh`'s."""
  check_keys_and_types(c)
  d = c.to_dict()
  model = {**d["model"], "lora": _typed(["model.lora"], lambda: LoraSection(**d["model"]["lora"]))}
  run = RunConfig(
      model=_typed(["model"], lambda: ModelSection(**model)),
      data=_typed(["data"], lambda: DataSection(**d["data"])),
      loss=_typed(["loss"], lambda: LossSection(**d["loss"])),
      optim=_typed(["optim"], lambda: optim_lib.OptimConfig(**d["optim"])),
      train=_typed(["train"], lambda: TrainSection(**d["train"])),
      mesh=_typed(["mesh"], lambda: sharding.MeshConfig(**d["mesh"])),
      checkpoint=_typed(["checkpoint"], lambda: CheckpointConfig(**d["checkpoint"])),
      eval=_typed(["eval"], lambda: EvalSection(**d["eval"])),
      log=_typed(["log"], lambda: WandbConfig(**d["log"])),
      neftune_alpha=d["neftune_alpha"], export_hf=d["export_hf"])
  check(run.train.max_steps > 0 or run.train.epochs > 0,
        "set train.max_steps > 0 or train.epochs > 0")
  check(run.neftune_alpha >= 0, "neftune_alpha must be >= 0")
  _check_data_settings(run)
  # The layers' configs check their own fields (loss modes, templates, dtypes, ...).
  _typed(["model"], lambda: LlamaConfig.preset(run.model.preset, **model_options(run)))
  lora = _typed(["model.lora"], lambda: lora_config(run))
  check(not lora.enabled or bool(run.model.init_from),
        f"model.lora.rank={lora.rank} needs model.init_from: adapters train on a pretrained base")
  _typed(["data", "loss"], lambda: encode_config(run))
  for source in train_sources(run):  # a source's own template / loss mode / drop rule
    _typed(["data.train"], lambda source=source: encode_config(run, source))
  _typed(["loss"], lambda: loss_config(run))
  _typed(["data"], lambda: pipeline_config(run, rows=1, epochs=1, shuffle=True))
  return run


def check_mesh(run: RunConfig, num_devices: int, process_count: int) -> None:
  """The batches split over the mesh these devices make (the rest is checked by `load`)."""
  try:
    mesh_shape = sharding.resolve_mesh_shape(run.mesh.shape, num_devices)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  rows_axes = mesh_shape[0] * mesh_shape[1]
  b, k = run.train.batch_size, run.train.grad_accum
  check(b % (k * process_count) == 0,
        f"train.batch_size {b} is not divisible by train.grad_accum {k} x {process_count} "
        "processes")
  check((b // k) % rows_axes == 0,
        f"train.batch_size / train.grad_accum = {b // k} rows per micro-batch do not split "
        f"over the data x fsdp axes ({rows_axes} devices)")
  check(run.eval.batch_size % max(rows_axes, process_count) == 0,
        f"eval.batch_size {run.eval.batch_size} does not split over {rows_axes} data x fsdp "
        "devices")


def validate(c: ml_collections.ConfigDict, num_devices: int, process_count: int) -> RunConfig:
  """`load` and `check_mesh`: what an entry point runs once, before any work."""
  run = load(c)
  check_mesh(run, num_devices, process_count)
  return run


def train_sources(run: RunConfig) -> list[mixture.Source]:
  """`data.train`'s sources (one for a plain spec; see `im_jax.data.mixture`)."""
  try:
    return mixture.parse(run.data.train)
  except mixture.MixtureError as e:
    raise ConfigError(str(e)) from None


def encode_config(run: RunConfig, source: Any = None) -> encode_lib.EncodeConfig:
  """The run's encoding; a mixture `source`'s template, loss mode and drop rule, where it
  sets them, replace data.template, loss.mode and data.drop_rule."""
  data, loss = run.data, run.loss
  template = getattr(source, "template", None) or data.template
  mode = getattr(source, "loss", None) or loss.mode
  drop_rule = getattr(source, "drop_rule", None) or data.drop_rule or None  # None: by mode
  return encode_lib.EncodeConfig(
      template=templates.TemplateConfig(template, strip_content=data.strip_content),
      # instruction_weight is an im setting: a source of another mode than the run's keeps 1
      loss=weights_lib.LossMaskConfig(
          mode, loss.instruction_weight if mode == loss.mode else 1.0, loss.assistant_turns),
      max_seq_len=data.max_seq_len, truncation=data.truncation, drop_rule=drop_rule)


def model_options(run: RunConfig) -> dict[str, Any]:
  """The runtime options of the JAX model, applied to presets and pretrained configs alike."""
  m = run.model
  return dict(scan_layers=m.scan_layers, remat_policy=m.remat_policy,
              param_dtype=m.param_dtype, compute_dtype=m.compute_dtype,
              attention_impl=m.attention_impl)


def lora_config(run: RunConfig) -> LoraConfig:
  lora = run.model.lora
  return LoraConfig(lora.rank, lora.alpha, parse_targets(lora.targets), lora.dropout)


def loss_config(run: RunConfig) -> LossConfig:
  sources = train_sources(run)
  loss = run.loss
  weights = tuple(s.example_weight for s in sources)
  check(len(sources) > 1 or weights == (1.0,),
        "data.train: example_weight weighs a source against the others: give a second source")
  return LossConfig(loss.normalization, loss.chunk_size, loss.kl_to_base, loss.kl_type,
                    tuple(s.name for s in sources) if len(sources) > 1 else (),
                    weights if any(w != 1.0 for w in weights) else ())


def pipeline_config(run: RunConfig, rows: int, epochs: int,
                    shuffle: bool) -> pipeline_lib.PipelineConfig:
  data = run.data
  return pipeline_lib.PipelineConfig(
      batch_size=rows, packing=data.packing, max_segments_per_row=data.max_segments_per_row,
      seed=run.train.seed, shuffle=shuffle, num_epochs=epochs, read_threads=data.read_threads)


def loop_config(run: RunConfig, total_steps: int) -> loop_lib.LoopConfig:
  """The loop's config: `total_steps` is the run's resolved length (train.max_steps, or the
  epochs' batches when it is 0)."""
  return loop_lib.LoopConfig(
      total_steps=total_steps, grad_accum=run.train.grad_accum, log_every=run.train.log_every,
      eval_every=run.eval.every_steps, checkpoint=run.checkpoint,
      max_consecutive_skips=run.train.max_consecutive_skips)


def check_keys_and_types(c: ml_collections.ConfigDict) -> None:
  """Every key is one of configs/base.py's, with its type (a config file may build its own)."""
  given = traverse_util.flatten_dict(c.to_dict(), sep=".")
  for key in given:
    if key not in _BASE_KEYS:
      raise ConfigError(unknown_key_message(key))
  for key, want in _BASE_TYPES.items():
    check(key in given, f"config key {key} is missing (every key is in im_jax/configs/base.py)")
    value = given[key]
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float:  # an int is a fine float; a bool is not
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      check(not ok or math.isfinite(value), f"{key} must be finite, got {value}")
    if value is None and _BASE_KEYS[key] is None:  # a placeholder (data.strip_content): unset
      ok = True
    check(ok, f"{key} must be a {want.__name__}, got {value!r}")


def check_override_key(key: str) -> None:
  """Raises ConfigError for a `--config.KEY` override naming no key of configs/base.py."""
  if key not in _BASE_KEYS:
    raise ConfigError(unknown_key_message(key))


def unknown_key_message(key: str) -> str:
  """`unknown config key data.formt (did you mean data.format?)`."""
  close = difflib.get_close_matches(key, list(_BASE_KEYS), n=1, cutoff=0.6)
  hint = f" (did you mean {close[0]}?)" if close else " (every key is in im_jax/configs/base.py)"
  return f"unknown config key {key}{hint}"


def _key_types(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, type]:
  """Each key's type; a placeholder's is the type it was declared with."""
  out = {}
  for k in c.keys():
    if isinstance(c[k], ml_collections.ConfigDict):
      out.update(_key_types(c[k], f"{prefix}{k}."))
    else:
      out[prefix + k] = c.get_type(k)
  return out


_BASE_KEYS = traverse_util.flatten_dict(_BASE_TREE, sep=".")  # `section.key` -> default
_BASE_TYPES = _key_types(base_config.get_config())


def _check_data_settings(run: RunConfig) -> None:
  data = run.data
  for source in train_sources(run):
    spec = source.spec
    if spec.startswith(SYNTHETIC + ":"):
      count = spec.split(":", 1)[1]
      check(count.isdigit() and int(count) > 0,
            f"data.train={spec}: synthetic:N needs a positive whole number N")
      check(data.format == "" and source.format is None,
            f"data.format={data.format or source.format} does not apply to synthetic data "
            "(leave it empty)")
  _typed(["data"], lambda: sources.check_options(data.format or None, data.on_bad_record))


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


def check_inputs(run: RunConfig, workdir: str | pathlib.Path) -> None:
  """The files a run reads exist, and the workdir is none of them (checked before any work).

  `hf:` names are resolved here (a local path, else the Hugging Face cache): see `hub`.
  Any of them, and the workdir, may be gs:// paths (`paths`): their buckets are checked.
  """
  check(bool(run.data.train),
         "data.train is empty: give a data file, tfds:NAME:SPLIT or synthetic:N")
  inputs = {}
  for source in train_sources(run):
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
  tokenizer, init_from = run.data.tokenizer, run.model.init_from
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
  tasks_dir = run.eval.harness_include_path
  check(not tasks_dir or pathlib.Path(tasks_dir).is_dir(),
        f"eval.harness_include_path={tasks_dir}: no such folder")
  try:
    wandb_log.check_logged_in(run.log)
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
