"""Random access to a data source's records, without holding its conversations in memory.

`open_records(spec, ...)` gives a `Records`: `len()`, `read(i)` -> `Conversation` or
`BadRecord` (a record the parser refused, with where and why), and `files` (what the plan
cache hashes). Record indices are 0-based positions among the source's records; error
messages keep `sources`' numbering (the 1-based line of a JSONL file, else the index).

- JSONL: a byte-offset index (numpy: start, end and line number, 24 bytes per record) built
  in one streaming pass that also hashes the file; each record is read with `os.pread` when
  asked for. Memory is flat in the number of records but for those 24 bytes.
- every other container (a JSON array, Parquet, TFDS, `synthetic:N`): read whole by
  `sources.iter_conversations` (bad records under `on_bad_record="skip"` are left out there,
  as before), then served from the list: memory grows with the data (docs/benchmarks.md).
"""

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from im_jax import hub
from im_jax.data import sources
from im_jax.data.conversation import Conversation, DataError
# The record parsers and their error type are `sources`' own: one definition of each format.
from im_jax.data.sources import _PARSERS, _Bad, _detect_format, _json_error, _undetectable

_CHUNK = 1 << 24  # bytes read at a time while indexing
_WHITESPACE = b" \t\r\n\x0b\x0c"
_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass(frozen=True)
class BadRecord:
  where: str  # file:line or file:record N
  reason: str


class Records:
  """A list of conversations (what `sources` reads for non-JSONL containers)."""

  def __init__(self, conversations: Sequence[Conversation], files: Sequence[pathlib.Path] = (),
               skipped: Sequence[tuple[str, str]] = ()):
    self._conversations = conversations
    self.files = list(files)
    self.skipped = list(skipped)  # (where, reason) of records the reader left out

  def __len__(self) -> int:
    return len(self._conversations)

  def read(self, index: int) -> Conversation | BadRecord:
    return self._conversations[index]

  def digests(self) -> list[bytes]:
    """SHA-256 of each of `files` (what the plan cache is keyed on)."""
    return [file_digest(p) for p in self.files]


class Concatenated(Records):
  """Several sources' records end to end: record i of source s is `offsets[s] + i`."""

  def __init__(self, parts: Sequence[Records]):
    super().__init__((), [f for p in parts for f in p.files],
                     [skip for p in parts for skip in p.skipped])
    self.parts = list(parts)
    self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def digests(self) -> list[bytes]:
    return [d for p in self.parts for d in p.digests()]

  def read(self, index: int) -> Conversation | BadRecord:
    part = int(np.searchsorted(self.offsets, index, side="right")) - 1
    return self.parts[part].read(index - int(self.offsets[part]))


class JsonlRecords(Records):
  """One JSONL file through a byte-offset index; records parsed when read."""

  def __init__(self, path: pathlib.Path, format: str | None):
    super().__init__((), [path])
    self.path = path
    self.source = str(path)
    self.starts, self.ends, self.lines, self._digest = _index_lines(path)
    self._size = path.stat().st_size
    self._fd = os.open(path, os.O_RDONLY)
    if len(self.starts) == 0:
      raise DataError(self.source, None, "empty dataset: no records")
    self.format = format or self._detect()

  def __len__(self) -> int:
    return len(self.starts)

  def digests(self) -> list[bytes]:
    return [self._digest]  # computed while indexing: the file is read once

  def __del__(self, _close=os.close):  # bound now: at interpreter exit `os` may be gone
    if getattr(self, "_fd", None) is not None:
      _close(self._fd)

  def __getstate__(self):  # grain's worker processes reopen the file
    state = dict(self.__dict__)
    state["_fd"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._fd = os.open(self.path, os.O_RDONLY)

  def _item(self, index: int) -> Any:
    start, end = int(self.starts[index]), int(self.ends[index])
    line = os.pread(self._fd, end - start, start)
    try:
      text = line.decode("utf-8")
    except UnicodeDecodeError as e:
      return _Bad(f"invalid UTF-8 at byte {e.start} of the line")
    try:
      return json.loads(text)
    except (ValueError, RecursionError) as e:
      cut = " (the file looks truncated)" if end == self._size and not self._newline_end() else ""
      return _Bad(f"invalid JSON{cut}: {_json_error(e)}")

  def _newline_end(self) -> bool:
    return self._size > 0 and os.pread(self._fd, 1, self._size - 1) == b"\n"

  def _detect(self) -> str:
    """The format of the first record that says which (as `sources` detects it)."""
    for index in range(len(self)):
      item = self._item(index)
      if not isinstance(item, _Bad) and (found := _detect_format(item)) is not None:
        return found
    return "undetectable"

  def read(self, index: int) -> Conversation | BadRecord:
    line = int(self.lines[index])
    item = self._item(index)
    try:
      if isinstance(item, _Bad):
        raise item
      parse = _PARSERS.get(self.format, _undetectable)
      return parse(item, self.source, line)
    except _Bad as bad:
      return BadRecord(f"{self.source}:{line}", str(bad))


def file_digest(path: pathlib.Path) -> bytes:
  """SHA-256 of a file's bytes, streamed."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.digest()


def _index_lines(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, bytes]:
  """(start, end, 1-based line number) of every non-blank line, and the file's SHA-256, in
  one streaming pass (chunks, never the whole file: memory stays flat in its size)."""
  digest = hashlib.sha256()
  starts, firsts, ends = [], [], []
  size, at_line_start, head = 0, True, b""
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
      head = head or chunk[:4]
      data = np.frombuffer(chunk, np.uint8)
      newlines = np.flatnonzero(data == 10)
      if at_line_start:  # a line starts at this chunk's first byte
        starts.append(np.array([size]))
        firsts.append(data[:1])
      inner = newlines[newlines + 1 < len(data)] + 1
      starts.append(inner + size)
      firsts.append(data[inner])
      ends.append(newlines + size)
      at_line_start = len(newlines) > 0 and newlines[-1] == len(data) - 1
      size += len(data)
  if at_line_start:  # the (empty) line after a final newline, or an empty file
    starts.append(np.array([size]))
    firsts.append(np.frombuffer(b" ", np.uint8))
  ends.append(np.array([size]))
  starts, ends = np.concatenate(starts).astype(np.int64), np.concatenate(ends).astype(np.int64)
  first = np.concatenate(firsts)
  if head[:3] == _BOM:  # a UTF-8 byte-order mark is not content
    starts[0] = 3
    first[0] = head[3] if len(head) > 3 else 32
  numbers = np.arange(1, len(starts) + 1, dtype=np.int64)
  keep = ends > starts
  # A line is blank when all of it is whitespace; a line whose first byte is not whitespace
  # is not, so only the (rare) lines starting with whitespace are read one by one.
  space = np.isin(first, np.frombuffer(_WHITESPACE, np.uint8)) & keep
  with open(path, "rb") as f:
    for i in np.flatnonzero(space):
      f.seek(int(starts[i]))
      keep[i] = bool(f.read(int(ends[i] - starts[i])).strip())
  return starts[keep], ends[keep], numbers[keep], digest.digest()


def _is_jsonl(path: pathlib.Path) -> bool:
  """`sources`' container rule without reading the whole file: not Parquet, and a `.jsonl`
  suffix or a first non-blank character other than `[`."""
  with open(path, "rb") as f:
    head = f.read(4)
    if head == b"PAR1" or path.suffix == ".parquet":
      return False
    if path.suffix in sources._JSONL_SUFFIXES:  # pylint: disable=protected-access
      return True
    f.seek(0)
    first = b""
    while chunk := f.read(1 << 16):
      first = chunk.removeprefix(_BOM).lstrip() if not first else first
      if first:
        break
  return first[:1] != b"["


def open_records(spec: str, format: str | None = None, on_bad_record: str = "error",
                 tfds_data_dir: str | None = None) -> Records:
  """Random access to the records of `spec` (a file, `hf:`, `tfds:`); see the module doc."""
  sources.check_options(format, on_bad_record)
  files = [pathlib.Path(spec)]
  if spec.startswith(hub.PREFIX):
    try:
      files = hub.dataset_files(spec)
    except hub.HubError as e:
      raise DataError(spec, None, str(e)) from None
  local = not spec.startswith(sources.TFDS_PREFIX) and all(p.is_file() for p in files)
  if local and len(files) == 1 and _is_jsonl(files[0]):
    return JsonlRecords(files[0], format)
  skipped: list[tuple[str, str]] = []
  conversations = list(sources.iter_conversations(spec, format, on_bad_record, tfds_data_dir,
                                                  skipped=skipped))
  return Records(conversations, files if local else [], skipped)
