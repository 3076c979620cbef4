"""Exact resume: a run killed (SIGKILL) or preempted (SIGTERM) and restarted in its workdir
gives the same per-step losses and bit-identical parameters as an uninterrupted run; also with
the KL-to-base term, whose frozen reference is re-derived at the restart, not restored."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
import safetensors.numpy

from im_jax.data import synthetic
from im_jax.train import step as step_lib
from im_jax.train.metrics_log import read_metrics
from tests import fixtures_lib

# The training/eval commands this module starts share compiled steps (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("subprocess_compilation_cache")]  # slow: kills and resumes training subprocesses

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24
KL = ("--config.loss.kl_to_base=0.5",)
# A weighted mixture of two sources (issue 28): its picks must resume as one source's do.
MIXTURE = ("--config.data.train=synthetic:200@0.7,synthetic:120@0.3",)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  convs = synthetic.make_conversations(200, seed=0)
  return synthetic.train_tokenizer(synthetic.tokenizer_texts(convs),
                                   tmp_path_factory.mktemp("tok"), vocab_size=400)


def _command(workdir, tokenizer_dir, *extra):
  return [sys.executable, "-m", "im_jax.train", "--config", str(ROOT / "configs/base.py"),
          "--workdir", str(workdir), "--config.data.train=synthetic:200",
          f"--config.data.tokenizer={tokenizer_dir}", "--config.data.max_seq_len=128",
          "--config.train.batch_size=8", f"--config.train.max_steps={STEPS}",
          "--config.optim.lr=1e-3", "--config.checkpoint.every_steps=4",
          "--config.checkpoint.keep=10", "--config.mesh.fsdp=4", "--config.mesh.data=2",
          "--config.data.read_threads=0", *extra]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run(workdir, tokenizer_dir, *extra):
  proc = subprocess.run(_command(workdir, tokenizer_dir, *extra), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _finished_steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _start_and_signal(workdir, tokenizer_dir, sig, *extra, after_checkpoint=4):
  """Starts a run, sends `sig` once a checkpoint >= `after_checkpoint` is complete."""
  proc = subprocess.Popen(_command(workdir, tokenizer_dir, *extra), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if any(s >= after_checkpoint for s in _finished_steps(workdir)):
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  out, err = proc.communicate(timeout=120)
  return proc.returncode, err


def _losses(workdir, key="loss"):
  return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


def _final_params(workdir):
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(STEPS) / "state")
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state["params"], sep="/").items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer_dir):
  """extra args -> the workdir of an uninterrupted run with them (each run once)."""
  runs = {}

  def get(extra):
    if extra not in runs:
      runs[extra] = tmp_path_factory.mktemp("uninterrupted")
      _run(runs[extra], tokenizer_dir, *extra)
    return runs[extra]

  return get


@pytest.mark.parametrize("sig, extra", [(signal.SIGKILL, ()), (signal.SIGTERM, ()),
                                        (signal.SIGKILL, KL), (signal.SIGKILL, MIXTURE)],
                         ids=["sigkill", "sigterm", "sigkill_kl", "sigkill_mixture"])
def test_interrupted_run_resumes_exactly(tmp_path, tokenizer_dir, uninterrupted, sig, extra):
  uninterrupted = uninterrupted(extra)
  code, err = _start_and_signal(tmp_path, tokenizer_dir, sig, *extra)
  if sig == signal.SIGKILL:
    assert code == -signal.SIGKILL
  else:
    assert code == 0, err[-3000:]
    assert "preempted at step" in err
  interrupted_at = max(_finished_steps(tmp_path))
  assert interrupted_at < STEPS, "the run finished before the signal: nothing was tested"
  assert max(_losses(tmp_path)) < STEPS

  resumed = _run(tmp_path, tokenizer_dir, *extra)
  assert "resumed from checkpoint" in resumed.stderr
  expected = _losses(uninterrupted)
  assert sorted(expected) == list(range(1, STEPS + 1))
  assert _losses(tmp_path) == expected  # exact float equality, every step
  kl = _losses(uninterrupted, "kl")
  assert bool(kl) == (extra == KL) and (not kl or max(kl.values()) > 1e-3)  # really on
  per_source = _losses(uninterrupted, "output_loss_per_example/synthetic_120")
  assert bool(per_source) == (extra == MIXTURE)  # the mixture really trained
  assert _losses(tmp_path, "output_loss_per_example/synthetic_120") == per_source
  assert _losses(tmp_path, "kl") == kl
  want, got = _final_params(uninterrupted), _final_params(tmp_path)
  assert want.keys() == got.keys() and want
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module")
def lora_args(tmp_path_factory, tokenizer_dir):
  base = fixtures_lib.tiny_hf_base(tokenizer_dir, tmp_path_factory.mktemp("base") / "hf")
  return (f"--config.model.init_from=hf:{base}", "--config.model.lora.rank=4",
          "--config.model.lora.dropout=0.1")


def _state_tree(step_dir):
  """The checkpoint's state as numpy arrays, read without a target."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=args))


def _folder_bytes(path):
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _rewrite_in_old_layout(step_dir, base_dir):
  """The checkpoint as the loop wrote it before issue 24: the state also holds `frozen`,
  the LoRA base weights (nnx.Param nodes, {"value": array})."""
  state = _state_tree(step_dir)
  frozen = {}
  for name, value in safetensors.numpy.load_file(base_dir / "model.safetensors").items():
    node = frozen
    for key in name.split(".")[:-1]:
      node = node.setdefault(key, {})
    node[name.split(".")[-1]] = {"value": value}
  state["frozen"] = frozen
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(step_dir / "state.old_layout", args=ocp.args.PyTreeSave(state))
  shutil.rmtree(step_dir / "state")
  (step_dir / "state.old_layout").rename(step_dir / "state")


def test_lora_run_killed_resumes_exactly(tmp_path, tokenizer_dir, lora_args):
  """Adapters, their optimizer state and the dropout stream resume exactly; the checkpoints
  hold the adapters only (the base is reloaded from model.init_from), and a checkpoint in
  the layout that also held the base resumes the same way."""
  uninterrupted = tmp_path / "uninterrupted"
  _run(uninterrupted, tokenizer_dir, *lora_args)
  killed = tmp_path / "killed"
  code, _ = _start_and_signal(killed, tokenizer_dir, signal.SIGKILL, *lora_args)
  assert code == -signal.SIGKILL
  newest = max(_finished_steps(killed))
  assert newest < STEPS, "the run finished before the signal"
  old_layout = tmp_path / "old_layout"
  shutil.copytree(killed, old_layout)
  base_dir = pathlib.Path(lora_args[0].split("hf:", 1)[1])
  _rewrite_in_old_layout(old_layout / "checkpoints" / str(newest), base_dir)

  resumed = _run(killed, tokenizer_dir, *lora_args)
  assert "resumed from checkpoint" in resumed.stderr
  assert _losses(killed) == _losses(uninterrupted)
  want, got = _final_params(uninterrupted), _final_params(killed)
  assert want.keys() == got.keys() and want
  assert all(name.split("/")[-3] == "lora" for name in want), sorted(want)[:3]
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)

  # What a checkpoint holds: the fields of one definition, and arrays that add up to the
  # adapters and their two Adam moments (plus scalars: step, counts, the dropout key), far
  # below the base's weights. On disk orbax keeps some arrays twice plus metadata, and how
  # much varies with the writes' timing (417-586 KB for these 3 x 32 KB on a loaded 2-core
  # host, as large as this tiny base's file), so the disk gets only a loose upper bound.
  step_dir = uninterrupted / "checkpoints" / str(STEPS)
  state = _state_tree(step_dir)
  assert set(state) == set(step_lib.CHECKPOINTED)
  adapter_bytes = sum(v.nbytes for v in want.values())
  held_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(state))
  assert 3 * adapter_bytes <= held_bytes <= 3 * adapter_bytes + 1024, (held_bytes, adapter_bytes)
  base_bytes = (base_dir / "model.safetensors").stat().st_size
  assert held_bytes < base_bytes / 4, (held_bytes, base_bytes)
  state_bytes = _folder_bytes(step_dir / "state")
  assert state_bytes <= 8 * 3 * adapter_bytes + 128 * 1024, (state_bytes, adapter_bytes)

  # The old layout: resumes from the same step to the same losses and adapters, nothing moved.
  resumed = _run(old_layout, tokenizer_dir, *lora_args)
  assert f"resumed from checkpoint {newest}" in resumed.stderr
  assert "damaged" not in resumed.stderr
  assert not (old_layout / "damaged_checkpoints").exists()
  assert _losses(old_layout) == _losses(uninterrupted)
  got = _final_params(old_layout)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
