"""Reproduce the paper's findings: IT vs IM on its data, one resumable command.

    python -m im_jax.study --out DIR [--scale SCALE] [--only NAME ...]
        [--results FOLDER] [--model hf:DIR] [--data-dir DIR]

Experiments (--only picks some): overfitting, memorisation, data_size, length_ratio,
second_seed (the LIMA IT-vs-IM comparison again with another seed).
Scales: smoke (tiny random-init model, every experiment in minutes: tests the machinery),
cpu (SmolLM2-135M-Instruct sized to about 2 hours of a 2-core CPU by a measured tokens/s),
accelerator (any Hugging Face model given with --model hf:DIR; every method),
replicated (the second edition, docs/study_plan.md: IT, IM and the it_instr control on 3
disjoint LIMA subsets for 10 epochs, the held-out loss of every example after every epoch;
smoke_replicated: the same machinery at the smoke scale's size).

Each run is an ordinary training workdir under DIR/runs/; each finished run's measures go to
the results folder (default DIR/results/SCALE; give e.g. docs/study to commit them) and are
never recomputed; an interrupted run resumes from its checkpoint. The report is
DIR/results.json, DIR/results.md and PNG plots in DIR. Bad settings print one line and exit
with status 2; the study never writes over its inputs or results made with other settings.

--out (and --results) may be gs://BUCKET/...: the study then works in a local folder named
after it, uploads each result when it is finished and the report at the end, and copies the
bucket's results first when it starts (im_jax/study/bucket.py).
"""

import argparse
import logging
import pathlib
import sys
import time

from im_jax import cli
from im_jax.study import scales  # plain dataclasses: --help stays light

# runs.EXPERIMENTS, repeated so that --help imports nothing heavy (tested equal).
EXPERIMENTS = ("overfitting", "memorisation", "data_size", "length_ratio", "second_seed")


def _parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m im_jax.study", description=__doc__)
  parser.add_argument("--out", required=True,
                      help="study folder: data subsets, run workdirs, the report")
  parser.add_argument("--scale", choices=tuple(scales.SCALES), default="smoke")
  parser.add_argument("--only", nargs="+", action="extend", choices=EXPERIMENTS,
                      help="only these experiments (default: all)")
  parser.add_argument("--results", default=None,
                      help="folder of finished runs' results (default DIR/results/SCALE)")
  parser.add_argument("--first-edition", default=None,
                      help="the replicated scales' report re-reads this results folder's cells "
                           "(the first edition's: docs/study) with its statistics")
  parser.add_argument("--model", default="",
                      help="hf:DIR, the model of the accelerator scale (Llama-2-7B: the paper's)")
  parser.add_argument("--data-dir", default=None,
                      help="the paper's data files (default: ../shared/data)")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  started = time.perf_counter()
  # Orbax and grain log every file operation at INFO through absl: keep theirs to warnings.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("im_jax").setLevel(logging.WARNING)
  from im_jax import write_faults  # pylint: disable=g-import-not-at-top
  from im_jax.data.conversation import DataError  # pylint: disable=g-import-not-at-top
  from im_jax.study import runner  # pylint: disable=g-import-not-at-top

  remote = {}  # --out / --results in a bucket: worked on locally, uploaded (study.bucket)
  try:
    _localize(args, remote)
  except ValueError as e:  # paths.CloudError: no bucket, credentials or permission
    return cli.report(e)
  # A full disk: library tracebacks go to OUT/errors.log (or a temporary file), one line here.
  tracebacks = write_faults.TracebackLog(pathlib.Path(args.out) / "errors.log")
  try:
    with tracebacks:
      written = _run(args, argv, started, remote.get("results"))
      if "out" in remote:
        from im_jax.study import bucket  # pylint: disable=g-import-not-at-top

        written = bucket.upload_report(written, pathlib.Path(args.out), remote["out"])
  except write_faults.WriteFailed as e:  # a run's training: it names its intact checkpoint
    return cli.report(f"{e}{tracebacks.note(e)}", cli.EXIT_FAILED)
  except (DataError, OSError, ValueError, KeyError) as e:
    if failed := write_faults.failed_write(  # a result, a data subset, the report
        e, safe="the results already written are whole", rerun="the same command to go on"):
      return cli.report(f"{failed}{tracebacks.note(e)}", cli.EXIT_FAILED)
    return cli.report(e)
  except runner.StudyStopped as e:
    print(f"stopped: {e}", file=sys.stderr)
    return 1
  print("\n".join(f"wrote {p}" for p in written))
  return 0


def _localize(args: argparse.Namespace, remote: dict[str, str]) -> None:
  """A gs:// --out or --results, checked writable before any work, is replaced by a local
  folder (`study.bucket.working_folder`); `remote` keeps the bucket paths."""
  from im_jax import paths  # pylint: disable=g-import-not-at-top
  from im_jax.study import bucket  # pylint: disable=g-import-not-at-top

  for name in ("out", "results"):
    value = getattr(args, name)
    if value and paths.is_remote(value):
      paths.check_ready(value, what=f"--{name}", write=True)
      remote[name] = value.rstrip("/")
      setattr(args, name, str(bucket.working_folder(value)))
  if "out" in remote:
    if "results" not in remote and not args.results:  # the default, OUT/results/SCALE
      remote["results"] = f"{remote['out']}/results/{args.scale}"
    print(f"working in {args.out}; results and the report go to {remote['out']}",
          file=sys.stderr)


def _run(args: argparse.Namespace, argv: list[str] | None, started: float,
         results_mirror: str | None = None) -> list[pathlib.Path]:
  from im_jax import output_guard  # pylint: disable=g-import-not-at-top  (jax: slow)
  from im_jax.study import orchestrate, start_models  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(args.out)
  inputs = [args.data_dir, output_guard.local_path(args.model) if args.model else None]
  output_guard.check_not_input(out, [p for p in inputs if p])
  if args.scale == "accelerator":  # a damaged model stops here, before anything is written
    start_models.check_model(args.model)
  kind = output_guard.protected_kind(out)
  if kind is not None and not kind.startswith("a folder holding"):  # its own runs/ hold some
    raise ValueError(f"--out {out} is {kind}: give the study a folder of its own")
  if args.first_edition and not scales.SCALES[args.scale].replicas:
    raise ValueError(f"--first-edition is read by the replicated scales' report, not by "
                     f"--scale {args.scale}")
  if args.first_edition and not pathlib.Path(args.first_edition).is_dir():
    raise ValueError(f"--first-edition {args.first_edition}: no such folder")
  return orchestrate.run_study(out, args.scale, tuple(args.only or ()), args.results,
                               args.model, args.data_dir, argv_text(argv), started,
                               results_mirror=results_mirror,
                               first_edition=args.first_edition)


def argv_text(argv: list[str] | None) -> str:
  return " ".join(["python -m im_jax.study", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  from im_jax import malloc_tuning  # pylint: disable=g-import-not-at-top
  malloc_tuning.reexec_with_tuned_malloc()
  sys.exit(main())
