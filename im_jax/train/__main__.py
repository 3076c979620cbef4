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

import logging
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

# distributed defines --coordinator_address --num_processes --process_id
from im_jax import cli, distributed, malloc_tuning, write_faults

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: config, metrics, checkpoints")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "print the data plan and exit: no compiling, "
                             "nothing written (the memory plan is python -m im_jax.plan)")
_PRINT_CONFIG = flags.DEFINE_bool("print-config", False,
                                  "print the resolved config as JSON and exit")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  del argv
  # Orbax and grain log every file operation at INFO through absl: keep theirs to warnings.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("im_jax").setLevel(logging.INFO)
  try:
    distributed.initialize()  # before any other JAX use; single process when nothing is set
  except ValueError as e:  # incomplete or malformed IM_JAX_* / --coordinator settings
    cli.fail(str(e))
  try:
    config = _CONFIG.value
    config.keys()  # the file's load error, if any, is raised on first use
  except OSError as e:
    cli.fail(" ".join(str(e).split()))
  if _PRINT_CONFIG.value or _DRY_RUN.value:
    return _inspect(config)
  # A full disk: library tracebacks (Orbax's threads log theirs) go to WORKDIR/errors.log,
  # the console gets one line (write_faults).
  with write_faults.TracebackLog(pathlib.Path(_WORKDIR.value) / "errors.log") as tracebacks:
    try:
      code = _train(config)
    except write_faults.WriteFailed as e:
      print(f"error: {e}{tracebacks.note(e)}", file=sys.stderr)
      return 1
  if tracebacks.path is not None:  # a library logged a traceback, yet the run went on
    print(f"warning: library tracebacks were written to {tracebacks.path}", file=sys.stderr)
  return code


def _train(config) -> int:
  """Build, run and export; a write failure raises WriteFailed (one line, exit 1)."""
  from im_jax.data.conversation import DataError  # pylint: disable=g-import-not-at-top
  from im_jax import checkpoint, experiment  # pylint: disable=g-import-not-at-top
  from im_jax.train import loop, workdir_lock  # pylint: disable=g-import-not-at-top

  try:
    exp = experiment.build(config, _WORKDIR.value)
    result = exp.run()
  except (experiment.ConfigError, DataError, loop.ResumeMismatch, workdir_lock.WorkdirBusy) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (ValueError, OSError) as e:  # anything else about the inputs (a tokenizer folder, ...)
    if failed := write_faults.failed_write(e, safe="no training step ran",
                                           rerun="the same command"):  # e.g. config.json
      raise failed from e
    print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
    return 2
  except (loop.TrainingStopped, checkpoint.UnreadableCheckpoints) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
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


def _inspect(config) -> int:
  """--print-config and --dry-run: report, write nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  from im_jax import dry_run, settings  # pylint: disable=g-import-not-at-top
  from im_jax.data.conversation import DataError  # pylint: disable=g-import-not-at-top
  from im_jax.train import loop  # pylint: disable=g-import-not-at-top

  try:
    if _PRINT_CONFIG.value:
      settings.validate(config, jax.device_count(), jax.process_count())
      print(config.to_json(indent=2))
    if _DRY_RUN.value:
      print(dry_run.format_plan(dry_run.data_plan(config, _WORKDIR.value)))
  except (settings.ConfigError, DataError, loop.ResumeMismatch) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (ValueError, OSError) as e:
    print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  malloc_tuning.reexec_with_tuned_malloc()
  app.run(main, flags_parser=cli.parse_flags)
