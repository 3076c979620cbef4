"""Write failures (a full disk, a read-only or over-quota file system) as one line.

A failed write reaches Python as an OSError, but from tensorstore (Orbax's writer) as a
ValueError such as `RESOURCE_EXHAUSTED: Error writing ... "PATH" ... [os_error_code='28']`,
and with asynchronous saves only at the next save, wait or close. `find(error)` recognises
either (anywhere in its cause chain) and gives the path and the reason in words; the command
that was writing turns it into one `WriteFailed` line (`failed_write`) that also says what is
safe and what to do.

Meanwhile the libraries print their own tracebacks: Orbax's background threads log theirs,
tensorstore's callbacks raise into a closed event loop. `TracebackLog` keeps every
traceback off the console while a command runs and writes it to a log file (the workdir's
`errors.log`, or a temporary file when that cannot be written), which the one line names.

Standalone (no im_jax imports): training, conversion, evaluation and the study all use it.
"""

import dataclasses
import errno
import logging
import os
import pathlib
import re
import sys
import tempfile
import threading
import traceback
from typing import Any

# What a full or closed file system answers a write with; reads never get these.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
_NEEDS_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# tensorstore: [os_error_code='28'] (newer) or [OS error 28] (older); Python: [Errno 28];
# Rust (safetensors): (os error 28).
_CODE = re.compile(r"os_error_code='(\d+)'|\[OS error (\d+)|\[Errno (\d+)\]|\(os error (\d+)\)")
_QUOTED_PATH = re.compile(r'"(/[^"]*)"')
# Orbax writes a step into `N.orbax-checkpoint-tmp/...` and renames it when complete.
_ORBAX_TMP = re.compile(r"\.orbax-checkpoint-tmp.*$")


@dataclasses.dataclass(frozen=True)
class Failure:
  path: str  # what could not be written ("" when the error does not say)
  code: int  # errno

  @property
  def reason(self) -> str:
    return os.strerror(self.code).lower()  # "no space left on device"

  @property
  def remedy(self) -> str:
    return "free space" if self.code in _NEEDS_SPACE else "make it writable"


class WriteFailed(RuntimeError):
  """A write failed for lack of space or permission; the message is one line for the user."""


def _chain(error: BaseException):
  seen, stack = set(), [error]
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    stack.extend([*getattr(e, "exceptions", ()), e.__context__, e.__cause__])


def find(error: BaseException) -> Failure | None:
  """The write failure behind `error` (its causes and contexts too), or None."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
      return Failure(_step_path(str(e.filename or "")), e.errno)
    match = _CODE.search(str(e))
    if match and int(next(g for g in match.groups() if g)) in WRITE_ERRNOS:
      path = _QUOTED_PATH.search(str(e))
      return Failure(_step_path(path.group(1) if path else ""),
                     int(next(g for g in match.groups() if g)))
  return None


def _step_path(path: str) -> str:
  """Orbax's temporary folder of a step (`.../checkpoints/8.orbax-checkpoint-tmp/state/...`)
  as the step's own name (`.../checkpoints/8`): what a person knows it by."""
  return _ORBAX_TMP.sub("", path.rstrip("/"))


def failed_write(error: BaseException, *, safe: str, rerun: str,
                 path: str | os.PathLike | None = None) -> WriteFailed | None:
  """`cannot write PATH: REASON; SAFE; REMEDY and rerun RERUN` for a write failure, else None.

  `path` names the output when the failing file is an internal one (a temporary folder).
  """
  failure = find(error)
  if failure is None:
    return None
  where = str(path or failure.path or "a file")
  return WriteFailed(f"cannot write {where}: {failure.reason}; {safe}; {failure.remedy} and "
                     f"rerun {rerun}")


def replace_text(path: str | os.PathLike, text: str) -> None:
  """Writes `path` whole or not at all: through `.NAME.partial` and a rename, the partial
  file removed when the write fails (a full disk), so no half-written file is left."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.partial")
  try:
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
  except OSError as e:
    if e.filename in (None, str(tmp)):  # name the file the user knows, not the .partial
      e.filename = str(path)
    raise
  finally:
    tmp.unlink(missing_ok=True)


class TracebackLog:
  """While active, tracebacks go to a log file instead of the console.

  Log records carrying one (Orbax's background threads log a failed save with its
  traceback) are written there and not shown; so are exceptions raised in threads, unraisable
  ones and those C callbacks print through `sys.excepthook`. `note(error)` adds a command's
  own final error and returns ` (traceback in PATH)` for its one line. The file is
  `preferred` when it can be written there (its folder exists), else a temporary file (a
  full disk may refuse the workdir even this).
  """

  def __init__(self, preferred: str | os.PathLike | None):
    self.preferred = pathlib.Path(preferred) if preferred else None
    self.path: pathlib.Path | None = None
    self._filter = _DivertTracebacks(self)
    self._handlers: list[logging.Handler] = []
    self._hooks: tuple[Any, ...] = ()

  def __enter__(self) -> "TracebackLog":
    self._handlers = [h for h in _all_handlers() if self._filter not in h.filters]
    for handler in self._handlers:
      handler.addFilter(self._filter)
    self._hooks = (sys.excepthook, sys.unraisablehook, threading.excepthook)
    sys.excepthook = lambda kind, value, tb: self.write(
        "".join(traceback.format_exception(kind, value, tb)))
    sys.unraisablehook = lambda u: self.write(
        f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n"
        + "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
    threading.excepthook = lambda a: self.write(
        f"in thread {a.thread.name if a.thread else '?'}:\n"
        + "".join(traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback)))
    return self

  def __exit__(self, *exc) -> None:
    for handler in self._handlers:
      handler.removeFilter(self._filter)
    sys.excepthook, sys.unraisablehook, threading.excepthook = self._hooks

  def write(self, text: str) -> None:
    """Appends `text` to the log (the preferred file, else a temporary one); never raises."""
    for _ in range(2):
      if self.path is None:
        self.path = self._open()
        if self.path is None:
          return
      try:
        with self.path.open("a", encoding="utf-8") as f:
          f.write(text if text.endswith("\n") else text + "\n")
        return
      except OSError:  # full or read-only: fall back to a temporary file once
        if self.preferred is None or self.path != self.preferred:
          return
        self.preferred, self.path = None, None

  def _open(self) -> pathlib.Path | None:
    if self.preferred is not None:  # never creates its folder: a refused run writes nothing
      try:
        with self.preferred.open("a", encoding="utf-8"):
          return self.preferred
      except OSError:
        self.preferred = None
    try:
      fd, name = tempfile.mkstemp(prefix="im_jax-errors-", suffix=".log")
      os.close(fd)
      return pathlib.Path(name)
    except OSError:
      return None

  def note(self, error: BaseException) -> str:
    """Logs `error` with its traceback; ` (traceback in PATH)`, or "" when nothing could be
    written anywhere."""
    self.write("".join(traceback.format_exception(error)))
    return f" (traceback in {self.path})" if self.path is not None else ""


class _DivertTracebacks(logging.Filter):
  """A console handler's filter: records with a traceback go to the log instead."""

  def __init__(self, log: TracebackLog):
    super().__init__()
    self._log = log
    self._last = None  # one record may reach several handlers: log it once

  def filter(self, record: logging.LogRecord) -> bool:
    if not (record.exc_info or record.exc_text):
      return True
    if record is not self._last:
      self._last = record
      formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
      self._log.write(formatter.format(record))
    return False


def _all_handlers() -> list[logging.Handler]:
  """Every handler a record may reach: each logger's, and logging's last resort."""
  loggers = [logging.getLogger(), *(l for l in logging.Logger.manager.loggerDict.values()
                                    if isinstance(l, logging.Logger))]
  handlers = {id(h): h for lg in loggers for h in lg.handlers}
  if logging.lastResort is not None:
    handlers[id(logging.lastResort)] = logging.lastResort
  return list(handlers.values())
