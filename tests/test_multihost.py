"""Multi-process training on one machine: 2 JAX processes (CPU, localhost coordinator, gloo).

Each process has 4 CPU devices, so the global mesh has 8 (`data=2 x fsdp=4`), as in a 2-host
pod slice; the reference is one process with 8 devices on the same mesh shape.

The data order is a function of the global plan, the seed and the step alone (every process
takes its block of each global batch: `im_jax.data.pipeline`), so the reference is simply
the same command on one process: same global batches, same model, same step function. The
losses agree to float tolerance, not bit for bit: the cross-device sums run over gloo
between processes instead of inside one process, a different summation order (measured: at
most one float32 ulp per step). (Before the global plan each process packed its own shard,
and the reference had to be a special driver feeding the two shards' batches side by side.)

Elastic resume: a checkpoint written by one process is finished by two, and one written by
two is finished by one; both give the uninterrupted run's losses and weights. A checkpoint
whose data position is tied to its process count (an earlier im_jax's per-process layout) is
refused in one line, exit status 2, nothing moved.

Exact resume is bit-exact: a 2-process run that gets a preemption notice (SIGTERM) on one
host only (both processes must agree, save together and exit), is restarted, then loses a peer
to SIGKILL (the survivor must stop rather than hang), and is restarted again, must give the
same per-step losses and bit-identical final parameters as the uninterrupted 2-process run.

Every subprocess runs in its own session and is SIGKILLed with its group on any failure or
timeout, so a crashed or stuck peer cannot hang the suite. Compiled programs go to a
persistent cache shared by the runs (the same programs, so numerics are unchanged).
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from im_jax import distributed
from im_jax.data import synthetic
from im_jax.train.metrics_log import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROCESSES = 2
LOCAL_DEVICES = 4
STEPS = 12
EVERY = 3  # checkpoint interval
RUN_TIMEOUT = 180  # seconds for one whole run (all processes)
PEER_EXIT_TIMEOUT = 60  # seconds the survivor of a killed peer gets to stop by itself

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a last resort: every run has its own timeout; slow: trains with two processes


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  convs = synthetic.make_conversations(64, seed=0)
  return synthetic.train_tokenizer(synthetic.tokenizer_texts(convs),
                                   tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _flags(workdir, tokenizer_dir):
  return ["--config", str(ROOT / "configs/base.py"), "--workdir", str(workdir),
          "--config.data.train=synthetic:64", f"--config.data.tokenizer={tokenizer_dir}",
          "--config.data.max_seq_len=128", "--config.train.batch_size=8",
          f"--config.train.max_steps={STEPS}", "--config.optim.lr=1e-3",
          f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.keep=10",
          "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.data.read_threads=0",
          "--config.data.eval_fraction=0.2", f"--config.eval.every_steps={STEPS // 2}"]


def _env(cache, local_devices, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("IM_JAX_")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             IM_JAX_HEARTBEAT_TIMEOUT="5", IM_JAX_INIT_TIMEOUT="60", **extra)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Processes:
  """Subprocesses, each in its own session; `kill()` SIGKILLs every group still alive."""

  def __init__(self, commands, envs, log_dir: pathlib.Path, name: str):
    self.logs = []
    self.procs = []
    for i, (command, env) in enumerate(zip(commands, envs)):
      out, err = log_dir / f"{name}.{i}.out", log_dir / f"{name}.{i}.err"
      self.logs.append((out, err))
      with out.open("w") as fo, err.open("w") as fe:  # files: a full pipe cannot block
        self.procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=fo, stderr=fe,
                                           start_new_session=True))

  def kill(self, index: int | None = None) -> None:
    for i, p in enumerate(self.procs):
      if (index is None or i == index) and p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        p.wait()

  def wait(self, timeout: float) -> list[int]:
    """Exit codes; on timeout every process is killed and the test fails."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in self.procs):
      time.sleep(0.1)
    if any(p.poll() is None for p in self.procs):
      self.kill()
      pytest.fail(f"processes still running after {timeout}s (killed)\n{self.tails()}")
    return [p.returncode for p in self.procs]

  def stdout(self, i: int) -> str:
    return self.logs[i][0].read_text()

  def stderr(self, i: int) -> str:
    return self.logs[i][1].read_text()

  def tails(self) -> str:
    return "\n".join(f"--- process {i} stderr:\n{self.stderr(i)[-2000:]}"
                     for i in range(len(self.procs)))


def _start_multi(workdir, tokenizer_dir, cache, log_dir, name, *extra) -> _Processes:
  port = _free_port()
  command = [sys.executable, "-m", "im_jax.train", *_flags(workdir, tokenizer_dir), *extra]
  envs = [_env(cache, LOCAL_DEVICES, IM_JAX_COORDINATOR=f"localhost:{port}",
               IM_JAX_NUM_PROCESSES=str(PROCESSES), IM_JAX_PROCESS_ID=str(i))
          for i in range(PROCESSES)]
  return _Processes([command] * PROCESSES, envs, log_dir, name)


def _start_single(workdir, tokenizer_dir, cache, log_dir, *extra,
                  name: str = "reference") -> _Processes:
  """The same command on one process with all the devices (the same mesh shape)."""
  command = [sys.executable, "-m", "im_jax.train", *_flags(workdir, tokenizer_dir), *extra]
  return _Processes([command], [_env(cache, PROCESSES * LOCAL_DEVICES)], log_dir, name)


def _check_finished(procs: _Processes) -> None:
  codes = procs.wait(RUN_TIMEOUT)
  assert codes == [0] * len(codes), procs.tails()
  for i in range(len(codes)):  # every process ran every step and returned
    assert f"done: step {STEPS}," in procs.stdout(i), procs.tails()


def _finished_steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _losses(workdir, key="loss"):
  return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


def _final_params(workdir) -> dict[str, np.ndarray]:
  # As numpy: the saved shardings name devices of two processes that do not exist here.
  path = workdir / "checkpoints" / str(STEPS) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  out = {}

  def walk(tree, prefix):
    if isinstance(tree, dict):
      for k, v in tree.items():
        walk(v, f"{prefix}/{k}")
    else:
      out[prefix] = np.asarray(tree)

  walk(state["params"], "")
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir, compile_cache):
  """The uninterrupted 2-process run and the 1-process reference, run side by side.

  Both export a Hugging Face folder at the end: in the 2-process run, parameters sharded
  over both processes are gathered by both and written by process 0.
  """
  base = tmp_path_factory.mktemp("runs")
  multi, reference = base / "multi", base / "reference"
  export = "--config.export_hf=True"
  procs = [_start_multi(multi, tokenizer_dir, compile_cache, base, "multi", export),
           _start_single(reference, tokenizer_dir, compile_cache, base, export)]
  try:
    for p in procs:
      _check_finished(p)
  finally:
    for p in procs:
      p.kill()
  return multi, reference


def test_two_processes_match_one_process_on_the_same_global_batches(runs):
  multi, reference = runs
  got, want = _losses(multi), _losses(reference)
  assert sorted(want) == list(range(1, STEPS + 1))
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5, atol=0)
  a, b = _final_params(multi), _final_params(reference)
  assert a.keys() == b.keys() and a
  for name in a:
    np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
  # Held-out loss: each process evaluates its block of each global eval batch.
  got, want = _losses(multi, "eval_loss"), _losses(reference, "eval_loss")
  assert sorted(got) == sorted(want) == [STEPS // 2, STEPS]
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)


def test_two_process_export_matches_one_process(runs):
  multi, reference = runs
  got = safetensors.numpy.load_file(multi / "hf" / "model.safetensors")
  want = safetensors.numpy.load_file(reference / "hf" / "model.safetensors")
  assert got.keys() == want.keys() and got
  for name in got:
    assert got[name].shape == want[name].shape, name
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
  assert not list(multi.glob(".hf*"))  # no partial or old folder left by a second writer


def _wait_for_checkpoint(procs: _Processes, workdir: pathlib.Path, after: int) -> None:
  """Returns once a checkpoint > `after` is complete (or a process exited, or time is up)."""
  deadline = time.time() + RUN_TIMEOUT
  while time.time() < deadline and all(p.poll() is None for p in procs.procs):
    if any(s > after for s in _finished_steps(workdir)):
      return
    time.sleep(0.02)


def test_interrupted_two_process_run_resumes_exactly(tmp_path, tokenizer_dir, compile_cache,
                                                     runs):
  """Preempted on one host, then a peer killed, then finished: as if never interrupted.

  1. SIGTERM to process 1 only (a preemption notice reaches one host): both processes must
     agree at the next step, save the same checkpoint together and exit 0.
  2. Restarted, then process 1 SIGKILLed after a newer checkpoint: process 0 must fail by
     itself (its next collective fails; the coordination service's heartbeat ends it), not
     hang. It is killed after PEER_EXIT_TIMEOUT either way, and the test fails if it was.
  3. Restarted again: runs to the end.
  """
  workdir = tmp_path / "run"
  procs = _start_multi(workdir, tokenizer_dir, compile_cache, tmp_path, "preempted")
  try:
    _wait_for_checkpoint(procs, workdir, after=EVERY - 1)
    procs.procs[1].send_signal(signal.SIGTERM)
    assert procs.wait(RUN_TIMEOUT) == [0, 0], procs.tails()
  finally:
    procs.kill()
  for i in range(PROCESSES):
    assert "preempted at step" in procs.stderr(i), procs.tails()
  preempted_at = max(_finished_steps(workdir))
  assert preempted_at < STEPS, "the run finished before the signal: nothing was tested"

  procs = _start_multi(workdir, tokenizer_dir, compile_cache, tmp_path, "killed")
  try:
    _wait_for_checkpoint(procs, workdir, after=preempted_at)
    procs.kill(1)
    deadline = time.time() + PEER_EXIT_TIMEOUT
    while time.time() < deadline and procs.procs[0].poll() is None:
      time.sleep(0.1)
    survivor = procs.procs[0].poll()
  finally:
    procs.kill()
  assert survivor not in (None, 0), f"process 0 did not stop by itself\n{procs.tails()}"
  for i in range(PROCESSES):
    assert f"resumed from checkpoint {preempted_at}" in procs.stderr(i), procs.tails()
  killed_at = max(_finished_steps(workdir))
  assert preempted_at < killed_at < STEPS, "no checkpoint between the interruptions"

  resumed = _start_multi(workdir, tokenizer_dir, compile_cache, tmp_path, "resumed")
  try:
    _check_finished(resumed)
  finally:
    resumed.kill()
  for i in range(PROCESSES):
    assert f"resumed from checkpoint {killed_at}" in resumed.stderr(i), resumed.tails()
  multi, _ = runs
  expected = _losses(multi)
  assert _losses(workdir) == expected  # exact float equality, every step
  assert _losses(workdir, "eval_loss") == _losses(multi, "eval_loss")
  want, got = _final_params(multi), _final_params(workdir)
  assert want.keys() == got.keys() and want
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _checkpointed_copy(workdir: pathlib.Path, out: pathlib.Path, step: int) -> pathlib.Path:
  """`workdir` as if its run had stopped after checkpoint `step` (later ones and the export
  removed; the resumed run truncates metrics.jsonl after `step` itself)."""
  shutil.copytree(workdir, out, ignore=shutil.ignore_patterns("hf", ".lock"))
  for later in _finished_steps(out):
    if later > step:
      shutil.rmtree(out / "checkpoints" / str(later))
  return out


def _close_to(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
  """Each tensor within 1e-4 of its largest magnitude."""
  assert got.keys() == want.keys() and want
  for name in want:
    scale = float(np.abs(want[name]).max())
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4 * scale, err_msg=name)


def test_a_run_resumes_on_another_number_of_processes(tmp_path, tokenizer_dir, compile_cache,
                                                      runs):
  """Checkpointed on 1 process x 8 devices, finished on 2 x 4 (the same mesh shape), and the
  other way round: the uninterrupted runs' losses (1e-5 relative) and exported weights. And a
  checkpoint whose data position is tied to its 2 processes (an earlier im_jax's layout) is
  refused on 1 in one line, exit 2, with nothing moved."""
  multi, reference = runs
  middle = STEPS // 2
  export = "--config.export_hf=True"
  one_to_two = _checkpointed_copy(reference, tmp_path / "one_to_two", middle)
  two_to_one = _checkpointed_copy(multi, tmp_path / "two_to_one", middle)
  inelastic = _checkpointed_copy(multi, tmp_path / "inelastic", middle)
  data = inelastic / "checkpoints" / str(middle) / "data"
  for i in range(PROCESSES):  # grain's own per-process state, as im_jax wrote it before
    (data / f"process_{i}-of-{PROCESSES}.json").write_text('{"next_index": 24}')
  before = sorted(p.name for p in (inelastic / "checkpoints").iterdir())
  procs = [_start_multi(one_to_two, tokenizer_dir, compile_cache, tmp_path, "one_to_two",
                        export),
           _start_single(two_to_one, tokenizer_dir, compile_cache, tmp_path, export,
                         name="two_to_one"),
           _start_single(inelastic, tokenizer_dir, compile_cache, tmp_path, name="inelastic")]
  try:
    for p in procs[:2]:
      _check_finished(p)
    assert procs[2].wait(RUN_TIMEOUT) == [2], procs[2].tails()
  finally:
    for p in procs:
      p.kill()
  for p in procs[:2]:
    for i in range(len(p.procs)):
      assert f"resumed from checkpoint {middle}" in p.stderr(i), p.tails()
  for resumed, uninterrupted in ((one_to_two, reference), (two_to_one, multi)):
    got, want = _losses(resumed), _losses(uninterrupted)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=1e-5, atol=0)
    _close_to(safetensors.numpy.load_file(resumed / "hf" / "model.safetensors"),
              safetensors.numpy.load_file(uninterrupted / "hf" / "model.safetensors"))
  error = procs[2].stderr(0).strip().splitlines()[-1]
  assert error.startswith(f"error: checkpoint {middle} in ") and "written by 2 process(es) " \
      "and this run has 1 (rerun with 2 processes)" in error, procs[2].tails()
  assert sorted(p.name for p in (inelastic / "checkpoints").iterdir()) == before
  assert not (inelastic / "damaged_checkpoints").exists()


def test_settings_from_flags_then_environment():
  env = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4",
         distributed.ENV_PROCESS_ID: "3"}
  assert distributed.explicit_settings({}, {}) is None
  assert distributed.explicit_settings({}, env) == distributed.Settings("10.0.0.1:1234", 4, 3)
  flag_values = {"coordinator_address": "host0:99", "num_processes": 2, "process_id": 1}
  assert distributed.explicit_settings(flag_values, env) == distributed.Settings("host0:99", 2, 1)
  # Each value independently: a flag overrides only its own variable.
  assert distributed.explicit_settings({"process_id": 0}, env).process_id == 0


@pytest.mark.parametrize("env, match", [
    ({distributed.ENV_COORDINATOR: "h:1"}, "incomplete"),
    ({distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "2",
      distributed.ENV_PROCESS_ID: "2"}, "not in"),
    ({distributed.ENV_COORDINATOR: "h", distributed.ENV_NUM_PROCESSES: "2",
      distributed.ENV_PROCESS_ID: "0"}, "host:port"),
    ({distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "two",
      distributed.ENV_PROCESS_ID: "0"}, "not an integer"),
])
def test_bad_settings_are_refused(env, match):
  # A process that silently ran alone would train on one shard of the data.
  with pytest.raises(ValueError, match=match):
    distributed.explicit_settings({}, env)
