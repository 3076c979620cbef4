"""Every key of configs/base.py, given wrong values, is refused in one line naming the key.

Most cases run in-process through `settings.validate` and `settings.check_inputs`, exactly
what `python -m im_jax.train` runs before any work; a handful go through the command line,
which must exit 2 with one `error:` line and leave no workdir behind.
"""

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from flax import traverse_util

from im_jax.configs import base
from im_jax.run import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8  # conftest's simulated CPU devices

# key -> wrong values: a wrong type, an out-of-range number, an unknown choice. A key added
# to configs/base.py must be added here (test_every_key_has_wrong_values).
WRONG = {
    "model.preset": ["llama4", ""],
    # a local folder, a path that is no Hub name, a Hub name absent from the (offline) cache
    "model.init_from": ["/nonexistent/model", "hf:/nonexistent/hf", "hf:nonexistent-org/model"],
    "model.scan_layers": ["yes", 1],
    "model.remat_policy": ["dots"],
    "model.param_dtype": ["fp32"],
    "model.compute_dtype": ["bf16"],
    "model.attention_impl": ["flash"],
    "model.lora.rank": [-1, "8", 8],  # 8: a LoRA run without model.init_from
    "model.lora.alpha": [0.0, float("nan")],
    "model.lora.targets": ["qkv", "q,q", ""],
    "model.lora.dropout": [1.0, -0.1],
    "data.train": ["", "synthetic:abc", "synthetic:0", "/nonexistent/train.jsonl",
                   "hf:nonexistent-org/data:train"],
    "data.format": ["chatml"],
    "data.tokenizer": ["/nonexistent/tokenizer", "hf:nonexistent-org/tokenizer"],
    "data.template": ["chatml"],
    "data.strip_content": ["yes", 1],
    "data.max_seq_len": [1, "long"],
    "data.truncation": ["left"],
    "data.drop_rule": ["never"],
    "data.packing": ["greedy"],
    "data.max_segments_per_row": [0],
    "data.eval_fraction": [1.0, -0.1],
    "data.max_examples": [-1],
    "data.on_bad_record": ["warn"],
    "data.read_threads": [-1],
    "loss.mode": ["xx"],
    "loss.instruction_weight": [-1.0, float("inf")],
    "loss.normalization": ["batch"],
    "loss.assistant_turns": ["first"],
    "loss.chunk_size": [-1],
    "loss.kl_to_base": [-0.5, float("nan"), "strong"],
    "loss.kl_type": ["reverse", ""],
    "optim.lr": [-1.0, float("nan"), "fast"],
    "optim.warmup_ratio": [1.0, -0.5],
    "optim.decay": ["step"],
    "optim.weight_decay": [-0.1],
    "optim.b1": [1.0],
    "optim.b2": [-0.1],
    "optim.eps": [0.0],
    "optim.max_grad_norm": [float("inf")],
    "train.batch_size": [0, 12],
    "train.max_steps": [-1],
    "train.epochs": [-1],
    "train.seed": [-1],
    "train.grad_accum": [0, 3],
    "train.log_every": [0],
    "train.max_consecutive_skips": [0],
    "mesh.data": [0, 3],
    "mesh.fsdp": [-2, 3],
    "mesh.tensor": [0],
    "checkpoint.every_steps": [0],
    "checkpoint.keep": [0],
    "checkpoint.async_save": ["no"],
    "eval.every_steps": [-1],
    "eval.batch_size": [0, 3],
    "eval.harness_tasks": ["piqa,,arc_easy"],
    "eval.harness_every_steps": [-1],
    "eval.harness_limit": [-1],
    "eval.harness_include_path": ["/nonexistent/im_jax_tasks"],
    "log.wandb_project": ["team/project", "x" * 129, " padded", 1],
    "log.wandb_entity": ["team#1", "team"],  # the second: set while the project is empty
    "log.wandb_run_name": ["run1"],
    "log.wandb_tags": ["a,b"],
    "neftune_alpha": [-1.0],
    "export_hf": ["yes"],
}


def _good() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.data.train = "synthetic:50"
  c.data.tokenizer = "synthetic"
  c.train.batch_size = 8
  c.eval.batch_size = 8
  return c


def _with(key: str, value) -> ml_collections.ConfigDict:
  """The good config with `key` set to `value`, whatever its type (as a config file may)."""
  tree = _good().to_dict()
  *sections, name = key.split(".")
  node = tree
  for section in sections:  # model.lora.rank: two levels
    node = node[section]
  node[name] = value
  return ml_collections.ConfigDict(tree)


def _check_all(c: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  run = settings.validate(c, num_devices=DEVICES, process_count=1)
  settings.check_inputs(run, workdir)


def test_every_key_has_wrong_values():
  assert sorted(WRONG) == sorted(traverse_util.flatten_dict(base.get_config().to_dict(), sep="."))


def test_the_good_config_passes(tmp_path):
  _check_all(_good(), tmp_path / "run")


@pytest.mark.parametrize("key, value", [(k, v) for k, vs in WRONG.items() for v in vs],
                         ids=lambda v: repr(v) if not isinstance(v, str) or "." not in v
                         else v)
def test_wrong_value_is_refused_naming_the_key(tmp_path, key, value):
  with pytest.raises(settings.ConfigError) as info:
    _check_all(_with(key, value), tmp_path / "run")
  message = str(info.value)
  assert "\n" not in message, message
  # The dotted key, or (for the mesh, whose sizes are checked together) its parts.
  assert key in message or all(part in message for part in key.split(".")), message
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("impl", ["auto", "xla", "splash", "cudnn", "blocked"])
def test_every_attention_impl_is_accepted(tmp_path, impl):
  _check_all(_with("model.attention_impl", impl), tmp_path / "run")


def test_combinations_are_refused():
  c = _good()
  c.train.max_steps, c.train.epochs = 0, 0
  with pytest.raises(settings.ConfigError, match="train.max_steps > 0 or train.epochs > 0"):
    _check_all(c, pathlib.Path("unused"))
  c = _good()
  c.loss.kl_to_base, c.loss.kl_type = 1.0, "target_token"  # (1 - beta) CE: nothing to train
  with pytest.raises(settings.ConfigError,
                     match=r"^loss.kl_to_base=1.0 with kl_type=target_token leaves"):
    _check_all(c, pathlib.Path("unused"))


@pytest.mark.parametrize("key", ["model.init_from", "data.tokenizer", "data.train"])
def test_a_bare_hub_name_gets_a_hint(key):
  with pytest.raises(settings.ConfigError, match=rf"^{key}=nonexistent-org/name: no such "
                     r"(file|folder) \(a Hugging Face Hub name is written "
                     r"hf:nonexistent-org/name\)$"):
    _check_all(_with(key, "nonexistent-org/name"), pathlib.Path("unused"))


def test_wandb_settings_with_a_project():
  c = _good()
  c.log.wandb_project, c.log.wandb_entity, c.log.wandb_tags = "im-jax", "team", "it, im"
  _check_all(c, pathlib.Path("unused"))  # needs the wandb package (requirements.txt pins it)
  for tags in ("a,,b", "a," + "t" * 65):
    c.log.wandb_tags = tags
    with pytest.raises(settings.ConfigError, match=r"^log\.wandb_tags: each tag must have 1 to "
                       "64 characters"):
      _check_all(c, pathlib.Path("unused"))


@pytest.mark.parametrize("key", ["data.formt", "optim.learning_rate", "nope"])
def test_unknown_keys_suggest_the_nearest(key):
  tree = _good().to_dict()
  *section, name = key.split(".")
  (tree[section[0]] if section else tree)[name] = 1
  with pytest.raises(settings.ConfigError) as info:
    _check_all(ml_collections.ConfigDict(tree), pathlib.Path("unused"))
  hint = {"data.formt": " (did you mean data.format?)", "optim.learning_rate": "",
          "nope": ""}[key]
  assert str(info.value).startswith(f"unknown config key {key}{hint}")


@pytest.mark.parametrize("override, expected", [
    ("--config.data.formt=tulu", "error: unknown config key data.formt (did you mean "
                                 "data.format?)"),
    ("--config.data.format=chatml", "error: data.format=chatml does not apply to synthetic"),
    ("--config.train.batch_size=abc", "error: "),
    ("--config.model.compute_dtype=bf16", "error: model.compute_dtype 'bf16' not in"),
])
def test_cli_bad_setting_is_one_line_exit_2_before_any_work(tmp_path, override, expected):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "im_jax.train", "--config", "configs/demo.py", "--workdir",
       str(workdir), override], cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
  assert "batch_size" in lines[0] or override != "--config.train.batch_size=abc"
  assert not workdir.exists()  # no tokenizer trained, nothing written


@pytest.mark.parametrize("config", ["base", "paper_lora"])
def test_the_typed_config_saves_what_the_config_dict_did(config):
  """config.json, the checkpoints' meta and the resume check are written from the typed
  config: byte for byte what the ConfigDict wrote, so workdirs from before still resume."""
  from im_jax.configs import paper  # pylint: disable=g-import-not-at-top

  c = _good() if config == "base" else paper.get_config("lima,im_release,llama2_7b,lora")
  c.model.init_from = c.model.init_from or "hf:/models/base"
  c.optim.max_grad_norm = 0.0  # off: kept as written (the optimizer reads <= 0 as off)
  run = settings.load(c)
  assert run.to_json(indent=2) == c.to_json(indent=2)
  assert json.dumps(run.to_dict()) == json.dumps(c.to_dict())
  assert run.optim.lr == c.optim.lr and run.log.wandb_project == c.log.wandb_project


@pytest.mark.parametrize("value", [True, False])
def test_a_placeholder_key_takes_its_declared_type(tmp_path, value):
  _check_all(_with("data.strip_content", value), tmp_path / "run")
