"""The self-contained im_jax CKPT folder: parameters, model config, tokenizer, provenance.

    CKPT/params/            orbax StandardCheckpointer: the nnx.Param values as a nested dict
    CKPT/model_config.json  LlamaConfig.to_dict()
    CKPT/tokenizer/         the tokenizer files (save_pretrained), so to-hf needs nothing else
    CKPT/im_jax.json        {"format", "version", "template", "source", "layers"}

Stored layout: decoder layers always stacked on a leading `layers` axis (the `scan_layers`
layout, whose dict has only string keys), whatever the saving model used. Loading restores
straight into the requested shardings; a model with `scan_layers=False` is then sliced one
parameter at a time, so the extra memory is one stacked parameter. Saving an unscanned model
stacks the layers first (a copy of the layer parameters); the converter avoids it by loading
HF weights scanned.

The folder is written under a temporary name and renamed when complete (`files.atomic_dir`).
"""

import json
import pathlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from im_jax import model_files
from im_jax.convert.files import PathLike, as_tokenizer, atomic_dir
from im_jax.models.llama import Llama, LlamaConfig
from im_jax.models.llama import params as hf_params

FORMAT = "im_jax.ckpt"
VERSION = 1
PARAMS_DIR, CONFIG_FILE, TOKENIZER_DIR, INFO_FILE = (
    "params", "model_config.json", "tokenizer", "im_jax.json")
# (logical_axes, shape) -> Sharding; the form `load_hf` accepts too.
ShardingFn = Callable[[tuple[str | None, ...] | None, tuple[int, ...]], jax.sharding.Sharding]


class LoadedCkpt(NamedTuple):
  model: Llama
  config: LlamaConfig
  tokenizer_dir: pathlib.Path
  info: dict[str, Any]


def param_dict(model_or_state: Any) -> dict[str, Any]:
  """The nnx.Param values as a plain nested dict (from a model, an nnx.State or a dict)."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, nnx.Param)
  if isinstance(model_or_state, nnx.State):
    return nnx.to_pure_dict(model_or_state)
  return jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v,
                      model_or_state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def stacked_params(model_or_state: Any, config: LlamaConfig) -> dict[str, Any]:
  """Parameters in the stored layout: layers stacked on a leading axis."""
  tree = param_dict(model_or_state)
  if config.scan_layers:
    return tree
  layers = tree["layers"]
  per_layer = [layers[i] if i in layers else layers[str(i)] for i in range(config.num_layers)]
  return {**tree, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}


def save_ckpt(out: PathLike, model_or_state: Any, config: LlamaConfig, tokenizer: Any, *,
              template: str = "tulu", source: str | None = None,
              overwrite: bool = False) -> pathlib.Path:
  """Writes a CKPT folder atomically; returns its path.

  Args:
    out: the CKPT folder (must not exist unless `overwrite`).
    model_or_state: a `Llama`, its `nnx.state(model, nnx.Param)`, or the same as a dict.
    config: the model's config (its `scan_layers` says how layers are laid out in the input).
    tokenizer: a tokenizer folder or a transformers tokenizer.
    template: the chat template the model is (to be) trained with: "tulu" or "hf".
    source: free text recorded in im_jax.json (e.g. the HF folder it came from).
  """
  tok = as_tokenizer(tokenizer)  # fail before writing anything
  tree = stacked_params(model_or_state, config)
  with atomic_dir(out, overwrite=overwrite) as tmp:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / PARAMS_DIR, tree)
      checkpointer.wait_until_finished()
    (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tok.save_pretrained(str(tmp / TOKENIZER_DIR))
    info = {"format": FORMAT, "version": VERSION, "template": template,
            "source": source, "layers": "stacked"}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
  return pathlib.Path(out).absolute()


def read_info(path: PathLike) -> tuple[LlamaConfig, dict[str, Any]]:
  """(stored config, im_jax.json) of a CKPT folder; a clear error if it is not one."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"CKPT folder {path} does not exist")
  if not (path / INFO_FILE).exists():
    raise FileNotFoundError(f"{path} is not an im_jax CKPT folder (no {INFO_FILE})")
  info = model_files.read_json(path / INFO_FILE)
  if info.get("format") != FORMAT or info.get("version") != VERSION:
    raise ValueError(f"{path / INFO_FILE}: unsupported format {info.get('format')!r} "
                     f"version {info.get('version')!r} (expected {FORMAT!r} {VERSION})")
  return LlamaConfig.from_dict(model_files.read_json(path / CONFIG_FILE)), info


def default_sharding(axes, shape) -> jax.sharding.Sharding:
  del axes, shape
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def sharding_lookup(shardings: Any) -> Callable[[tuple, nnx.Variable], jax.sharding.Sharding]:
  """(path, abstract variable) -> Sharding, from None, a ShardingFn or a pytree of shardings.

  The pytree form is what the trainer has: `sharding.state_shardings(abstract_params, mesh)`
  (an nnx.State of NamedShardings) or the same as a plain dict.
  """
  if shardings is None or callable(shardings):
    fn = shardings or default_sharding
    return lambda path, var: fn(var.get_metadata().get("logical_axes"), var.shape)
  if isinstance(shardings, nnx.State):
    items = nnx.to_flat_state(shardings)
  else:
    items = traverse_util.flatten_dict(shardings).items()
  table = {tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in p):
           s.get_value() if isinstance(s, nnx.Variable) else s for p, s in items}
  return lambda path, var: table[path]


def _stacked(s: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The sharding of a layers-stacked array whose slices use `s` (layers not split)."""
  if isinstance(s, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec))
  return s


def restore_params(params_dir: PathLike, config: LlamaConfig, shardings: Any = None) -> Llama:
  """A `Llama` for `config` from stacked-layout parameters saved with orbax at `params_dir`.

  Each array is restored straight into its sharding (see `sharding_lookup`; default: the
  first device), in `config.param_dtype`. For an unscanned `config` the stacked arrays are
  restored unsplit along `layers` and sliced one parameter at a time.
  """
  lookup = sharding_lookup(shardings)
  graphdef, state = nnx.split(hf_params.abstract_model(config))
  target = dict(nnx.to_flat_state(state))
  abstract = {}
  for path, var in target.items():
    if config.scan_layers or path[0] != "layers":
      abstract[path] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=lookup(path, var))
    elif path[1] == 0:
      abstract[("layers", *path[2:])] = jax.ShapeDtypeStruct(
          (config.num_layers, *var.shape), var.dtype, sharding=_stacked(lookup(path, var)))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(pathlib.Path(params_dir).absolute(), traverse_util.unflatten_dict(abstract))
  flat = traverse_util.flatten_dict(restored)
  for path, var in target.items():
    if config.scan_layers or path[0] != "layers":
      var.set_value(flat.pop(path))
  if not config.scan_layers:  # unstack one parameter at a time
    for rel in sorted({p[2:] for p in target if p[0] == "layers"}):
      stacked = flat.pop(("layers", *rel))
      for i in range(config.num_layers):
        path = ("layers", i, *rel)
        target[path].set_value(jax.device_put(stacked[i], lookup(path, target[path])))
      del stacked
  return nnx.merge(graphdef, nnx.from_flat_state(target))


def load_ckpt(path: PathLike, *, shardings: Any = None, **config_overrides) -> LoadedCkpt:
  """Loads a CKPT folder into `shardings`.

  Args:
    path: the CKPT folder.
    shardings: None (first device), `(logical_axes, shape) -> Sharding`, or a pytree of
      shardings in the layout of `config_overrides`' model (`sharding.state_shardings`).
    **config_overrides: runtime options such as `scan_layers=True`, `compute_dtype="bfloat16"`,
      `param_dtype` (the stored values are cast on restore), `remat_policy`.

  Returns:
    (model, config, tokenizer_dir, info) as a `LoadedCkpt`.
  """
  path = pathlib.Path(path).absolute()
  config, info = read_info(path)
  model_files.check_tokenizer_files(path / TOKENIZER_DIR)  # before the weights: fail fast
  config = config.replace(**config_overrides)
  model = restore_params(path / PARAMS_DIR, config, shardings)
  return LoadedCkpt(model, config, path / TOKENIZER_DIR, info)
