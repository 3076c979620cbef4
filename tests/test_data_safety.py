"""Nothing is lost or corrupted: outputs never replace inputs, workdirs or CKPTs; a damaged
checkpoint is moved aside and training goes on; one run per workdir; a refused resume leaves
the workdir's config.json as it was.

Each command that writes (train, convert, eval generate, report) is pointed at its own input
or at a real training workdir; it must refuse in one line, exit 2, and leave every byte of
every file as it was (compared with a snapshot of the whole tree).
"""

import errno
import hashlib
import json
import logging
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from im_jax.configs import base
from im_jax import output_guard, report
from im_jax.run import experiment, settings
from im_jax.convert.__main__ import main as convert_main
from im_jax.eval.__main__ import main as eval_main
from im_jax.train import loop, workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8


pytestmark = pytest.mark.usefixtures("compilation_cache")


def _tiny_config(**changes):
  c = base.get_config()
  c.data.train = "synthetic:40"
  c.data.tokenizer = "synthetic"
  c.data.max_seq_len = 64
  c.train.batch_size = 8
  c.train.max_steps = STEPS
  c.checkpoint.every_steps = 4
  c.checkpoint.keep = 10
  c.checkpoint.async_save = False
  c.export_hf = True
  for key, value in changes.items():
    *section, name = key.split(".")
    (c[section[0]] if section else c)[name] = value
  return c


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A real trained workdir (checkpoints, metrics, tokenizer, hf/), a CKPT and a data file."""
  root = tmp_path_factory.mktemp("world")
  workdir = root / "run"
  exp = experiment.build(settings.load(_tiny_config()), workdir)
  exp.export_hf(exp.run().state)
  assert convert_main(["from-hf", "--hf", str(workdir / "hf"), "--out", str(root / "ckpt")]) == 0
  data = root / "prompts.jsonl"
  data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "yo"}]}) + "\n")
  return root


def _snapshot(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(capsys, run, match: str) -> None:
  assert run() == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and match in err, err


@pytest.mark.parametrize("args, match", [
    (["to-hf", "--ckpt", "{run}", "--out", "{run}", "--overwrite"], "is the input"),
    (["to-hf", "--ckpt", "{run}", "--out", "{run}/hf", "--overwrite"], "is inside the input"),
    (["to-hf", "--ckpt", "{run}/checkpoints/8", "--out", "{run}", "--overwrite"],
     "contains the input"),
    (["to-hf", "--ckpt", "{ckpt}", "--out", "{run}", "--overwrite"], "a training workdir"),
    (["to-hf", "--ckpt", "{run}", "--out", "{ckpt}", "--overwrite"], "an im_jax CKPT folder"),
    (["to-hf", "--ckpt", "{ckpt}", "--out", "{root}", "--overwrite"], "contains the input"),
    (["from-hf", "--hf", "{run}/hf", "--out", "{ckpt}", "--overwrite"], "an im_jax CKPT"),
    (["from-hf", "--hf", "{run}/hf", "--out", "{run}/hf", "--overwrite"], "is the input"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_convert_never_replaces_inputs_workdirs_or_ckpts(world, capsys, args, match):
  before = _snapshot(world)
  names = {"run": world / "run", "ckpt": world / "ckpt", "root": world}
  _refused(capsys, lambda: convert_main([a.format(**names) for a in args]), match)
  assert _snapshot(world) == before


@pytest.mark.parametrize("model, out, match", [
    ("{run}", "{data}", "is the input"),
    ("{run}", "{run}/metrics.jsonl", "is inside the input"),
    ("{ckpt}", "{run}", "is a folder"),
    ("hf:{run}/hf", "{run}/hf/config.json", "is inside the input"),
])
def test_eval_generate_refuses_before_generating(world, capsys, model, out, match):
  before = _snapshot(world)
  names = {"run": world / "run", "ckpt": world / "ckpt", "data": world / "prompts.jsonl"}
  _refused(capsys, lambda: eval_main(["generate", "--model", model.format(**names), "--data",
                                      str(names["data"]), "--out", out.format(**names)]), match)
  assert _snapshot(world) == before


def test_eval_generate_checks_the_output_is_writable_first(world, tmp_path, capsys):
  (tmp_path / "a_file").write_text("x")  # (os.access cannot test read-only folders as root)
  _refused(capsys, lambda: eval_main(
      ["generate", "--model", str(world / "ckpt"), "--data", str(world / "prompts.jsonl"),
       "--out", str(tmp_path / "a_file" / "sub" / "out.json")]), "is not a writable folder")
  assert not capsys.readouterr().out  # nothing generated


@pytest.mark.parametrize("out, match", [
    ("{run}/metrics.jsonl", "is inside the input"),
    ("{run}", "is the input"),
    ("{root}", "contains the input"),
])
def test_report_never_writes_into_the_runs_it_reads(world, capsys, out, match):
  before = _snapshot(world)
  out = out.format(run=world / "run", root=world)
  _refused(capsys, lambda: report.main(["--workdir", str(world / "run"), "--out", out]), match)
  assert _snapshot(world) == before


@pytest.mark.parametrize("changes, workdir, match", [
    ({"data.train": "{data}", "data.tokenizer": "{run}/tokenizer"}, "{data}", "is the input"),
    ({"model.init_from": "hf:{run}/hf", "data.tokenizer": ""}, "{ckpt}", "im_jax CKPT folder"),
    ({"model.init_from": "{run}", "data.tokenizer": ""}, "{run}", "is the input"),
    ({"model.init_from": "{ckpt}", "data.tokenizer": ""}, "{ckpt}/params/x", "inside the input"),
    ({"model.init_from": "{ckpt}", "data.tokenizer": ""}, "{run}/hf", "Hugging Face model"),
    ({"data.tokenizer": "{run}/tokenizer"}, "{root}", "contains the input"),
])
def test_train_never_writes_over_its_inputs(world, changes, workdir, match):
  before = _snapshot(world)
  names = {"run": world / "run", "ckpt": world / "ckpt", "data": world / "prompts.jsonl",
           "root": world}
  c = _tiny_config(**{k: v.format(**names) for k, v in changes.items()})
  with pytest.raises(experiment.ConfigError, match=match) as info:
    experiment.build(settings.load(c), workdir.format(**names))
  assert "\n" not in str(info.value)
  assert _snapshot(world) == before


def test_guard_finds_nested_workdirs_and_ckpts(tmp_path):
  (tmp_path / "runs" / "a" / "checkpoints").mkdir(parents=True)
  assert "training workdir" in output_guard.protected_kind(tmp_path)
  assert output_guard.protected_kind(tmp_path / "runs" / "a") == \
      "a training workdir (it holds checkpoints/)"
  (tmp_path / "plain").mkdir()
  assert output_guard.protected_kind(tmp_path / "plain") is None


# A damaged newest checkpoint: moved aside, training goes on to the same weights.


def _params(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def _truncate(step_dir):
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.stat().st_size:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _delete(step_dir):
  next(f for f in sorted((step_dir / "state").rglob("*")) if f.is_file()).unlink()


def _flip(step_dir):
  for f in (step_dir / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(bytes(b ^ 0x5A for b in f.read_bytes()))


def _empty(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


@pytest.mark.parametrize("damage", [_truncate, _delete, _flip, _empty],
                         ids=lambda f: f.__name__.strip("_"))
def test_damaged_newest_checkpoint_is_moved_aside_and_training_goes_on(
    world, tmp_path, caplog, damage):
  workdir = tmp_path / "run"
  shutil.copytree(world / "run", workdir, ignore=shutil.ignore_patterns("hf"))
  damage(workdir / "checkpoints" / str(STEPS))
  with caplog.at_level(logging.WARNING, logger="im_jax"):
    result = experiment.build(settings.load(_tiny_config(**{"export_hf": False})), workdir).run()
  assert result.resumed_from == 4 and result.step == STEPS
  moved = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(moved) == 1 and "\n" not in moved[0], moved
  assert (workdir / "damaged_checkpoints" / str(STEPS)).is_dir()  # kept for a person to see
  for got, want in zip(_params(workdir, STEPS), _params(world / "run", STEPS), strict=True):
    np.testing.assert_array_equal(got, want)


# One run per workdir.

_HOLDER = """
import sys, time
from im_jax.train import workdir_lock
workdir_lock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_workdir_is_refused_until_the_first_dies(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirBusy) as info:
      experiment.build(settings.load(_tiny_config()), tmp_path)
    message = str(info.value)
    assert "\n" not in message and f"pid {holder.pid}" in message
    assert f"host {socket.gethostname()}" in message and "started 20" in message
    assert not (tmp_path / "config.json").exists()  # refused before writing anything
    proc = subprocess.run(
        [sys.executable, "-m", "im_jax.train", "--config", "configs/demo.py", "--workdir",
         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  workdir_lock.acquire(tmp_path)  # a killed holder leaves no lock behind
  workdir_lock.acquire(tmp_path)  # and this process may take it again (a rebuild)
  workdir_lock.release(tmp_path)


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
  with caplog.at_level(logging.WARNING, logger="im_jax"):
    workdir_lock.acquire(tmp_path)
  assert "nothing stops a second run" in caplog.text and "ENOLCK" in caplog.text
  workdir_lock.release(tmp_path)  # nothing held


# A refused resume changes nothing.


def test_refused_resume_keeps_config_json_and_names_each_change(world, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(world / "run", workdir, ignore=shutil.ignore_patterns("hf"))
  before = _snapshot(workdir)
  c = _tiny_config(**{"optim.lr": 1e-4, "data.max_seq_len": 128, "train.log_every": 5})
  with pytest.raises(loop.ResumeMismatch) as info:
    experiment.build(settings.load(c), workdir)
  assert str(info.value).splitlines()[1:] == ["  data.max_seq_len: 64 -> 128",
                                              "  optim.lr: 2e-05 -> 0.0001"]
  assert _snapshot(workdir) == before  # config.json still describes the checkpoints
