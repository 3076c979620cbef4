"""The trainer end to end: a HF start point through data, sharded step and loss, checked
against PyTorch; and the README's demo job, from config to a HF export transformers runs."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from safetensors.numpy import load_file

from im_jax.configs import base
from im_jax.convert import load
from im_jax.models.llama import params as llama_params
from im_jax.run import experiment, settings
from im_jax.train import sharding
from im_jax.train.metrics_log import read_metrics
from tests import wandb_runs

# The training/eval commands this module starts share compiled steps (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("subprocess_compilation_cache")]  # slow: trains through a subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_hf(out: pathlib.Path, tokenizer_dir: pathlib.Path) -> pathlib.Path:
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      bos_token_id=1, eos_token_id=2, pad_token_id=0)
  model = transformers.LlamaForCausalLM(config).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  model.save_pretrained(out)
  transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
  return out


def _torch_weighted_ce(hf_dir: pathlib.Path, batch: dict[str, np.ndarray]) -> float:
  """sum(w * CE) / sum(w) over the batch, each packed example run alone (unpacked)."""
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  num = den = 0.0
  for row in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      idx = seg == s
      tokens = torch.tensor(batch["tokens"][row][idx])[None]
      with torch.no_grad():
        logits = model(tokens).logits[0]
      ce = torch.nn.functional.cross_entropy(
          logits, torch.tensor(batch["targets"][row][idx]).long(), reduction="none").numpy()
      w = batch["loss_weights"][row][idx]
      num += float((w * ce).sum())
      den += float(w.sum())
  return num / den


def test_first_step_loss_from_hf_equals_pytorch(tmp_path, tiny_tokenizer_dir):
  hf_dir = _tiny_hf(tmp_path / "hf", tiny_tokenizer_dir)
  c = base.get_config()
  c.model.init_from = f"hf:{hf_dir}"
  c.data.train = "synthetic:40"
  c.data.max_seq_len = 128
  c.loss.mode = "im"
  c.loss.normalization = "token"
  c.train.batch_size = 8
  c.train.max_steps = 1
  c.mesh.fsdp, c.mesh.tensor = 4, 2
  exp = experiment.build(settings.load(c), tmp_path / "run")
  it = iter(exp.train_data.dataset())
  batch = next(it)
  _, metrics = exp.train_step(exp.state, sharding.global_batch(batch, exp.mesh, micro_batches=1))
  got = float(jax.device_get(metrics["loss"]))
  want = _torch_weighted_ce(hf_dir, batch)
  assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (got, want)


def test_demo_job_trains_evaluates_and_exports(tmp_path):
  workdir = tmp_path / "demo"
  proc = subprocess.run(
      [sys.executable, "-m", "im_jax.train", "--config", str(ROOT / "configs/demo.py"),
       "--workdir", str(workdir), "--config.train.max_steps=40", "--config.eval.every_steps=0",
       "--config.data.train=synthetic:600", "--config.train.log_every=5",
       "--config.log.wandb_project=im-jax-test"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_home")})
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Before the first step: the compiled step's memory per device (CPU reports no limit).
  assert re.search(r"compiled train step: [0-9.]+ GiB per device \(params", proc.stderr)
  # libtpu is installed (for im_jax.plan) but a CPU run neither probes for nor mentions TPUs.
  assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr
  # A quiet start: no blank lines up to the data summary (the tokenizer trainer's progress
  # bar printed them) and no deprecation warnings.
  start_up = proc.stderr[:proc.stderr.index("] data: ")].split("\n")
  assert not [line for line in start_up if not line.strip()], proc.stderr
  assert "deprecat" not in proc.stderr.lower(), proc.stderr
  records = read_metrics(workdir)
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_output_loss" in r]
  assert [r["step"] for r in train] == list(range(5, 41, 5))
  assert train[-1]["output_loss"] < train[0]["output_loss"] - 0.5  # it learns
  assert evals and np.isfinite(evals[-1]["eval_output_loss"])
  # Weights & Biases (offline) got every record of metrics.jsonl, in one run with the config.
  (run,) = wandb_runs.offline_runs(workdir)
  assert run["history"] == wandb_runs.by_step(records) and run["name"] == "demo"
  spec = importlib.util.spec_from_file_location("hf_generate", ROOT / "scripts/hf_generate.py")
  hf_generate = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(hf_generate)

  answer = hf_generate.main(str(workdir / "hf"), "What is 2 plus 3?", max_new_tokens=5)
  assert isinstance(answer, str)
  # The workdir itself (which also holds the run's config.json) loads as a model: its newest
  # checkpoint, equal to the export.
  loaded = load.load_pretrained(workdir)
  exported = load_file(workdir / "hf" / "model.safetensors")
  for name, value in llama_params.iter_hf(loaded.model, loaded.config):
    np.testing.assert_array_equal(value, exported[name], err_msg=name)


def test_resume_with_other_settings_is_refused():
  from im_jax.train import loop  # pylint: disable=import-outside-toplevel

  c = base.get_config()
  key = experiment.resume_key(settings.load(c))
  loop.check_same_run({loop.RESUME_KEY: key}, {loop.RESUME_KEY: key}, "w")
  c.train.log_every, c.eval.every_steps, c.mesh.fsdp = 7, 3, 2  # free to change
  now = lambda: {loop.RESUME_KEY: experiment.resume_key(settings.load(c))}
  loop.check_same_run({loop.RESUME_KEY: key}, now(), "w")
  c.loss.mode, c.optim.lr = "it", 1e-4
  with pytest.raises(loop.ResumeMismatch) as info:
    loop.check_same_run({loop.RESUME_KEY: key}, now(), "w")
  # One `key: saved -> now` line per changed setting, nothing else of the sections.
  assert str(info.value).splitlines()[1:] == ["  loss.mode: 'im' -> 'it'",
                                              "  optim.lr: 2e-05 -> 0.0001"]


def test_missing_init_from_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "im_jax.train", "--config", str(ROOT / "configs/demo.py"),
       "--workdir", str(tmp_path), f"--config.model.init_from={tmp_path / 'nope'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert "model.init_from=" in proc.stderr and "nope" in proc.stderr
