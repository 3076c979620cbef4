"""Where training metrics go: `metrics.jsonl`, TensorBoard event files, a progress bar and
the further sinks the top of the program passes in (Weights & Biases: `im_jax.run.wandb_log`).

Only JAX process 0 writes. On resume, records past the restored step (written by the
interrupted run after its last checkpoint) are dropped, so `metrics.jsonl` reads as one run.

In a `gs://` workdir (objects cannot be appended to) the files are written in a local
staging folder and uploaded at every record written (each logging interval, each eval) and
at the end: `metrics.jsonl` whole, each TensorBoard event file whole when it changed. A run
killed mid-interval loses at most the records of its last interval, which the resumed run
logs again anyway (it restarts from the last checkpoint).

Every write happens in the calling thread, one record whole or not at all: a full disk
raises an OSError naming the file in the training loop (which says what is safe), and
leaves no thread blocked and nothing to flush at exit.
"""

import json
import pathlib
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax

from im_jax import paths, write_faults

METRICS_FILE = "metrics.jsonl"


class MetricSink(Protocol):
  """A further destination of every record `MetricsLogger` writes."""

  def write(self, record: dict[str, Any]) -> None: ...

  def close(self) -> None: ...


class SinkFactory(Protocol):
  """Opens a `MetricSink` on process 0, in the (local staging copy of the) workdir; None: off.

  Built by the top of the program (`im_jax.run`), so training knows no logging service."""

  # workdir files the sink keeps across restarts (copied from a gs:// workdir first)
  state_files: tuple[str, ...]
  # the folder it writes itself (synced by its service, not uploaded with the workdir)
  own_folder: str

  def open(self, workdir: pathlib.Path,
           run_config: dict[str, Any] | None) -> MetricSink | None: ...


class MetricsFileError(ValueError):
  """An unreadable line of a `metrics.jsonl` other than a cut-off last one: `FILE:LINE: why`."""


def read_records(path: str | pathlib.Path) -> list[tuple[str, dict[str, Any]]]:
  """(line, record) of every record of a `metrics.jsonl` file: the one reader (resume, report).

  Only the LAST line may be cut short (a process killed mid-write) and is then left out; any
  other line that is not a JSON object with a "step" is a MetricsFileError naming the file and
  line, since it means the file was damaged, not interrupted.
  """
  lines = path.read_text(encoding="utf-8").splitlines()
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  out = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if i == last:
        break
      raise MetricsFileError(f"{path}:{i + 1}: not JSON ({e.msg})") from None
    if not isinstance(record, dict) or "step" not in record:
      raise MetricsFileError(f"{path}:{i + 1}: a metrics record must be an object with a 'step'")
    out.append((line, record))
  return out


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of `workdir/metrics.jsonl` (none when it is missing)."""
  path = paths.path(workdir) / METRICS_FILE
  return [record for _, record in read_records(path)] if path.exists() else []


def _truncate_after(path: pathlib.Path, step: int) -> None:
  if not path.exists():
    return
  text = path.read_text()
  kept = "".join(line + "\n" for line, record in read_records(path) if record["step"] <= step)
  if kept != text:  # replaced whole, so a failed write (a full disk) leaves the old file
    write_faults.replace_text(path, kept)


class MetricsLogger:
  """Appends one JSON object per record; mirrors scalars to TensorBoard and to the `sinks`
  given (W&B when configured); drives a bar."""

  def __init__(self, workdir: str | pathlib.Path, *, total_steps: int, start_step: int = 0,
               tensorboard: bool = True, progress: bool = True,
               sinks: Sequence[SinkFactory] = (), run_config: dict[str, Any] | None = None):
    self.enabled = jax.process_index() == 0
    self._file = self._tb = self._bar = self._staging = None
    self._sinks: list[MetricSink] = []
    if not self.enabled:
      return
    # A local workdir is written in place; the sinks' own files stay local (they sync them).
    self._staging = paths.Staging(workdir, skip=tuple(f"{s.own_folder}/" for s in sinks))
    for name in (METRICS_FILE, *(f for s in sinks for f in s.state_files)):
      self._staging.pull(name)
    workdir = self._staging.local
    workdir.mkdir(parents=True, exist_ok=True)
    for factory in sinks:  # first: when a service refuses, nothing is left open
      if (sink := factory.open(workdir, run_config)) is not None:
        self._sinks.append(sink)
    path = workdir / METRICS_FILE
    _truncate_after(path, start_step)
    self._file = path.open("ab", buffering=0)  # each record reaches the file whole or not at all
    if tensorboard:
      self._tb = EventFile(workdir / "tensorboard")
    if progress:
      import tqdm

      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, mininterval=1.0)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    _append_whole(self._file, (json.dumps(record) + "\n").encode())
    step = int(record["step"])
    if self._tb is not None:
      self._tb.write(step, {k: v for k, v in record.items()
                            if k != "step" and isinstance(v, (int, float))})
    for sink in self._sinks:
      sink.write(record)
    if self._staging.remote is not None:
      self._staging.push()
    if self._bar is not None:
      if "loss" in record:
        self._bar.n = step
        self._bar.set_postfix(_bar_fields(record), refresh=False)
        self._bar.refresh()
      else:
        self._bar.write(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()
    for sink in self._sinks:
      sink.close()
    if self._staging is not None:
      self._staging.close()


class EventFile:
  """A TensorBoard event file (TFRecord-framed `Event` protos), one event per record.

  Written synchronously rather than through tensorboardX's SummaryWriter, whose thread writes
  through a 10-event queue and flushes at exit: on a full disk that thread dies, the next
  records block on the full queue (the run hangs) and its exit flush prints a traceback."""

  def __init__(self, folder: pathlib.Path):
    from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top

    self._event, self._summary = event_pb2.Event, summary_pb2.Summary  # no TensorFlow needed
    folder.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self.path = folder / name
    self._file = self.path.open("ab", buffering=0)
    self._append(self._event(wall_time=time.time(), file_version="brain.Event:2"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._append(self._event(wall_time=time.time(), step=step,
                             summary=self._summary(value=values)))

  def _append(self, event: Any) -> None:
    _append_whole(self._file, tfrecord(event.SerializeToString()))

  def close(self) -> None:
    self._file.close()


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top

  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _append_whole(file: Any, data: bytes) -> None:
  """Appends `data` to an unbuffered file; a failed write (a full disk) is cut back off, so
  no half record is left behind. The OSError names the file."""
  start = file.tell()
  try:
    done = 0
    while done < len(data):
      done += file.write(data[done:])
  except OSError as e:
    try:
      file.truncate(start)
    except OSError:
      pass  # read_records() skips a cut last line on resume anyway
    e.filename = e.filename or file.name
    raise


def _fmt(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def _bar_fields(record: dict[str, Any]) -> dict[str, str]:
  keys = ("loss", "output_loss", "instruction_loss", "tokens_per_sec")
  return {k.replace("_loss", ""): _fmt(record[k]) for k in keys if k in record}
