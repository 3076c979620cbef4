"""Byte-offset indexes of text data files (JSONL lines, JSON array elements), cached.

An index is built in one streaming pass (numpy over 16 MiB chunks: memory flat in the file's
size) that also computes the file's SHA-256 (the data plan's cache key, `im_jax.data.plan`).
A start that finds its index cached does not read the file at all: the index is stored in
the run's plan folder under the file's identity (path, device, inode, size, modification and
status-change times in ns), as git's index trusts a file's stat data. A file rewritten in
place keeps its size, and may get its old modification time back (`touch -d`, `os.utime`),
but not its status-change time, which the kernel sets on every write and every `utime`; so a
changed file always misses the cache and is hashed again. A file changed within the clock
tick of its own indexing could look unchanged ("racy git"): an index is stored only when the
file's status-change time is `RACY_SECONDS` older than the start of its indexing.
"""

import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable

import numpy as np

CHUNK = 1 << 24  # bytes read at a time while indexing
_ARRAY_CHUNK = 1 << 22  # smaller: JSON arrays take several int32 arrays per byte
RACY_SECONDS = 2.0  # a file changed this recently is not cached (coarse file-system clocks)
VERSION = "im_jax.data_index.v1"
_WHITESPACE = np.frombuffer(b" \t\r\n\x0b\x0c", np.uint8)
_BOM = b"\xef\xbb\xbf"
Index = dict[str, np.ndarray]


def _identity(path: pathlib.Path, kind: str) -> tuple:
  s = os.stat(path)
  return (VERSION, kind, str(path.absolute()), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns,
          s.st_ctime_ns)


def cached(path: pathlib.Path, kind: str, build: Callable[[pathlib.Path], Index],
           cache_dir: pathlib.Path | None) -> tuple[Index, Callable[[], None] | None]:
  """(`build(path)`: arrays, `digest` among them, or its result cached for this identity;
  a function that stores a new result in `cache_dir`, or None when there is nothing to
  store). The caller stores it once the data has proved good: a refused start writes
  nothing."""
  before = _identity(path, kind)
  name = hashlib.sha256(repr(before).encode()).hexdigest()[:32]
  file = cache_dir / f"index-{name}.npz" if cache_dir is not None else None
  if file is not None and file.exists():
    try:
      with np.load(file, allow_pickle=False) as f:
        if json.loads(str(f["identity"])) == list(before):
          return {k: f[k] for k in f.files if k != "identity"}, None
    except (OSError, ValueError, KeyError):
      pass  # unreadable: indexed again (and rewritten)
  started = time.time_ns()
  index = build(path)
  settled = before[-1] < started - RACY_SECONDS * 1e9
  if file is None or not settled or _identity(path, kind) != before:
    return index, None
  return index, lambda: write_npz(file, identity=np.array(json.dumps(list(before))), **index)


def _chunks(path: pathlib.Path, digest, size: int | None = None, skip_bom: bool = False):
  """(offset, bytes as uint8) of each chunk of the file, hashing as it goes (a UTF-8
  byte-order mark hashed, not yielded, with `skip_bom`)."""
  at = 0
  with open(path, "rb") as f:
    if skip_bom and f.read(3) == _BOM:
      digest.update(_BOM)
      at = 3
    else:
      f.seek(0)
    while chunk := f.read(size or CHUNK):
      digest.update(chunk)
      yield at, np.frombuffer(chunk, np.uint8)
      at += len(chunk)


def jsonl_lines(path: pathlib.Path) -> Index:
  """`starts`, `ends`, 1-based `lines` of every non-blank line, and the file's `digest`."""
  digest = hashlib.sha256()
  starts, firsts, ends = [], [], []
  size, at_line_start, head = 0, True, b""
  for size, data in _chunks(path, digest):
    head = head or data[:4].tobytes()
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
  space = np.isin(first, _WHITESPACE) & keep
  with open(path, "rb") as f:
    for i in np.flatnonzero(space):
      f.seek(int(starts[i]))
      keep[i] = bool(f.read(int(ends[i] - starts[i])).strip())
  return {"starts": starts[keep], "ends": ends[keep], "lines": numbers[keep],
          "digest": np.frombuffer(digest.digest(), np.uint8)}


def file_sha256(path: pathlib.Path) -> Index:
  """The file's `digest` alone (a container indexed by its own metadata: Parquet)."""
  digest = hashlib.sha256()
  for _ in _chunks(path, digest):
    pass
  return {"digest": np.frombuffer(digest.digest(), np.uint8)}


class NotAnArray(ValueError):
  """The file is not a well-formed JSON array of values (its whole parse says why)."""


def json_array_elements(path: pathlib.Path) -> Index:
  """`starts`, `ends` of each element of a JSON array file, and the file's `digest`.

  Strings are found by their unescaped quotes (a quote preceded by an even run of
  backslashes), brackets and commas outside strings give the nesting depth, and the commas
  at depth 1 separate the elements. Each element is parsed once (`json.loads`, nothing
  kept), so a file that is not a valid array raises NotAnArray here, at its first indexing.
  """
  digest = hashlib.sha256()
  starts, ends = [], []
  in_string, carry, depth, state = False, 0, 0, "before"  # carry: backslashes ending a chunk
  for at, data in _chunks(path, digest, _ARRAY_CHUNK, skip_bom=True):
    n = len(data)
    backslash = data == 92
    idx = np.arange(n, dtype=np.int32)
    plain = np.maximum.accumulate(np.where(backslash, np.int32(-1 - carry), idx))
    run = np.where(backslash, idx - plain, 0)  # backslashes ending at each byte
    run_before = np.empty(n, np.int32)
    run_before[0], run_before[1:] = carry, run[:-1]
    quote = (data == 34) & (run_before % 2 == 0)
    parity = (np.cumsum(quote, dtype=np.int32) % 2 == 1) ^ in_string  # inside after byte i
    outside = ~parity & ~quote  # the opening quote leaves parity set, the closing one clears it
    step = np.zeros(n, np.int32)
    step[outside & ((data == 91) | (data == 123))] = 1
    step[outside & ((data == 93) | (data == 125))] = -1
    level = depth + np.cumsum(step, dtype=np.int32)  # the depth after each byte
    before = level - step
    opens = np.flatnonzero((before == 0) & (step == 1))
    commas = np.flatnonzero(outside & (data == 44) & (before == 1))
    closes = np.flatnonzero((level == 0) & (step == -1))
    top = (before == 0) & (step == 0) & ~np.isin(data, _WHITESPACE)
    top[closes] = False
    if (top.any() or len(opens) + (state != "before") > 1 or len(closes) > 1
        or (len(opens) and data[opens[0]] != 91) or (len(closes) and data[closes[0]] != 93)
        or (level < 0).any()):
      raise NotAnArray("not a single JSON array")
    if len(opens):
      starts.append(opens[:1].astype(np.int64) + 1 + at)
      state = "inside"
    starts.append(commas.astype(np.int64) + 1 + at)
    ends.append(commas.astype(np.int64) + at)
    if len(closes):
      ends.append(closes.astype(np.int64) + at)
      state = "after"
    in_string, depth, carry = bool(parity[-1]), int(level[-1]), int(run[-1])
  if state != "after" or in_string:
    raise NotAnArray("the array is not closed")
  starts, ends = np.concatenate(starts), np.concatenate(ends)
  out = {"starts": starts, "ends": ends, "digest": np.frombuffer(digest.digest(), np.uint8)}
  with open(path, "rb") as f:  # each element parsed once: the file is valid JSON
    for i, (start, end) in enumerate(zip(starts.tolist(), ends.tolist())):
      f.seek(start)
      text = f.read(end - start)
      if len(starts) == 1 and not text.strip():  # `[ ]`: no elements
        return {**out, "starts": starts[:0], "ends": ends[:0]}
      try:
        json.loads(text.decode("utf-8"))
      except (ValueError, RecursionError) as e:
        raise NotAnArray(f"element {i}: {e}") from None
  return out


def write_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
  """Writes atomically: a reader sees the old file, none, or the whole new one."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
