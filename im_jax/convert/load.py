"""Load a pretrained model from any source the stack knows, straight into shardings.

`load_pretrained(spec)` accepts:
- `hf:DIR`, `hf:ORG/NAME` (a Hub name, from the local HF cache: see `im_jax.hub`) or a folder
  with config.json and safetensors: a Hugging Face folder, streamed tensor by tensor through
  `params.load_hf`;
- a CKPT folder (has im_jax.json): `ckpt.load_ckpt`;
- a training workdir, its `checkpoints/` folder or one `checkpoints/<step>/` folder: the
  parameters of the newest (or that) step, read from the `state` item's `params` field with an
  orbax partial restore (optimizer state is never read), plus the `meta` item's
  `model_config`, `tokenizer` and, if present, `template`.

`shardings` is None (first device), a callable `(logical_axes, shape) -> Sharding` such as
`lambda axes, shape: NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh))`, or the
trainer's pytree `sharding.state_shardings(abstract_params, mesh)`: every parameter is placed on
its shards directly.
"""

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from im_jax import hub, model_files, paths
from im_jax.convert import ckpt
from im_jax.convert.files import PathLike
from im_jax.models.llama import LlamaConfig
from im_jax.models.llama import params as hf_params

HF_PREFIX = hub.PREFIX
# A LoRA run's meta key: the `model.init_from` its adapters apply to (checkpoints hold only
# the adapters, so a LoRA checkpoint is not self-contained).
LORA_BASE = "lora_base"


def load_pretrained(spec: PathLike, *, shardings: Any = None, base: PathLike | None = None,
                    **config_overrides) -> ckpt.LoadedCkpt:
  """(model, config, tokenizer_dir, info) from `hf:DIR`, a CKPT or a training checkpoint.

  `info["template"]` is the chat template recorded at training/conversion time, or None when
  the source does not say (a HF folder). A LoRA training checkpoint gives the model with its
  adapters, on the base its run recorded (or `base`); `info["lora_base"]` names it.
  """
  text = str(spec)
  if text.startswith(HF_PREFIX):
    return load_hf_folder(hub.folder(text), shardings=shardings, **config_overrides)
  path = pathlib.Path(text)
  if (path / ckpt.INFO_FILE).exists():
    return ckpt.load_ckpt(path, shardings=shardings, **config_overrides)
  # Before config.json: a training workdir holds its run config under that name too.
  if path.is_dir() and _step_dir(path, required=False) is not None:
    return load_train_checkpoint(path, shardings=shardings, base=base, **config_overrides)
  if (path / "config.json").exists():
    return load_hf_folder(path, shardings=shardings, **config_overrides)
  raise FileNotFoundError(f"{text}: not a HF folder (config.json), an im_jax CKPT folder "
                          f"({ckpt.INFO_FILE}) or a training workdir with checkpoints")


def read_model_config(spec: PathLike, **config_overrides) -> LlamaConfig:
  """The model config `load_pretrained(spec)` would give, reading no weights."""
  return read_pretrained(spec, **config_overrides)[0]


def read_pretrained(spec: PathLike, **config_overrides) -> tuple[LlamaConfig,
                                                                 pathlib.Path | None]:
  """(model config, tokenizer folder) `load_pretrained(spec)` would give, reading no weights.

  The files a load reads are checked as it would meet them (a HF folder's config.json,
  safetensors headers and tokenizer files: `read_hf_folder`), so every command that takes a
  model (train's init_from, eval, convert, plan, study) stops on a damaged one before it
  writes anything: one `model_files.ModelFileError` line naming the file.
  """
  text = str(spec)
  if text.startswith(HF_PREFIX):
    folder = hub.folder(text).absolute()
    return read_hf_folder(folder, **config_overrides), folder
  path = pathlib.Path(text)
  if (path / ckpt.INFO_FILE).exists():
    model_files.check_tokenizer_files(path / ckpt.TOKENIZER_DIR)
    return (ckpt.read_info(path)[0].replace(**config_overrides),
            path.absolute() / ckpt.TOKENIZER_DIR)
  if path.is_dir() and _step_dir(path, required=False) is not None:
    step_dir = _step_dir(path)
    meta = model_files.read_json(step_dir / "meta" / "metadata")
    return (LlamaConfig.from_dict(meta["model_config"]).replace(**config_overrides),
            _recorded_tokenizer(meta, step_dir))
  if (path / "config.json").exists():
    return read_hf_folder(path, **config_overrides), path.absolute()
  raise FileNotFoundError(f"{text}: not a HF folder (config.json), an im_jax CKPT folder "
                          f"({ckpt.INFO_FILE}) or a training workdir with checkpoints")


def read_hf_folder(hf_dir: PathLike, *, tokenizer: bool = True,
                   **config_overrides) -> LlamaConfig:
  """The model config of a Hugging Face folder, after checking every file a load reads:
  config.json (present, parsable, with the keys a Llama-family config needs), the safetensors
  index and headers (every shard there, no file cut short, each tensor's shape from the one
  HF name table and dtype as config.json declares), the tokenizer files (present unless
  `tokenizer=False`: one is given separately). Reads no tensor; a fault is one
  `ModelFileError` line `FILE: what is wrong`."""
  hf_dir = pathlib.Path(hf_dir)
  path = hf_dir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
  hf = model_files.read_json(path)
  try:
    config = LlamaConfig.from_hf(hf)
  except KeyError as e:
    raise model_files.ModelFileError(path, f"missing key {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise model_files.ModelFileError(path, " ".join(str(e).split())) from None
  declared = model_files.CONFIG_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype")))
  hf_params.check_hf_tensors(model_files.tensor_index(hf_dir), config, dtype=declared,
                             where=hf_dir)
  model_files.check_tokenizer_files(hf_dir, required=tokenizer)
  return config.replace(**config_overrides)


def load_hf_folder(hf_dir: PathLike, *, shardings: Any = None, tokenizer: bool = True,
                   **config_overrides) -> ckpt.LoadedCkpt:
  hf_dir = pathlib.Path(hf_dir).absolute()
  config = read_hf_folder(hf_dir, tokenizer=tokenizer, **config_overrides)
  model = hf_params.load_hf(hf_dir, config, shardings=shardings)
  info = {"format": "hf", "template": None, "source": str(hf_dir)}
  return ckpt.LoadedCkpt(model, config, hf_dir, info)


def _step_dir(path: pathlib.Path, *, required: bool = True) -> pathlib.Path | None:
  """The newest complete step folder under a workdir / checkpoints folder, or `path` itself."""
  if (path / "state").is_dir() and (path / "meta").is_dir():
    return path
  root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit()
                 and (p / "state").is_dir() and (p / "meta").is_dir())
  if not steps:
    if required:
      raise FileNotFoundError(f"{path}: no training checkpoint (checkpoints/<step>/state)")
    return None
  return steps[-1][1]


def load_train_checkpoint(path: PathLike, *, shardings: Any = None,
                          base: PathLike | None = None,
                          **config_overrides) -> ckpt.LoadedCkpt:
  """The model parameters of a training checkpoint (see the module docstring).

  The parameters are restored in the layout they were trained with: `scan_layers` cannot be
  overridden here (convert through a CKPT folder to change it). A LoRA run's checkpoint holds
  the adapters only: the base weights come from `base` or, by default, the run's
  `model.init_from` (recorded in its meta).
  """
  step_dir = _step_dir(pathlib.Path(path).absolute())
  meta = model_files.read_json(step_dir / "meta" / "metadata")
  if "model_config" not in meta:
    raise ValueError(f"{step_dir / 'meta'}: no model_config")
  stored = LlamaConfig.from_dict(meta["model_config"])
  config = stored.replace(**config_overrides)
  if config.scan_layers != stored.scan_layers:
    raise ValueError(f"{step_dir}: trained with scan_layers={stored.scan_layers}; it cannot be "
                     "changed when reading a training checkpoint")
  lookup = ckpt.sharding_lookup(shardings)
  base_state, base_spec = None, None
  if config.lora.enabled:  # the checkpoint's `params` are the adapters
    base_spec = str(base or meta.get(LORA_BASE) or "")
    base_state = _lora_base(step_dir, base_spec, config, shardings)
    graphdef, state, _ = nnx.split(hf_params.abstract_model(config), nnx.LoRAParam, ...)
  else:
    graphdef, state = nnx.split(hf_params.abstract_model(config))
  flat = dict(nnx.to_flat_state(state))
  # On disk an nnx.Param is a {"value": array} node; layer indices are string keys.
  item = traverse_util.unflatten_dict({
      ("params", *map(str, p), "value"): jax.ShapeDtypeStruct(
          v.shape, v.dtype, sharding=lookup(p, v))
      for p, v in flat.items()})
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(
      sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), item)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  values = traverse_util.flatten_dict(restored)
  for p, var in flat.items():
    var.set_value(values[("params", *map(str, p), "value")])
  info = {"format": "train", "template": meta.get("template"),
          "strip_content": meta.get("strip_content"), "source": str(step_dir),
          "step": int(step_dir.name) if step_dir.name.isdigit() else None,
          LORA_BASE: base_spec, "export_metadata": meta.get("export_metadata")}
  states = [nnx.from_flat_state(flat)] + ([] if base_state is None else [base_state])
  return ckpt.LoadedCkpt(nnx.merge(graphdef, *states), config,
                         _recorded_tokenizer(meta, step_dir), info)


def _recorded_tokenizer(meta: dict, step_dir: pathlib.Path) -> pathlib.Path | None:
  """The tokenizer folder a training checkpoint records: a gs:// one as a local copy; one
  recorded on another machine (a copied workdir) found in the workdir's own tokenizer/."""
  recorded = meta.get("tokenizer") or meta.get("tokenizer_dir")
  if not recorded:
    return None
  if paths.is_remote(recorded):
    return pathlib.Path(paths.fetch(recorded, what="the recorded tokenizer"))
  own = step_dir.parent.parent / "tokenizer"
  if not pathlib.Path(recorded).exists() and (own / "tokenizer.json").exists():
    return own
  return pathlib.Path(recorded)


def _lora_base(step_dir: pathlib.Path, spec: str, config: LlamaConfig,
               shardings: Any) -> nnx.State:
  """The base weights a LoRA checkpoint's adapters apply to, checked against its config."""
  spec = paths.fetch(spec, what="the LoRA base") if spec else spec  # gs:// -> a local copy
  local = spec.removeprefix(HF_PREFIX)
  if not spec or not pathlib.Path(local).exists():
    raise FileNotFoundError(f"{step_dir} holds LoRA adapters whose base model "
                            f"{spec or '(not recorded)'} is missing: give it with --base DIR")
  runtime = {k: getattr(config, k) for k in (
      "scan_layers", "remat_policy", "param_dtype", "compute_dtype", "attention_impl")}
  loaded = load_pretrained(spec, shardings=shardings, **runtime)
  if loaded.config.lora.enabled:
    raise ValueError(f"LoRA base {spec} is itself a LoRA run; export it merged (to-hf) first")
  if loaded.config.replace(lora=config.lora).to_dict() != config.to_dict():
    raise ValueError(f"LoRA base {spec} is not the model {step_dir}'s adapters were "
                     "trained on (its config differs)")
  return nnx.state(loaded.model, nnx.Param)
