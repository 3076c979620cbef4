"""Faults in one line: a full disk, in every command that writes.

A full disk is a small tmpfs (mounting one needs root, as CI runs; skipped otherwise): during
training (one line naming what could not be written and the intact checkpoint, exit 1, no
traceback on the console, whichever of the checkpoint, the metrics record and the
TensorBoard event meets it first; a rerun once space is freed resumes), and while exporting,
writing a metrics record or a study result (one line, nothing half-written).
"""

import contextlib
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from im_jax import write_faults
from im_jax.convert.__main__ import main as convert_main
from im_jax.data import synthetic
from im_jax.study import __main__ as study_main
from im_jax.train.metrics_log import METRICS_FILE, MetricsLogger, read_metrics
from tests import fixtures_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir):
  """A tiny HF folder and the checkpoint `convert from-hf` makes of it: convert's inputs."""
  root = tmp_path_factory.mktemp("models")
  hf = fixtures_lib.tiny_hf_base(tiny_tokenizer_dir, root / "hf")
  assert convert_main(["from-hf", "--hf", str(hf), "--out", str(root / "ckpt")]) == 0
  return {"hf": hf, "ckpt": root / "ckpt"}


@contextlib.contextmanager
def _small_disk(path: pathlib.Path, size: str):
  """A tmpfs of `size` at `path`, always unmounted."""
  if os.geteuid() != 0:
    pytest.skip("a full disk is a small tmpfs, and mounting one needs root (CI runs as root)")
  path.mkdir(parents=True, exist_ok=True)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk: pathlib.Path) -> None:
  """Leaves the disk with no free page."""
  with contextlib.suppress(OSError), (disk / "filler").open("wb") as f:
    while True:
      f.write(b"\0" * 65536)


@pytest.mark.slow  # trains through a subprocess
@pytest.mark.usefixtures("subprocess_compilation_cache")
def test_full_disk_in_training_is_one_line_naming_the_intact_checkpoint(tmp_path):
  """The issue's case, the whole workdir on one small disk: whichever write meets the full
  disk first (the checkpoint of step 8, or a metrics record or TensorBoard event while it is
  being saved), one line names it and the intact checkpoint 4, exit 1, no traceback on the
  console. The rerun after freeing space is the in-process test below."""
  tokenizer = synthetic.train_tokenizer(
      synthetic.tokenizer_texts(synthetic.make_conversations(200, seed=0)), tmp_path / "tok",
      vocab_size=400)
  # test_resume.py's run (its compiled step is shared): checkpoints of ~1.5 MB every 4 steps.
  command = [sys.executable, "-m", "im_jax.train", "--config", str(ROOT / "configs/base.py"),
             "--config.data.train=synthetic:200", f"--config.data.tokenizer={tokenizer}",
             "--config.data.max_seq_len=128", "--config.train.batch_size=8",
             "--config.train.max_steps=24", "--config.optim.lr=1e-3",
             "--config.checkpoint.every_steps=4", "--config.checkpoint.keep=10",
             "--config.mesh.fsdp=4", "--config.mesh.data=2", "--config.data.read_threads=0"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  with _small_disk(tmp_path / "disk", "2500k") as disk:  # room for one checkpoint, not two
    workdir = disk / "run"
    full = subprocess.run(command + ["--workdir", str(workdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    line = full.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        f"error: cannot write {re.escape(str(workdir))}/(checkpoints/8|{METRICS_FILE}|"
        r"tensorboard/events\.out\.tfevents\.[^:]+): no space left on device; checkpoint 4 is "
        r"intact; free space and rerun the same command to resume \(traceback in [^)]+\)",
        line), line
    assert [l for l in full.stderr.splitlines() if l.startswith("error")] == [line]
    # The workdir's errors.log, or a temporary file when the full disk refuses even that.
    log = pathlib.Path(line.rsplit("(traceback in ", 1)[1].rstrip(")"))
    assert "No space left on device" in log.read_text()
    if log.parent != workdir:
      log.unlink()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "4"]


class _Batches:
  """A resumable batch source (like a grain iterator): the loop needs only segment_ids."""

  def __init__(self):
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.index += 1
    return {"segment_ids": np.ones((8, 4), np.int32)}

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


# Records of over a page (4 KiB) each, in metrics.jsonl and in the event file alike: on a
# full disk the next record always needs a page that is not there, whatever the file's size.
_PADDING = {f"padding_{i:03d}": 1.0 for i in range(400)}


def _toy_run(workdir: pathlib.Path, fill: pathlib.Path | None = None):
  """loop.run with the real checkpoint store (asynchronous saves every 4 steps) and metrics
  writers, and a toy step (no compiling) that fills `fill`'s disk on step 6: between
  checkpoints 4 and 8."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from im_jax.checkpoint import CheckpointConfig  # pylint: disable=g-import-not-at-top
  from im_jax.train import loop, sharding, step  # pylint: disable=g-import-not-at-top

  def train_step(state, batch):
    del batch
    if fill is not None and int(state.step) == 5:
      _wait_for(workdir / "checkpoints" / "4")  # the asynchronous save of step 4 is done
      _fill(fill)
    return (state.replace(step=state.step + 1, params={"w": state.params["w"] + 1}),
            {"loss": jnp.float32(1.0), **_PADDING})

  state = step.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros((64, 64))},
                          opt_state={"mu": jnp.zeros((64, 64))}, rest={"b": jnp.zeros(4)},
                          rng=jnp.zeros((2,), jnp.uint32))
  config = loop.LoopConfig(total_steps=12, checkpoint=CheckpointConfig(every_steps=4, keep=10))
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  return loop.run(workdir=str(workdir), state=state, train_step=train_step, mesh=mesh,
                  train_batches=_Batches(), config=config, meta={})


def _wait_for(path: pathlib.Path, timeout_s: float = 60) -> None:
  import time  # pylint: disable=g-import-not-at-top

  deadline = time.monotonic() + timeout_s
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} did not appear"
    time.sleep(0.01)


@pytest.mark.timeout(120)  # tensorboardX's writer thread once died here and the run hung
@pytest.mark.parametrize("first", ["checkpoints", "metrics.jsonl", "tensorboard"])
def test_full_disk_in_training_whichever_write_fails_first(tmp_path, capfd, first):
  """The checkpoint (below Python, asynchronous: it surfaces at the next save), the metrics
  record or the TensorBoard event meets the full disk first (each on its own small disk): one
  line naming it and the intact checkpoint 4, no traceback on the console, no hang; once
  space is freed a rerun resumes from 4 and logs each step once."""
  with contextlib.ExitStack() as disks:
    run = disks.enter_context(_small_disk(tmp_path / "run", "1m"))
    disks.enter_context(_small_disk(run / "checkpoints", "4m"))
    disks.enter_context(_small_disk(run / "tensorboard", "1m"))
    full = run / "checkpoints" if first == "checkpoints" else (
        run / "tensorboard" if first == "tensorboard" else run)
    with write_faults.TracebackLog(run / "errors.log") as tracebacks:
      with pytest.raises(write_faults.WriteFailed) as info:
        _toy_run(run, fill=full)
    if tracebacks.path is not None and tracebacks.path.parent != run:  # the disk refused it
      tracebacks.path.unlink()
    failed = {"checkpoints": run / "checkpoints" / "8", "metrics.jsonl": run / METRICS_FILE,
              "tensorboard": next((run / "tensorboard").glob("events.out.tfevents.*"))}[first]
    assert str(info.value) == (f"cannot write {failed}: no space left on device; checkpoint 4 "
                               "is intact; free space and rerun the same command to resume")
    assert "Traceback" not in capfd.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]

    (full / "filler").unlink()
    result = _toy_run(run)
    assert result.resumed_from == 4 and result.step == 12
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))


def test_full_disk_in_convert_leaves_no_output(models, tmp_path, capsys):
  with _small_disk(tmp_path / "disk", "256k") as disk:
    for argv in (["from-hf", "--hf", str(models["hf"])],  # orbax (tensorstore) writes
                 ["to-hf", "--ckpt", str(models["ckpt"])]):  # safetensors writes
      out = disk / "out"
      assert convert_main([*argv, "--out", str(out)]) == 1
      line = fixtures_lib.one_error_line(capsys.readouterr().err)
      assert line.startswith(f"error: cannot write {out}: no space left on device; the inputs "
                             "are untouched and no half-written output is left; free space "
                             "and rerun the same command"), line
      assert os.listdir(disk) == []  # neither the folder nor its .partial
      _remove_named_log(line)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert convert_main(["to-hf", "--ckpt", str(models["ckpt"]), "--out",
                         str(disk / "out")]) == 1
    line = fixtures_lib.one_error_line(capsys.readouterr().err)
    assert line.startswith(
        f"error: cannot write {disk / 'out'}: read-only file system; the inputs are untouched "
        "and no half-written output is left; make it writable and rerun the same command"), line
    _remove_named_log(line)


def _remove_named_log(line: str) -> None:
  """The temporary traceback log a convert line names: it holds the traceback, then goes."""
  log = pathlib.Path(line.rsplit("(traceback in ", 1)[1].rstrip(")"))
  assert "Traceback" in log.read_text()
  log.unlink()


def test_write_failures_are_recognised_in_each_library_form():
  """As Python, tensorstore (the message of a real full-disk save, shortened) and safetensors
  report them; any other error is not one."""
  ocdbt = ('RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.mu/0.0" in OCDBT database at '
           'local file "/w/checkpoints/8.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/'
           'ocdbt.process_0/": Failed writing: "/w/checkpoints/8.orbax-checkpoint-tmp/d/3e": '
           "Failed to write 367407 bytes to file 19: No space left on device "
           "[os_error_code='28']")
  cases = [
      (OSError(122, "Disk quota exceeded", "/w/metrics.jsonl"),
       ("/w/metrics.jsonl", "disk quota exceeded", "free space")),
      (ValueError(ocdbt), ("/w/checkpoints/8", "no space left on device", "free space")),
      (RuntimeError("Error while serializing: I/O error: Read-only file system (os error 30)"),
       ("", "read-only file system", "make it writable")),
  ]
  for error, (path, reason, remedy) in cases:
    wrapped = RuntimeError("at the next save")  # Orbax re-raises from its threads
    wrapped.__cause__ = error
    failure = write_faults.find(wrapped)
    assert (failure.path, failure.reason, failure.remedy) == (path, reason, remedy)
  assert write_faults.find(FileNotFoundError(2, "No such file", "/x")) is None
  assert write_faults.find(ValueError("RESOURCE_EXHAUSTED: out of memory")) is None


def test_full_disk_metrics_record_and_event_are_whole_or_absent(tmp_path):
  with _small_disk(tmp_path / "disk", "64k") as disk:
    logger = MetricsLogger(disk, total_steps=100, tensorboard=True, progress=False)
    logger.write({"step": 0, "loss": 1.0})
    _fill(disk)
    with pytest.raises(OSError) as info:  # records fill the files' last free pages
      for step in range(1, 100):
        logger.write({"step": step, "loss": 1.0, "padding": "x" * 200})
    logger.close()
    records = read_metrics(disk)
    text = (disk / METRICS_FILE).read_text()
    assert text.endswith("\n") and len(text.splitlines()) == len(records)  # no half line
    assert [r["step"] for r in records] == list(range(len(records)))
    [event_file] = (disk / "tensorboard").iterdir()
    events = _events(event_file)  # every record whole, the header event first
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == list(range(len(events) - 1))
    assert len(records) - (len(events) - 1) in (0, 1)  # metrics.jsonl is written first
    assert {v.tag: v.simple_value for v in events[1].summary.value} == {"loss": 1.0}
    failed = write_faults.failed_write(info.value, safe="S", rerun="R")
    path = disk / METRICS_FILE if len(records) == len(events) - 1 else event_file
    assert str(failed) == f"cannot write {path}: no space left on device; S; free space and rerun R"


def _events(path: pathlib.Path) -> list:
  """The `Event`s of a TensorBoard event file, each TFRecord's length and CRCs checked."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top

  data, events = path.read_bytes(), []
  while data:
    (length,), (header_crc,) = struct.unpack("<Q", data[:8]), struct.unpack("<I", data[8:12])
    body, (body_crc,) = data[12:12 + length], struct.unpack("<I", data[12 + length:16 + length])
    assert header_crc == masked_crc32c(data[:8]) and body_crc == masked_crc32c(body)
    events.append(event_pb2.Event.FromString(body))
    data = data[16 + length:]
  return events


def test_event_records_are_framed_as_tensorboardx_frames_them(tmp_path):
  """The event file is written in the loop's thread now; its records are byte for byte what
  tensorboardX's own record writer makes of the same event."""
  from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
  from tensorboardX.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
  from im_jax.train import metrics_log  # pylint: disable=g-import-not-at-top

  event = event_pb2.Event(wall_time=1.5, step=3, summary=summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag="loss", simple_value=2.0)]))
  writer = RecordWriter(str(tmp_path / "reference"))
  writer.write(event.SerializeToString())
  writer.close()
  assert metrics_log.tfrecord(event.SerializeToString()) == (
      tmp_path / "reference").read_bytes()


def test_full_disk_for_a_study_result_is_one_line(tmp_path, capsys, monkeypatch):
  from im_jax.study import orchestrate, results  # pylint: disable=g-import-not-at-top

  with _small_disk(tmp_path / "disk", "64k") as disk:
    store = results.ResultStore(disk / "results")
    store.put("done", {"k": 1}, {"loss": 1.0})
    _fill(disk)

    def run_study(*args, **kwargs):  # the study's own runs, reduced to saving their next result
      del args, kwargs
      store.put("next", {"k": 1}, {"losses": [1.0] * 5000})

    monkeypatch.setattr(orchestrate, "run_study", run_study)
    assert study_main.main(["--out", str(tmp_path / "study")]) == 1
    line = fixtures_lib.one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {disk / 'results' / 'next.json'}: no "
                           "space left on device; the results already written are whole; "
                           "free space and rerun the same command to go on"), line
    _remove_named_log(line)
    assert sorted(os.listdir(disk / "results")) == ["done.json"]
    assert store.get("done", {"k": 1}) == {"key": {"k": 1}, "loss": 1.0}
