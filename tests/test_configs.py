"""Config files: every key everywhere, the paper's recipes, impossible settings, tiny runs.

The tiny runs build and train every `configs/paper.py:DATASET,METHOD,tiny` for 2 steps in this
process. They share one tokenizer, so all runs have the same shapes and the same initial
parameters: a persistent compilation cache then compiles each train step graph once (with and
without NEFTune), and the first step's metrics of different methods are directly comparable.
"""

import importlib
import inspect
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from im_jax.configs import base, paper
from im_jax.data.kinds import INSTRUCTION_KINDS, TokenKind
from im_jax.run import experiment, settings
from im_jax.train.metrics_log import read_metrics

pytestmark = [pytest.mark.slow]  # trains every paper recipe

REPO = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8  # conftest's simulated CPU devices
DATASETS = tuple(paper.DATASETS)
METHODS = tuple(paper.METHODS)
MODELS = paper.MODELS
# Arguments for config files whose get_config takes some (file stem -> examples).
CONFIG_ARGS = {"paper": ("lima,im,tiny", "alpaca5k,im_neftune,llama2_13b")}


def _config_files() -> list[pathlib.Path]:
  return sorted(p for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "base"))


# Every key in every config file.


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: p.name)
def test_config_file_defines_every_base_key(path):
  module = importlib.import_module(f"configs.{path.stem}")
  takes_args = bool(inspect.signature(module.get_config).parameters)
  if takes_args:
    assert path.stem in CONFIG_ARGS, f"add example arguments for {path.name} to CONFIG_ARGS"
  expected = set(traverse_util.flatten_dict(base.get_config().to_dict(), sep="."))
  for args in CONFIG_ARGS.get(path.stem, (None,)):
    config = module.get_config(args) if takes_args else module.get_config()
    keys = set(traverse_util.flatten_dict(config.to_dict(), sep="."))
    assert not expected - keys, f"{path.name}:{args} lacks {sorted(expected - keys)}"
    assert not keys - expected, f"{path.name}:{args} adds keys base.py lacks: " \
                                f"{sorted(keys - expected)}"


# The paper's recipes.


@pytest.mark.parametrize("model", MODELS)
def test_every_paper_combination_validates(model):
  for dataset, method in itertools.product(DATASETS, METHODS):
    c = paper.get_config(f"{dataset},{method},{model}")
    settings.validate(c, num_devices=DEVICES, process_count=1)
    settings.validate(c, num_devices=1, process_count=1)
    mode, alpha, beta = {"it": ("it", 0, 0), "im": ("im", 0, 0), "neftune": ("it", 5, 0),
                         "im_neftune": ("im", 5, 0), "im_release": ("im_release", 0, 0),
                         "it_kl": ("it", 0, 1), "im_kl": ("im", 0, 1)}[method]
    assert (c.loss.mode, c.neftune_alpha, c.loss.kl_to_base) == (mode, alpha, beta), (
        dataset, method)
    assert c.loss.kl_type == "full"
    assert c.loss.instruction_weight == 1.0
    assert c.loss.normalization == "sequence" and c.data.template == "tulu"
    assert pathlib.Path(c.data.train).is_file() or not paper.SHARED_DATA.is_dir()
    assert c.model.preset == model and c.model.init_from == ""
    assert (c.optim.lr, c.optim.decay, c.optim.warmup_ratio, c.optim.weight_decay) == (
        (1e-3 if model == "tiny" else 2e-5), "linear", 0.03, 0.0)
    assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.98, 1e-6)
    assert c.train.epochs == 2 and c.train.max_steps == 0
    if model == "tiny":
      assert c.data.tokenizer == "synthetic" and c.model.compute_dtype == "float32"
    else:
      assert (c.train.batch_size, c.data.max_seq_len) == (128, 2048)
      assert c.data.tokenizer == "" and c.model.compute_dtype == "bfloat16"


def test_paper_lora_argument_switches_to_adapters_on_a_bf16_base():
  full, c = paper.get_config("lima,im,llama2_7b"), paper.get_config("lima,im,llama2_7b,lora")
  assert (c.model.lora.rank, c.model.lora.alpha, c.model.lora.dropout) == (16, 32.0, 0.05)
  assert c.optim.lr == 10 * full.optim.lr and c.model.param_dtype == "bfloat16"
  assert full.model.lora.rank == 0
  with pytest.raises(experiment.ConfigError, match="model.lora.rank=16 needs model.init_from"):
    settings.validate(c, num_devices=DEVICES, process_count=1)
  c.model.init_from = "hf:/models/Llama-2-7b-hf"
  settings.validate(c, num_devices=DEVICES, process_count=1)


def test_paper_dataset_names_resolve_next_to_the_repository():
  c = paper.get_config("dolly3k,it,tiny")
  assert pathlib.Path(c.data.train) == REPO.parent / "shared" / "data" / "alpagasus_dolly_3k.jsonl"
  assert paper.get_config("/data/mine.jsonl,im,tiny").data.train == "/data/mine.jsonl"
  assert paper.get_config("synthetic:100,im,tiny").data.train == "synthetic:100"


@pytest.mark.parametrize("args, match", [
    (None, "DATASET,METHOD,MODEL"),
    ("lima,im", "DATASET,METHOD,MODEL"),
    ("lima,im,tiny,extra", "DATASET,METHOD,MODEL[,lora]"),
    ("lima,,tiny", "DATASET,METHOD,MODEL"),
    ("lima,imm,tiny", "unknown method 'imm': choose one of it, im, neftune, im_neftune, "
                      "im_release"),
    ("lima,im,llama3", "unknown model 'llama3': choose one of llama2_7b, llama2_13b, "
                       "smollm2_135m, tiny"),
    ("lmia,im,tiny", "unknown dataset 'lmia': choose one of lima, dolly3k, alpaca5k"),
])
def test_paper_bad_arguments_name_the_choices(args, match):
  with pytest.raises(ValueError) as info:
    paper.get_config(args)
  assert match in str(info.value) and "\n" not in str(info.value)


# Impossible settings: one clear line.


def _tiny(**overrides) -> ml_collections.ConfigDict:
  c = paper.get_config("lima,im,tiny")
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.mark.parametrize("overrides, match", [
    ({"mesh.data": 3}, "mesh"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, "mesh"),
    ({"train.batch_size": 12}, "do not split over the data x fsdp axes"),
    ({"train.batch_size": 16, "train.grad_accum": 3}, "not divisible by train.grad_accum"),
    ({"eval.batch_size": 4}, "eval.batch_size"),
    ({"loss.mode": "it", "loss.instruction_weight": 0.5}, "instruction_weight"),
    ({"loss.mode": "im_release", "loss.instruction_weight": 0.5}, "instruction_weight"),
    ({"loss.mode": "im_release", "data.template": "hf"}, "tulu"),
    ({"loss.mode": "xx"}, "loss mode"),
    ({"loss.normalization": "batch"}, "normalization"),
])
def test_impossible_settings_fail_with_one_line(overrides, match):
  with pytest.raises(experiment.ConfigError) as info:
    settings.validate(_tiny(**overrides), num_devices=DEVICES, process_count=1)
  assert match in str(info.value) and "\n" not in str(info.value)


def test_cli_impossible_setting_exits_2_without_traceback(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "im_jax.train", "--config", "configs/paper.py:lima,it,tiny",
       "--workdir", str(tmp_path / "run"), "--config.loss.instruction_weight=0.5"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: ") and "instruction_weight" in lines[-1], proc.stderr


# Every tiny combination, 2 steps, a few examples, one process.


def _tiny_run_config(dataset: str, method: str, tokenizer: str) -> ml_collections.ConfigDict:
  c = paper.get_config(f"{dataset},{method},tiny")
  c.data.max_examples = 16
  c.data.max_seq_len = 128
  c.data.eval_fraction = 0.0
  c.data.tokenizer = tokenizer or c.data.tokenizer
  # im_release's recipe keeps examples cut before their reply (the release's rule); the
  # comparison below needs every method to train on the same examples
  c.data.drop_rule = "no_output"
  c.train.batch_size = DEVICES
  c.train.max_steps = 2
  c.checkpoint.async_save = False
  c.export_hf = False
  return c


def _weight_by_kind(batch: dict[str, np.ndarray]) -> dict[TokenKind, float]:
  kinds, weights = batch["target_kinds"], batch["loss_weights"]
  return {kind: float(weights[kinds == kind].sum()) for kind in TokenKind}


@pytest.mark.usefixtures("compilation_cache")
def test_every_tiny_combination_trains_two_steps(shared_data_dir, tmp_path):
  del shared_data_dir  # skips when the paper's data is absent
  tokenizer = ""  # the first run trains it on its data; the rest reuse it
  for dataset in DATASETS:
    first, weights = {}, {}
    for method in METHODS:
      workdir = tmp_path / f"{dataset}_{method}"
      exp = experiment.build(settings.load(_tiny_run_config(dataset, method, tokenizer)), workdir)
      tokenizer = tokenizer or str(exp.tokenizer_dir)
      weights[method] = _weight_by_kind(next(iter(exp.train_data.dataset())))
      result = exp.run()
      assert result.step == 2 and not result.preempted
      for key in ("loss", "output_loss", "instruction_loss"):
        assert math.isfinite(result.last_metrics[key]), (dataset, method, key)
      records = read_metrics(workdir)
      assert [r["step"] for r in records] == [1, 2]
      first[method] = records[0]
      if paper.METHODS[method][2] > 0:  # after one update the model has left its reference
        assert records[1]["kl"] > 0, (dataset, method)
      assert json.loads((workdir / "config.json").read_text())["loss"]["mode"] == \
          paper.METHODS[method][0]

    where = f"{dataset}: "
    instruction = lambda w: sum(w[k] for k in INSTRUCTION_KINDS)  # pylint: disable=unnecessary-lambda-assignment
    for method in METHODS:
      w = weights[method]
      assert w[TokenKind.ASSISTANT] > 0, where + method
      # Loss weights on instruction tokens (what token normalisation divides by) under IM only.
      if paper.METHODS[method][0] == "it":
        assert instruction(w) == 0 and w[TokenKind.TEMPLATE] == 0, where + method
      else:
        assert instruction(w) > 0, where + method
      # Eq. 4 leaves template tokens out; the authors' release does not.
      assert (w[TokenKind.TEMPLATE] > 0) == (method == "im_release"), where + method
    assert weights["neftune"] == weights["it"] and weights["im_neftune"] == weights["im"]
    assert weights["it_kl"] == weights["it"] and weights["im_kl"] == weights["im"]

    # Same data and initial parameters: the first step's (unweighted) output loss is the same
    # for every loss mode, and the trained loss differs; NEFTune noise changes it.
    out = {m: first[m]["output_loss"] for m in METHODS}
    assert out["im"] == pytest.approx(out["it"], rel=1e-5), where + str(out)
    assert out["im_release"] == pytest.approx(out["it"], rel=1e-5), where + str(out)
    assert out["im_neftune"] == pytest.approx(out["neftune"], rel=1e-5), where + str(out)
    assert out["neftune"] != pytest.approx(out["it"], rel=1e-6), where + str(out)
    # The KL runs start at their reference: the first step's KL is 0 and its loss the CE's.
    for kl_method, plain in (("it_kl", "it"), ("im_kl", "im")):
      assert abs(first[kl_method]["kl"]) < 1e-6 and "kl" not in first[plain], where + kl_method
      assert first[kl_method]["loss"] == pytest.approx(first[plain]["loss"], rel=1e-5), where
    assert first["im"]["loss"] != pytest.approx(first["it"]["loss"], rel=1e-6), where
    assert first["it"]["instruction_tokens"] == first["im"]["instruction_tokens"] > 0, where
