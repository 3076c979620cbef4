"""The workdir lock of a `gs://` workdir: one object, `WORKDIR/.lock`, that works across hosts.

- Taking it creates the object only if it does not exist (generation precondition
  `if_generation_match=0`), so of two runs starting at once on any hosts, one wins. The object
  holds the holder's host, pid, start time and last heartbeat (JSON).
- A heartbeat thread rewrites it every `HEARTBEAT_S` seconds, only over the holder's own
  generation: a holder that lost the lock finds out (a warning) instead of overwriting
  another run's lock.
- At exit (normal end, an error, SIGTERM's clean stop) the object is deleted.
- A holder killed without exiting (SIGKILL, a lost VM) leaves the object behind. It is stale,
  and the next run takes it over (a rewrite over the stale generation, again atomic), when
  its heartbeat is older than `IM_JAX_LOCK_STALE_S` seconds (default 300), or at once when
  the holder was on this host and its pid is gone. A killed run on another host therefore
  resumes after at most that timeout.
"""

import atexit
import datetime
import json
import logging
import os
import socket
import threading
import time

from im_jax import paths

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_ENV = "IM_JAX_LOCK_STALE_S"
DEFAULT_STALE_S = 300.0


class _Held:
  def __init__(self, blob, record: dict):
    self.blob, self.record = blob, record
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")

  def _beat(self) -> None:
    errors = paths.api_errors()
    while not self.stop.wait(HEARTBEAT_S):
      self.record["heartbeat"] = time.time()
      try:
        self.blob.upload_from_string(json.dumps(self.record),
                                     if_generation_match=self.blob.generation)
      except errors.PreconditionFailed:
        log.warning("%s was taken over by another run: this run no longer holds the workdir",
                    self.blob.name)
        return
      except errors.GoogleAPIError as e:  # a transient error: the next beat tries again
        log.warning("workdir lock heartbeat failed: %s", e)


_held: dict[str, _Held] = {}


def _stale_after() -> float:
  return float(os.environ.get(STALE_ENV) or DEFAULT_STALE_S)


def _describe(record: dict) -> str:
  started = datetime.datetime.fromtimestamp(record.get("started", 0)).astimezone()
  return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
          f"started {started.isoformat(timespec='seconds')}")


def _is_stale(record: dict, updated: datetime.datetime | None) -> bool:
  if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
    try:
      os.kill(record["pid"], 0)
    except ProcessLookupError:
      return True
    except PermissionError:  # alive, someone else's
      pass
  beat = record.get("heartbeat")
  if beat is None and updated is not None:
    beat = updated.timestamp()
  return beat is None or time.time() - beat > _stale_after()


def acquire(workdir: str, name: str, busy: type[Exception]) -> None:
  """Takes `workdir/name` or raises `busy` (one line naming the holder)."""
  if workdir in _held:
    return
  bucket_name, prefix = paths.split(workdir)
  errors = paths.api_errors()
  blob = paths.client().bucket(bucket_name).blob(f"{prefix}/{name}".lstrip("/"))
  now = time.time()
  record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now}
  try:
    blob.upload_from_string(json.dumps(record), if_generation_match=0)
  except errors.PreconditionFailed:
    current = blob.bucket.get_blob(blob.name)
    holder = {}
    if current is not None:
      try:
        holder = json.loads(current.download_as_text())
      except (ValueError, errors.NotFound):
        holder = {}
    if current is not None and not _is_stale(holder, current.updated):
      raise busy(f"{workdir} is in use by another run ({_describe(holder)}); wait for it to end "
                 "or use another workdir") from None
    try:  # stale: take it over, atomically against another run doing the same
      blob.upload_from_string(json.dumps(record), if_generation_match=(
          current.generation if current is not None else 0))
    except errors.PreconditionFailed:
      raise busy(f"{workdir} is in use by another run (it took the lock just now); wait for "
                 "it to end or use another workdir") from None
    if current is not None:
      log.warning("%s: took over the lock of a run that is gone (%s)", workdir, _describe(holder))
  held = _held[workdir] = _Held(blob, record)
  held.thread.start()
  atexit.register(release, workdir, name)


def release(workdir: str, name: str) -> None:
  """Deletes the lock object if this process still holds it."""
  del name
  held = _held.pop(workdir, None)
  if held is None:
    return
  held.stop.set()
  held.thread.join(timeout=5)
  errors = paths.api_errors()
  try:
    held.blob.delete(if_generation_match=held.blob.generation)
  except (errors.PreconditionFailed, errors.NotFound):
    pass
  except errors.GoogleAPIError as e:
    log.warning("could not remove the workdir lock %s: %s", held.blob.name, e)
