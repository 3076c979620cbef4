"""One run per workdir: process 0 holds an exclusive lock on WORKDIR/.lock for its lifetime.

The lock is `fcntl.flock`, so the kernel releases it when the process ends in any way (exit,
crash, SIGKILL): a killed run never blocks its own resume. A second run on the same workdir
is refused with one line naming the holder (host, pid, start time), which the holder writes
into the file. The other processes of a multi-host run share the workdir and do not lock.

File systems without shared locks (gcsfuse mounts, some NFS setups) cannot refuse a second
run on another host: FUSE keeps flock locks in the local kernel, and where locking fails
outright a warning says so and the run goes on unprotected.

A `gs://` workdir gets a lock that works across hosts (`bucket_lock`): an object created only
if absent, kept fresh by a heartbeat, removed at exit and stale after a timeout.
"""

import datetime
import errno
import fcntl
import logging
import os
import pathlib
import socket

from im_jax import paths
from im_jax.train import bucket_lock

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_held: dict[pathlib.Path, int] = {}  # lock file -> open descriptor, for this process's life


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir; the message is one line for the user."""


def acquire(workdir: str | pathlib.Path) -> None:
  """Locks `workdir` for the rest of this process's life (again: a no-op)."""
  if paths.is_remote(workdir):
    bucket_lock.acquire(str(workdir), LOCK_FILE, WorkdirBusy)
    return
  path = pathlib.Path(workdir).resolve() / LOCK_FILE
  if path in _held:
    return
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "an unknown process"
    os.close(fd)
    raise WorkdirBusy(f"{workdir} is in use by another run ({holder}); wait for it to end or "
                      "use another workdir") from None
  except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS, ...: a file system without locks
    os.close(fd)
    log.warning("%s: cannot lock %s (%s); nothing stops a second run on this workdir",
                workdir, LOCK_FILE, errno.errorcode.get(e.errno, e))
    return
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode(), 0)
  _held[path] = fd


def release(workdir: str | pathlib.Path) -> None:
  """Gives the lock up before the process ends (tests; a run keeps it until it exits)."""
  if paths.is_remote(workdir):
    bucket_lock.release(str(workdir), LOCK_FILE)
    return
  fd = _held.pop(pathlib.Path(workdir).resolve() / LOCK_FILE, None)
  if fd is not None:
    os.close(fd)
