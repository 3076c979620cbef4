"""`python -m im_jax.train --config configs/FILE.py[:ARGS] --workdir DIR [--config.KEY=VALUE]`.

Thin: parse, build the experiment, run it, export. A bad config, bad data, a busy workdir or
one holding another run's checkpoints stops with one line and exit status 2; a run that
cannot go on (non-finite updates, no readable checkpoint) with one line and status 1.
Rerunning in the same workdir resumes from its newest checkpoint.

`--print-config` prints the resolved config (validated) as JSON and exits. `--dry-run`
validates, reads and encodes the data and prints the data plan (examples kept, dropped and
truncated, rows, padding, steps, tokens per step, parameters, outputs), then exits without
compiling or touching the workdir. The memory plan is `python -m im_jax.plan`.
"""

import pathlib
import sys

from im_jax import cli, distributed, malloc_tuning, write_faults
from im_jax.run import config_args


def _parser() -> config_args.ConfigArgumentParser:
  parser = config_args.ConfigArgumentParser(prog="python -m im_jax.train", description=__doc__)
  parser.add_argument("--workdir", required=True,
                      help="run folder: config, metrics, checkpoints (a local folder or gs://)")
  parser.add_argument("--dry-run", action="store_true",
                      help="print the data plan and exit: no compiling, nothing written (the "
                           "memory plan is python -m im_jax.plan)")
  parser.add_argument("--print-config", action="store_true",
                      help="print the resolved config as JSON and exit")
  distributed.add_arguments(parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  cli.log_to_stderr()
  try:
    config = config_args.load(args)
    # before any other JAX use; a single process when nothing is set
    distributed.initialize(distributed.explicit_settings(vars(args)))
  except ValueError as e:  # the config file or an override; incomplete multi-process settings
    return cli.report(e)
  if args.print_config or args.dry_run:
    return _inspect(config, args)
  # A full disk: library tracebacks (Orbax's threads log theirs) go to WORKDIR/errors.log,
  # the console gets one line (write_faults).
  with write_faults.TracebackLog(pathlib.Path(args.workdir) / "errors.log") as tracebacks:
    try:
      code = _train(config, args.workdir)
    except write_faults.WriteFailed as e:
      return cli.report(f"{e}{tracebacks.note(e)}", cli.EXIT_FAILED)
  if tracebacks.path is not None:  # a library logged a traceback, yet the run went on
    print(f"warning: library tracebacks were written to {tracebacks.path}", file=sys.stderr)
  return code


def _train(config, workdir: str) -> int:
  """Build, run and export; a write failure raises WriteFailed (one line, exit 1)."""
  from im_jax.data.conversation import DataError  # pylint: disable=g-import-not-at-top
  from im_jax import checkpoint  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from im_jax.run import experiment, settings  # pylint: disable=g-import-not-at-top
  from im_jax.train import loop, workdir_lock  # pylint: disable=g-import-not-at-top

  try:
    run = settings.validate(config, jax.device_count(), jax.process_count())  # the typed config
    exp = experiment.build(run, workdir)
    result = exp.run()
  except loop.ResumeMismatch as e:  # its `key: saved -> now` lines are the message
    return cli.report_lines(e)
  except (experiment.ConfigError, DataError, workdir_lock.WorkdirBusy) as e:
    return cli.report(e)
  except (ValueError, OSError) as e:  # anything else about the inputs (a tokenizer folder, ...)
    if failed := write_faults.failed_write(e, safe="no training step ran",
                                           rerun="the same command"):  # e.g. config.json
      raise failed from e
    return cli.report(e)
  except (loop.TrainingStopped, checkpoint.UnreadableCheckpoints) as e:
    return cli.report(e, cli.EXIT_FAILED)
  if result.preempted:
    print(f"preempted at step {result.step}; rerun the same command to resume", file=sys.stderr)
    return 0
  summary = {**result.last_metrics, **result.last_eval}
  shown = ("loss", "output_loss", "instruction_loss", "eval_output_loss", "eval_instruction_loss")
  print("done: step %d, %s" % (result.step, ", ".join(
      f"{k}={summary[k]:.4g}" for k in shown if k in summary)))
  if exp.config.export_hf:
    try:
      exp.export_hf(result.state)
    except Exception as e:  # noqa: BLE001 - only a write failure is turned into one line
      failed = write_faults.failed_write(
          e, path=exp.workdir / "hf", rerun="the same command to export",
          safe=f"training is done, checkpoint {result.step} is intact and no half-written "
               "export is left")
      if failed is None:
        raise
      raise failed from e
  return 0


def _inspect(config, args) -> int:
  """--print-config and --dry-run: report, write nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  from im_jax.run import dry_run, settings  # pylint: disable=g-import-not-at-top
  from im_jax.data.conversation import DataError  # pylint: disable=g-import-not-at-top
  from im_jax.train import loop  # pylint: disable=g-import-not-at-top

  try:
    run = settings.validate(config, jax.device_count(), jax.process_count())  # the typed config
    if args.print_config:
      print(run.to_json(indent=2))
    if args.dry_run:
      print(dry_run.format_plan(dry_run.data_plan(run, args.workdir)))
  except loop.ResumeMismatch as e:  # its `key: saved -> now` lines are the message
    return cli.report_lines(e)
  except (settings.ConfigError, DataError, ValueError, OSError) as e:
    return cli.report(e)
  return 0


def run_from_command_line() -> None:
  """`python -m im_jax.train`: main() in a process with the tuned allocator (malloc_tuning)."""
  malloc_tuning.reexec_with_tuned_malloc()
  sys.exit(main())
