"""Random access to a data source's records, without holding its conversations in memory.

`open_records(spec, ...)` gives a `Records`: `len()`, `read(i)` -> `Conversation` or
`BadRecord` (a record the parser refused, with where and why), and `files` (what the plan
cache hashes). Record indices are 0-based positions among the source's records; error
messages keep `sources`' numbering (the 1-based line of a JSONL file, else the index).
Memory is flat in the number of records but for an index's few integers per record:

- JSONL: a byte-offset index (start, end, line number: 24 bytes per record), JSON array:
  its elements' offsets (16 bytes), both built in one streaming pass that also hashes the
  file and cached in the run's plan folder (`im_jax.data.offsets`); a record is read with
  `os.pread` when asked for.
- Parquet: by row group (the row counts of its metadata), a few recent row groups decoded.
- TFDS (ArrayRecord): `tfds.data_source`, random access by index.
- `synthetic:N`, and a file the whole-file reader must explain (a JSON array that does not
  parse): read whole by `sources.iter_conversations`, served from the list.

docs/data.md says what a record costs in each format under a global shuffle.
"""

import collections
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from im_jax import hub
from im_jax.data import offsets
from im_jax.data import sources
from im_jax.data.conversation import Conversation, DataError
# The record parsers and their error type are `sources`' own: one definition of each format.
from im_jax.data.sources import (_PARSERS, _Bad, _detect_format, _from_tfds, _json_error,
                                 _undetectable)

_BOM = b"\xef\xbb\xbf"
log = logging.getLogger(__name__)


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

  _save: Callable[[], None] | None = None  # stores an index this start built (`saving`)

  def saving(self, save: Callable[[], None] | None) -> "Records":
    self._save = save
    return self

  def save_indexes(self) -> None:
    """Caches the indexes built by this start (`offsets.cached`); after the data proved good."""
    if self._save is not None:
      self._save()
      self._save = None


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

  def save_indexes(self) -> None:
    for part in self.parts:
      part.save_indexes()

  def read(self, index: int) -> Conversation | BadRecord:
    part = int(np.searchsorted(self.offsets, index, side="right")) - 1
    return self.parts[part].read(index - int(self.offsets[part]))


class _ItemRecords(Records):
  """Records parsed one at a time from the container's items (`_item`: a JSON-like value, or
  `_Bad`), numbered as `sources` numbers them (`_label`)."""

  def __init__(self, source: str, files: Sequence[pathlib.Path], count: int,
               format: str | None):
    super().__init__((), files)
    self.source = source
    self._count = count
    if count == 0:
      raise DataError(source, None, "empty dataset: no records")
    self.format = format or self._detect()

  def __len__(self) -> int:
    return self._count

  def _item(self, index: int) -> Any:
    raise NotImplementedError

  def _label(self, index: int) -> str:
    return f"record {index}"

  def _detect(self) -> str:
    """The format of the first record that says which (as `sources` detects it)."""
    for index in range(len(self)):
      item = self._item(index)
      if not isinstance(item, _Bad) and (found := _detect_format(item)) is not None:
        return found
    return "undetectable"

  def read(self, index: int) -> Conversation | BadRecord:
    item = self._item(index)
    try:
      if isinstance(item, _Bad):
        raise item
      return _PARSERS.get(self.format, _undetectable)(item, self.source, self._number(index))
    except _Bad as bad:
      return BadRecord(f"{self.source}:{self._label(index)}", str(bad))

  def _number(self, index: int) -> int:
    return index


class _TextRecords(_ItemRecords):
  """A text file through a byte-offset index (`im_jax.data.offsets`): each item is read
  with `os.pread` and parsed when asked for."""

  def __init__(self, path: pathlib.Path, format: str | None, index: offsets.Index):
    self.path = path
    self.starts, self.ends = index["starts"], index["ends"]
    self._digest = index["digest"].tobytes()
    self._size = path.stat().st_size
    self._fd = os.open(path, os.O_RDONLY)
    super().__init__(str(path), [path], len(self.starts), format)

  def digests(self) -> list[bytes]:
    return [self._digest]  # computed while indexing (or cached with the index)

  def __del__(self, _close=os.close):  # bound now: at interpreter exit `os` may be gone
    if getattr(self, "_fd", None) is not None:
      _close(self._fd)

  def __getstate__(self):  # grain's worker processes reopen the file
    state = dict(self.__dict__)
    state.update(_fd=None, _save=None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._fd = os.open(self.path, os.O_RDONLY)

  def _bytes(self, index: int) -> bytes:
    start, end = int(self.starts[index]), int(self.ends[index])
    return os.pread(self._fd, end - start, start)


class JsonlRecords(_TextRecords):
  """One JSONL file; errors name the 1-based line."""

  def __init__(self, path: pathlib.Path, format: str | None, index: offsets.Index):
    self.lines = index["lines"]
    super().__init__(path, format, index)

  def _number(self, index: int) -> int:
    return int(self.lines[index])

  _label = _number

  def _item(self, index: int) -> Any:
    line = self._bytes(index)
    try:
      text = line.decode("utf-8")
    except UnicodeDecodeError as e:
      return _Bad(f"invalid UTF-8 at byte {e.start} of the line")
    try:
      return json.loads(text)
    except (ValueError, RecursionError) as e:
      end = int(self.ends[index])
      cut = " (the file looks truncated)" if end == self._size and not self._newline_end() else ""
      return _Bad(f"invalid JSON{cut}: {_json_error(e)}")

  def _newline_end(self) -> bool:
    return self._size > 0 and os.pread(self._fd, 1, self._size - 1) == b"\n"


class JsonArrayRecords(_TextRecords):
  """One JSON array file through its elements' offsets (validated when indexed); errors
  name the 0-based record."""

  def _item(self, index: int) -> Any:
    return json.loads(self._bytes(index).decode("utf-8"))


class ParquetRecords(_ItemRecords):
  """A Parquet file by row group: a record's row group is decoded (Arrow, all columns) and
  kept in a small cache of recent row groups; the record alone becomes Python values.

  Reading in order (the plan) decodes each row group once; under a global shuffle a read
  decodes its row group unless cached: R rows per example for row groups of R rows."""

  CACHED_GROUPS = 4

  def __init__(self, path: pathlib.Path, format: str | None, digest: bytes):
    import pyarrow  # pylint: disable=g-import-not-at-top  (only Parquet users pay the import)
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    self.path, self._errors, self._digest = path, (pyarrow.ArrowException, OSError), digest
    try:
      self._file = pq.ParquetFile(path)
    except self._errors as e:
      raise DataError(str(path), None, f"not a readable Parquet file: {e}") from None
    meta = self._file.metadata
    rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    self.group_starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    self._groups: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    super().__init__(str(path), [path], int(self.group_starts[-1]), format)
    if max(rows, default=0) > 100_000:
      log.warning("%s: row groups of up to %d rows: a shuffled read decodes a whole row group "
                  "per example; rewrite it with smaller row groups or as JSONL for large runs",
                  path, max(rows))

  def digests(self) -> list[bytes]:
    return [self._digest]  # cached with the file's identity (`offsets.cached`)

  def __getstate__(self):  # grain's worker processes reopen the file
    state = dict(self.__dict__)
    state.update(_file=None, _groups=collections.OrderedDict(), _errors=None, _lock=None,
                 _save=None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    import pyarrow  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    self._file, self._errors = pq.ParquetFile(self.path), (pyarrow.ArrowException, OSError)
    self._lock = threading.Lock()

  def _item(self, index: int) -> Any:
    group = int(np.searchsorted(self.group_starts, index, side="right")) - 1
    with self._lock:  # grain's read threads share the file and the cache
      table = self._groups.get(group)
      if table is None:
        try:
          table = self._file.read_row_group(group)
        except self._errors as e:
          raise DataError(self.source, f"record {index}",
                          f"unreadable Parquet data: {e}") from None
        self._groups[group] = table
        while len(self._groups) > self.CACHED_GROUPS:
          self._groups.popitem(last=False)
      self._groups.move_to_end(group)
    return table.slice(index - int(self.group_starts[group]), 1).to_pylist()[0]


class TfdsRecords(_ItemRecords):
  """A TFDS dataset through `tfds.data_source` (ArrayRecord: random access by index)."""

  def __init__(self, spec: str, tfds_data_dir: str | None, format: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow, optional)

    name, split = sources.parse_tfds_spec(spec)
    try:
      self._source = tfds.data_source(name, data_dir=tfds_data_dir, split=split)
      count = len(self._source)
    except Exception as e:  # pylint: disable=broad-except  (tfds raises many unrelated types)
      raise DataError(spec, None, f"cannot open the TFDS dataset: {e}") from None
    super().__init__(spec, [], count, format)

  def _item(self, index: int) -> Any:
    try:
      return _from_tfds(self._source[index])
    except _Bad as bad:
      return bad


def file_digest(path: pathlib.Path) -> bytes:
  """SHA-256 of a file's bytes, streamed."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(offsets.CHUNK):
      digest.update(chunk)
  return digest.digest()


def _is_parquet(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"PAR1" or path.suffix == ".parquet"


def _is_jsonl(path: pathlib.Path) -> bool:
  """`sources`' container rule without reading the whole file (not Parquet): a `.jsonl`
  suffix or a first non-blank character other than `[`."""
  with open(path, "rb") as f:
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
                 tfds_data_dir: str | None = None,
                 index_cache: pathlib.Path | None = None) -> Records:
  """Random access to the records of `spec` (a file, `hf:`, `tfds:`); see the module doc.
  `index_cache`: where byte-offset indexes are cached (`im_jax.data.offsets`); a new one is
  written there by `save_indexes`."""
  sources.check_options(format, on_bad_record)
  if spec.startswith(sources.TFDS_PREFIX):
    return TfdsRecords(spec, tfds_data_dir, format)
  files = [pathlib.Path(spec)]
  if spec.startswith(hub.PREFIX):
    try:
      files = hub.dataset_files(spec)
    except hub.HubError as e:
      raise DataError(spec, None, str(e)) from None
  if not all(p.is_file() for p in files):  # the whole-file reader says what is wrong
    return _read_whole(spec, format, on_bad_record, tfds_data_dir, [])
  parts = [_open_file(p, format, on_bad_record, index_cache) for p in files]
  return parts[0] if len(parts) == 1 else Concatenated(parts)


def _open_file(path: pathlib.Path, format: str | None, on_bad_record: str,
               index_cache: pathlib.Path | None) -> Records:
  if _is_parquet(path):
    digest, save = offsets.cached(path, "parquet", offsets.file_sha256, index_cache)
    return ParquetRecords(path, format, digest["digest"].tobytes()).saving(save)
  if _is_jsonl(path):
    index, save = offsets.cached(path, "jsonl", offsets.jsonl_lines, index_cache)
    return JsonlRecords(path, format, index).saving(save)
  try:
    index, save = offsets.cached(path, "json", offsets.json_array_elements, index_cache)
  except offsets.NotAnArray:  # the whole-file parser names the line and column (and raises)
    return _read_whole(str(path), format, on_bad_record, None, [path])
  return JsonArrayRecords(path, format, index).saving(save)


def _read_whole(spec: str, format: str | None, on_bad_record: str,
                tfds_data_dir: str | None, files: list[pathlib.Path]) -> Records:
  skipped: list[tuple[str, str]] = []
  conversations = list(sources.iter_conversations(spec, format, on_bad_record, tfds_data_dir,
                                                  skipped=skipped))
  return Records(conversations, files, skipped)
