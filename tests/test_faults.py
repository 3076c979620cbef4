"""Faults in one line: damaged model files, in every command.

Each kind of damage to a Hugging Face model folder (a `.safetensors` file cut short, a header
cut or garbled, a shard the index names missing, a tensor whose shape or dtype disagrees with
config.json, a config.json cut short or lacking a key, a tokenizer file cut short or missing)
is made here and given to one command family (train, eval, convert both ways, plan, study):
one `error: FILE: what is wrong` line naming the damaged file, exit status 2, nothing written.
A full disk is tests/test_full_disk.py.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from im_jax.configs import base
from im_jax import model_files
from im_jax.run import experiment, settings
from im_jax.convert.__main__ import main as convert_main
from im_jax.eval.__main__ import main as eval_main
from im_jax.plan import analysis
from im_jax.study import __main__ as study_main
from tests import fixtures_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_LINE = json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello"}]})


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir):
  """A tiny HF folder (one safetensors file), the same sharded, a CKPT of it, a data file."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from im_jax.convert import hf_export  # pylint: disable=g-import-not-at-top
  from im_jax.models.llama import Llama, LlamaConfig  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("models")
  single = fixtures_lib.tiny_hf_base(tiny_tokenizer_dir, root / "hf")
  config = LlamaConfig.preset("tiny")
  sharded = hf_export.export_hf(root / "hf_sharded", Llama(config, rngs=nnx.Rngs(7)), config,
                                tiny_tokenizer_dir, template="tulu", max_shard_bytes=100_000)
  assert convert_main(["from-hf", "--hf", str(single), "--out", str(root / "ckpt")]) == 0
  data = root / "data.jsonl"
  data.write_text(DATA_LINE + "\n")
  return {"hf": single, "hf_sharded": sharded, "ckpt": root / "ckpt", "data": data}


def _cut(path: pathlib.Path, keep) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:keep] if isinstance(keep, int) else keep(data))


def _edit_config(path: pathlib.Path, change) -> None:
  config = json.loads(path.read_text())
  change(config)
  path.write_text(json.dumps(config))


# fault -> (source folder, damage, the damaged file, what the line says about it)
FAULTS = {
    "tensor data cut short": (
        "hf", lambda d: _cut(d / "model.safetensors", 300_000), "model.safetensors",
        "cut short: its tensors need"),
    "header cut short": (
        "hf", lambda d: _cut(d / "model.safetensors", 100), "model.safetensors",
        "cut short: the header needs"),
    "header unparsable": (
        "hf", lambda d: _cut(d / "model.safetensors", lambda b: b[:8] + b"#" * 20 + b[28:]),
        "model.safetensors", "unparsable safetensors header"),
    "shard missing": (
        "hf_sharded", lambda d: (d / "model-00003-of-00006.safetensors").unlink(),
        "model-00003-of-00006.safetensors",
        "no such file (model.safetensors.index.json names it)"),
    "shape disagrees": (
        "hf", lambda d: _edit_config(d / "config.json",
                                     lambda c: c.update(intermediate_size=96)),
        "model.safetensors", "tensor model.layers.0.mlp.gate_proj.weight has shape (128, 64); "
        "config.json gives (96, 64)"),
    "dtype disagrees": (
        "hf", lambda d: _edit_config(d / "config.json", lambda c: c.update(dtype="bfloat16")),
        "model.safetensors", "tensor model.embed_tokens.weight is F32; config.json declares BF16"),
    "config.json lacks a key": (
        "hf", lambda d: _edit_config(d / "config.json", lambda c: c.pop("num_attention_heads")),
        "config.json", "missing key 'num_attention_heads'"),
    "config.json cut short": (
        "hf", lambda d: _cut(d / "config.json", 200), "config.json",
        "(the file looks cut short)"),
    "tokenizer.json cut short": (
        "ckpt", lambda d: _cut(d / "tokenizer" / "tokenizer.json", 5000),
        "tokenizer/tokenizer.json", "invalid JSON at line"),
    "tokenizer missing": (
        "hf", lambda d: (d / "tokenizer.json").unlink(), "",
        "no tokenizer file (tokenizer.json, tokenizer.model, vocab.json or vocab.txt)"),
    "tokenizer_config.json cut short": (
        "hf", lambda d: _cut(d / "tokenizer_config.json", 50), "tokenizer_config.json",
        "(the file looks cut short)"),
}


def _damaged(models, tmp_path, fault) -> tuple[pathlib.Path, str, str]:
  """(the damaged copy, the file at fault, what the line says about it)."""
  source, damage, name, problem = FAULTS[fault]
  folder = tmp_path / "model"
  shutil.copytree(models[source], folder)
  damage(folder)
  return folder, str(folder / name), problem


def _names(message: str, path: str, problem: str) -> bool:
  return message.startswith(f"{path}: ") and problem in message


def _tree(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------ damaged model files


@pytest.mark.parametrize("fault, command", [
    ("header unparsable", "eval loss"),
    ("tokenizer_config.json cut short", "eval loss"),
    ("dtype disagrees", "eval generate"),
    ("header cut short", "convert from-hf"),
    ("tokenizer.json cut short", "convert to-hf"),
])
def test_damaged_model_file_commands_in_process(models, tmp_path, capsys, fault, command):
  model, path, problem = _damaged(models, tmp_path, fault)
  before = _tree(tmp_path)
  out = tmp_path / "out"
  argv = {
      "eval loss": ["loss", "--model", f"hf:{model}", "--data", str(models["data"])],
      "eval generate": ["generate", "--model", f"hf:{model}", "--data", str(models["data"]),
                        "--out", str(out / "gen.json")],
      "convert from-hf": ["from-hf", "--hf", str(model), "--out", str(out)],
      "convert to-hf": ["to-hf", "--ckpt", str(model), "--out", str(out)],
  }[command]
  main = eval_main if command.startswith("eval") else convert_main
  assert main(argv) == 2
  line = fixtures_lib.one_error_line(capsys.readouterr().err)
  assert _names(line.removeprefix("error: "), path, problem), line
  assert _tree(tmp_path) == before  # nothing written


@pytest.mark.parametrize("fault", ["config.json lacks a key", "shape disagrees",
                                   "tokenizer missing"])
def test_damaged_init_from_stops_training_before_the_workdir(models, tmp_path, fault):
  model, path, problem = _damaged(models, tmp_path, fault)
  c = base.get_config()
  c.data.train, c.model.init_from = str(models["data"]), f"hf:{model}"
  c.train.max_steps, c.train.batch_size = 1, 8
  with pytest.raises(experiment.ConfigError) as info:  # python -m im_jax.train: exit 2
    experiment.build(settings.load(c), tmp_path / "run")
  assert _names(str(info.value), path, problem), info.value
  assert not (tmp_path / "run").exists()


def test_damaged_model_in_the_plan_and_the_study(models, tmp_path, capsys):
  model, path, problem = _damaged(models, tmp_path, "shard missing")
  c = base.get_config()
  c.model.init_from = f"hf:{model}"
  with pytest.raises(experiment.ConfigError) as info:  # python -m im_jax.plan: exit 2
    analysis.model_config(settings.load(c))
  assert _names(str(info.value), path, problem), info.value
  out = tmp_path / "study"
  assert study_main.main(["--out", str(out), "--scale", "accelerator",
                          "--model", f"hf:{model}"]) == 2
  line = fixtures_lib.one_error_line(capsys.readouterr().err)
  assert _names(line.removeprefix("error: "), path, problem), line
  assert not out.exists()


def test_train_command_names_a_cut_weights_file(models, tmp_path):
  """The issue's case: `python -m im_jax.train` with a truncated model.init_from."""
  model, path, problem = _damaged(models, tmp_path, "tensor data cut short")
  proc = subprocess.run(
      [sys.executable, "-m", "im_jax.train", "--config", str(ROOT / "configs/base.py"),
       "--workdir", str(tmp_path / "run"), f"--config.data.train={models['data']}",
       f"--config.model.init_from=hf:{model}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  line = fixtures_lib.one_error_line(proc.stderr)
  assert _names(line.removeprefix("error: "), path, problem), line
  assert not (tmp_path / "run").exists()


def test_safetensors_header_reader_agrees_with_safetensors(models, tmp_path):
  """What the header reader finds in an intact file is what safetensors itself reads; a copy
  cut by k bytes is short by exactly k."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  path = models["hf"] / "model.safetensors"
  infos = model_files.read_safetensors_header(path)
  with safe_open(path, "np") as f:
    assert sorted(f.keys()) == sorted(infos)
    data_bytes = 0
    for name in f.keys():
      tensor = f.get_tensor(name)
      assert infos[name].shape == tensor.shape and infos[name].dtype == "F32"
      data_bytes += tensor.nbytes
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(path.read_bytes()[:-1000])
  with pytest.raises(model_files.ModelFileError, match=(
      f"cut short: its tensors need {data_bytes} bytes of data, the file holds "
      f"{data_bytes - 1000} ")):
    model_files.read_safetensors_header(cut)
