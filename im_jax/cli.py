"""What every command-line entry point shares: argparse, and one way to report an error.

Every `python -m im_jax.X` parses with `ArgumentParser` (argparse whose own errors, a missing
or unknown option, are one line too) and reports a failure with `report` / `fail`: one
`error: ...` line on stderr (whitespace folded: a multi-line library message cannot spill a
second line), then exit status `EXIT_BAD_INPUT` for anything wrong with what the user gave
(a config, a file, an option; nothing was written) or `EXIT_FAILED` for a run that could not
go on (a full disk, non-finite updates). The one message that is several lines by contract,
the resume check's `key: saved -> now` listing, goes out as it is (`report_lines`).
"""

import argparse
import logging
import sys
from typing import NoReturn

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def one_line(error: BaseException | str) -> str:
  """The message with its whitespace folded; an exception without text: its type's name."""
  text = " ".join(str(error).split())
  if not text and isinstance(error, BaseException):
    return type(error).__name__
  return text


def report(error: BaseException | str, status: int = EXIT_BAD_INPUT) -> int:
  """Prints `error: MESSAGE` as one line on stderr; returns `status` for the exit."""
  print(f"error: {one_line(error)}", file=sys.stderr)
  return status


def report_lines(error: BaseException | str, status: int = EXIT_BAD_INPUT) -> int:
  """`report` for a message whose lines are the contract (the resume check's listing)."""
  print(f"error: {str(error).strip() or type(error).__name__}", file=sys.stderr)
  return status


def fail(error: BaseException | str, status: int = EXIT_BAD_INPUT) -> NoReturn:
  """`report`, then exit."""
  sys.exit(report(error, status))


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a bad command line is one `error:` line (exit status 2) like any bad input,
  and options are never abbreviated (`--work` is not `--workdir`)."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message: str) -> NoReturn:
    fail(f"{self.prog}: {message} (--help lists the options)")


def log_to_stderr(im_jax_level: int = logging.INFO) -> None:
  """im_jax's log records from `im_jax_level` up, and every library's warnings, on stderr.

  Orbax and grain log every file operation at INFO through absl: theirs stay at warnings.
  (`force`: grain's import configures the root logger; one handler, one format.)
  """
  logging.basicConfig(format="%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] %(message)s",
                      datefmt="%m%d %H:%M:%S", level=logging.WARNING, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("im_jax").setLevel(im_jax_level)
