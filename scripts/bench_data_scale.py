"""`python scripts/bench_data.py --scale`: a training start's data cost against N examples.

For each N: N synthetic Alpaca-like conversations (lengths drawn like Alpaca's: short
instructions, an input on 40% of them, replies of tens to hundreds of words) in one JSONL
file (`--container json|parquet`: the same records as a JSON array, or Parquet with row
groups of `--row-group-rows`); then, for 1 and 2 processes (2 x 4 simulated CPU devices, gloo), a first start in a
fresh workdir (`train.max_steps=2`, a checkpoint every step) and a resume from its step-1
checkpoint (the step-2 one removed). Each start runs in a child process that wraps the
repository's own `experiment.build_data` and train step with timers, so any checkout runs
under the same command (`--repo`: its folder is put first on `sys.path`, and the children
run outside any checkout, so `python -m`'s working folder cannot shadow it).

Per start: seconds to the first train step (from the child's start), seconds in
`build_data` (reading, encoding and planning the data), of which loading the tokenizer
(`load_tokenizer`: importing transformers included), peak RSS (the largest process).
"""

import json
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

_WORDS = ("the a of to and in is it that for on with as be this by are from or an can "
          "which use data model time example list write given number story explain make "
          "sentence describe three find two new following word create best way water "
          "people code function value output input first more most also other into").split()


def _words(rng: random.Random, mean: float) -> str:
  return " ".join(rng.choice(_WORDS) for _ in range(max(1, int(rng.lognormvariate(0, 0.7)
                                                                 * mean))))


def write_alpaca_like(path: pathlib.Path, n: int, seed: int = 0) -> None:
  rng = random.Random(seed)
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      record = {"instruction": f"{i}: " + _words(rng, 12),
                "input": _words(rng, 10) if rng.random() < 0.4 else "",
                "output": _words(rng, 50)}
      f.write(json.dumps(record) + "\n")


def write_data(scratch: pathlib.Path, n: int, container: str, row_group_rows: int) -> pathlib.Path:
  """The N examples in `container`: JSONL, a JSON array or Parquet (row groups of
  `row_group_rows`), written once into `scratch`."""
  jsonl = scratch / f"alpaca_like_{n}.jsonl"
  if not jsonl.exists():
    write_alpaca_like(jsonl, n)
  if container == "jsonl":
    return jsonl
  path = scratch / f"alpaca_like_{n}_{container}.{container}"
  if not path.exists():
    with open(jsonl, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    if container == "json":
      path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    else:
      import pyarrow as pa  # pylint: disable=g-import-not-at-top
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

      pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_rows)
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args, data: pathlib.Path, workdir: pathlib.Path, processes: int, out: pathlib.Path):
  """Runs one start on `processes` processes; (seconds to first step, plan s, of which
  tokenizer loading s, peak RSS MiB): the largest over the processes."""
  flags = ["--config", str(pathlib.Path(args.repo) / "configs" / "base.py"),
           "--workdir", str(workdir), f"--config.data.train={data}",
           f"--config.data.tokenizer={args.tokenizer}",
           f"--config.data.max_seq_len={args.max_seq_len}", "--config.train.batch_size=8",
           "--config.train.max_steps=2", "--config.checkpoint.every_steps=1",
           "--config.checkpoint.keep=5", "--config.mesh.data=2", "--config.mesh.fsdp=-1",
           f"--config.data.read_threads={args.read_threads}"]
  port = _free_port()
  procs = []
  for i in range(processes):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count="
               f"{8 // processes}", JAX_PLATFORMS="cpu", BENCH_OUT=f"{out}.{i}",
               JAX_COMPILATION_CACHE_DIR=str(out.parent / "jax_cache"))
    if processes > 1:
      env.update(IM_JAX_COORDINATOR=f"localhost:{port}", IM_JAX_NUM_PROCESSES=str(processes),
                 IM_JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, __file__, "--child", args.repo, "--", *flags], env=env,
        cwd=out.parent, stdout=subprocess.DEVNULL, stderr=open(f"{out}.{i}.log", "w")))
  rss = []
  for p in procs:
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
      raise RuntimeError(f"start failed ({p.returncode}): see {out}.{procs.index(p)}.log")
    rss.append(usage.ru_maxrss / 1024)
  timings = [json.loads(pathlib.Path(f"{out}.{i}").read_text()) for i in range(processes)]
  return (max(t["first_step_s"] for t in timings), max(t["plan_s"] for t in timings),
          max(t.get("tokenizer_s", float("nan")) for t in timings), max(rss))


def main(args) -> None:
  sizes = [int(s) for s in args.sizes.split(",")]
  counts = [int(p) for p in args.processes.split(",")]
  if pathlib.Path(args.tokenizer).is_dir():  # the starts run in the scratch folder
    args.tokenizer = str(pathlib.Path(args.tokenizer).absolute())
  scratch = pathlib.Path(args.scratch or tempfile.mkdtemp(prefix="bench_data_scale_"))
  scratch.mkdir(parents=True, exist_ok=True)
  print(f"repo {args.repo}; {args.container}; max_seq_len {args.max_seq_len}; tiny model, 2 steps; "
        f"load average {os.getloadavg()[0]:.2f}")
  print(f"{'examples':>9}{'procs':>6}{'start':>8}{'first step s':>14}{'plan s':>9}"
        f"{'tokenizer s':>13}{'peak RSS MiB':>14}")
  try:
    for n in sizes:
      data = write_data(scratch, n, args.container, args.row_group_rows)
      for processes in counts:
        workdir = scratch / f"run_{n}_{processes}"
        shutil.rmtree(workdir, ignore_errors=True)
        for start in ("first", "resume"):
          if start == "resume":  # as if stopped after step 1
            shutil.rmtree(workdir / "checkpoints" / "2")
          first, plan, tokenizer, rss = _start(args, data, workdir, processes,
                                               scratch / f"timing_{n}_{processes}_{start}")
          print(f"{n:>9}{processes:>6}{start:>8}{first:>14.1f}{plan:>9.2f}{tokenizer:>13.2f}"
                f"{rss:>14.0f}", flush=True)
        shutil.rmtree(workdir)
  finally:
    if args.scratch is None:
      shutil.rmtree(scratch, ignore_errors=True)
  print(f"load average at the end {os.getloadavg()[0]:.2f}")


def _child(repo: str, flags: list[str]) -> None:
  """One training start of `repo`'s code, timed (runs in the child process)."""
  started = time.time()
  sys.path.insert(0, repo)
  from im_jax import malloc_tuning  # pylint: disable=g-import-not-at-top

  malloc_tuning.reexec_with_tuned_malloc()  # as the train entry point does
  import jax  # pylint: disable=g-import-not-at-top
  try:  # the wiring in im_jax.run, argparse (since issue 25)
    from im_jax.run import experiment, train as train_main  # pylint: disable=g-import-not-at-top
  except ImportError:  # an older checkout: absl flags
    from im_jax import experiment  # pylint: disable=g-import-not-at-top
    from im_jax.train import __main__ as train_main  # pylint: disable=g-import-not-at-top
  try:  # where build_data loads its tokenizer (run_data since the split of experiment)
    from im_jax.run import run_data as data_wiring  # pylint: disable=g-import-not-at-top
  except ImportError:
    data_wiring = experiment

  timings = {}
  real_build_data, real_build = experiment.build_data, experiment.build

  def build_data(*a, **k):
    t = time.time()
    out = real_build_data(*a, **k)
    timings["plan_s"] = time.time() - t
    return out

  def build(*a, **k):
    exp = real_build(*a, **k)
    step = exp.train_step

    def first_step(*sa, **sk):
      out = step(*sa, **sk)
      if "first_step_s" not in timings:
        jax.block_until_ready(out)
        timings["first_step_s"] = time.time() - started
        pathlib.Path(os.environ["BENCH_OUT"]).write_text(json.dumps(timings))
      return out

    first_step.__dict__.update(step.__dict__)  # e.g. `jitted`, which the memory log compiles
    exp.train_step = first_step
    return exp

  experiment.build_data, experiment.build = build_data, build
  real_load_tokenizer = getattr(data_wiring, "load_tokenizer", None)
  if real_load_tokenizer is not None:  # what of build_data is loading the tokenizer

    def load_tokenizer(*a, **k):
      t = time.time()
      out = real_load_tokenizer(*a, **k)
      timings["tokenizer_s"] = timings.get("tokenizer_s", 0.0) + time.time() - t
      return out

    data_wiring.load_tokenizer = load_tokenizer
  sys.argv = ["im_jax.train", *flags]
  if hasattr(train_main, "run_from_command_line"):
    sys.exit(train_main.main(flags))
  from absl import app  # pylint: disable=g-import-not-at-top
  from im_jax import cli  # pylint: disable=g-import-not-at-top
  app.run(train_main.main, flags_parser=cli.parse_flags)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
  _child(sys.argv[2], sys.argv[4:])
