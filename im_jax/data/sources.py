"""Read instruction data into `Conversation`s: Tulu / Alpaca / ShareGPT records in JSONL,
JSON, Parquet, the data files of a Hugging Face dataset (`hf:ORG/NAME[:SPLIT]`, see
`im_jax.hub`) or a TFDS dataset.

Two independent choices describe a source:
- the *container*, always detected: `tfds:` prefix -> TFDS; `PAR1` magic or `.parquet` ->
  Parquet; `.jsonl`/`.ndjson` -> JSONL; otherwise a JSON array when the first non-blank
  character is `[`, else JSONL (so `.json` files holding JSON lines also work);
- the record *format* (`FORMATS`), detected from the first record whose keys say which it is
  (`messages` -> tulu, `conversations` -> sharegpt, `instruction` -> alpaca, `prompt` and
  `completion` -> prompt_completion, TRL's format), or forced.

Record numbers: the 1-based line number for JSONL, the 0-based index otherwise. A bad record
raises `DataError` naming the file, the record and the reason, or, with
`on_bad_record="skip"`, is recorded in `LoadedDataset.skipped` and logged. Errors in a file's
structure (a JSON array cut short, an unreadable Parquet file) always raise: no record
boundary is left to skip to. Blank JSONL lines are not records.
"""

import argparse
from collections.abc import Callable, Iterator
import dataclasses
import itertools
import json
import logging
import pathlib
from typing import Any

from im_jax import hub
from im_jax.data.conversation import ROLES, Conversation, DataError, Message

FORMATS = ("tulu", "alpaca", "sharegpt", "prompt_completion")
ON_BAD_RECORD = ("error", "skip")
TFDS_PREFIX = "tfds:"

# ShareGPT `from` values -> our roles. Exact (case-sensitive) names seen in public dumps;
# anything else is an error rather than a guess.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}

_JSONL_SUFFIXES = (".jsonl", ".ndjson")  # trusted: a bad first line stays a line error
_PARQUET_BATCH_ROWS = 1024
_log = logging.getLogger(__name__)


class _Bad(Exception):
  """A record-level problem; turned into a DataError where the source and record are known."""


@dataclasses.dataclass
class LoadedDataset:
  """Conversations of one source, random-access (feeds `grain.MapDataset.source`)."""

  conversations: list[Conversation]
  skipped: list[tuple[str, str]]  # (where, reason) of each record skipped as bad
  format: str  # one of FORMATS
  container: str  # jsonl | json | parquet | tfds
  source: str

  def __len__(self) -> int:
    return len(self.conversations)

  def __getitem__(self, index: int) -> Conversation:
    return self.conversations[index]


def load_conversations(path: str | pathlib.Path, format: str | None = None,
                       on_bad_record: str = "error",
                       tfds_data_dir: str | None = None) -> LoadedDataset:
  """Reads a whole source. `path` is a file, or `tfds:NAME[/CONFIG][:VERSION]:SPLIT`."""
  skipped: list[tuple[str, str]] = []
  info: dict[str, str] = {}
  conversations = list(iter_conversations(path, format, on_bad_record, tfds_data_dir,
                                          skipped=skipped, info=info))
  if skipped:
    _log.warning("%s: skipped %d bad record(s); first: %s: %s",
                 path, len(skipped), *skipped[0])
  return LoadedDataset(conversations, skipped, info["format"], info["container"], str(path))


def check_options(format: str | None, on_bad_record: str) -> None:
  """Raises ValueError for an unknown record format or bad-record policy."""
  if format is not None and format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  if on_bad_record not in ON_BAD_RECORD:
    raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")


def iter_conversations(path: str | pathlib.Path, format: str | None = None,
                       on_bad_record: str = "error", tfds_data_dir: str | None = None, *,
                       skipped: list[tuple[str, str]] | None = None,
                       info: dict[str, str] | None = None) -> Iterator[Conversation]:
  """Lazily yields conversations; appends skipped records to `skipped`.

  `info` (if given) receives the detected `format` and `container`. Raises DataError at the
  end when nothing was read (no records, or every record bad).
  """
  check_options(format, on_bad_record)
  skipped = [] if skipped is None else skipped
  info = {} if info is None else info
  source = str(path)
  if source.startswith(hub.PREFIX):  # a Hub dataset (or local folder): each of its data files
    try:
      files = hub.dataset_files(source)
    except hub.HubError as e:
      raise DataError(source, None, str(e)) from None
    for file in files:
      yield from iter_conversations(file, format, on_bad_record, skipped=skipped, info=info)
    return
  container, records = _open_records(source, tfds_data_dir)
  info["container"] = container

  # Line numbers read well bare (`file:12`); indices get a label (`file:record 12`).
  label = (lambda n: n) if container == "jsonl" else (lambda n: f"record {n}")
  parse = _PARSERS.get(format) if format else None
  if format:
    info["format"] = format
  pending: list[tuple[int, Any]] = []  # records seen before the format was known
  yielded = seen = 0

  def convert(record: int, item: Any) -> Conversation | None:
    try:
      if isinstance(item, _Bad):
        raise item
      return parse(item, source, record)
    except _Bad as bad:
      if on_bad_record == "error":
        raise DataError(source, label(record), str(bad)) from None
      skipped.append((f"{source}:{label(record)}", str(bad)))
      return None

  for record, item in records:
    seen += 1
    if parse is None:
      format = _detect_format(item)
      if format is None:
        pending.append((record, item))
        continue
      parse = _PARSERS[format]
      info["format"] = format
    pending.append((record, item))
    for conversation in filter(None, itertools.starmap(convert, pending)):
      yielded += 1
      yield conversation
    pending.clear()

  if seen == 0:
    raise DataError(source, None, "empty dataset: no records")
  if parse is None:  # no record said which format: each one is bad
    parse = _undetectable
    for _ in itertools.starmap(convert, pending):
      pass
  if yielded == 0:
    where, reason = skipped[0]
    raise DataError(source, None,
                    f"empty dataset: all {len(skipped)} records are bad (first: {where}: {reason})")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
  """Command-line arguments naming a source, shared by the `python -m im_jax.data` commands."""
  parser.add_argument("--data", required=True,
                      help="a .jsonl/.json/.parquet file, hf:ORG/NAME[:SPLIT] (a Hugging Face "
                      "dataset) or tfds:NAME[/CONFIG][:VERSION]:SPLIT")
  parser.add_argument("--format", choices=FORMATS, default=None,
                      help="record format (default: detected from the first record)")
  parser.add_argument("--on-bad-record", choices=ON_BAD_RECORD, default="error",
                      help="stop at the first bad record, or skip bad records and report them")
  parser.add_argument("--tfds-data-dir", default=None, help="data_dir of a tfds: source")


def load_from_args(args: argparse.Namespace) -> LoadedDataset:
  return load_conversations(args.data, format=args.format, on_bad_record=args.on_bad_record,
                            tfds_data_dir=args.tfds_data_dir)


# ---------------------------------------------------------------- containers


def _open_records(source: str, tfds_data_dir: str | None) -> tuple[str, Iterator]:
  """Returns (container, iterator of (record number, parsed object or _Bad))."""
  if source.startswith(TFDS_PREFIX):
    return "tfds", _tfds_records(source, tfds_data_dir)
  path = pathlib.Path(source)
  if not path.is_file():
    raise DataError(source, None, "no such file" if not path.exists() else "not a regular file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"PAR1" or path.suffix == ".parquet":
    return "parquet", _parquet_records(source)
  data = path.read_bytes()
  data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not content
  if path.suffix not in _JSONL_SUFFIXES and data.lstrip()[:1] == b"[":
    return "json", _json_array_records(source, data)
  return "jsonl", _jsonl_records(data)


def _jsonl_records(data: bytes) -> Iterator[tuple[int, Any]]:
  lines = data.split(b"\n")
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      text = line.decode("utf-8")
    except UnicodeDecodeError as e:
      yield number, _Bad(f"invalid UTF-8 at byte {e.start} of the line")
      continue
    try:
      yield number, json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
      cut = " (the file looks truncated)" if number == len(lines) else ""  # no final newline
      yield number, _Bad(f"invalid JSON{cut}: {_json_error(e)}")


def _json_array_records(source: str, data: bytes) -> Iterator[tuple[int, Any]]:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(source, f"line {line}", "invalid UTF-8") from None
  try:
    items = json.loads(text)
  except json.JSONDecodeError as e:
    # An unterminated string ran into the end of the text: the json module says so no other way.
    cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
    cut = " (the file looks truncated)" if cut else ""
    raise DataError(source, f"line {e.lineno} column {e.colno}",
                    f"invalid JSON{cut}: {e.msg}") from None
  except (ValueError, RecursionError) as e:
    raise DataError(source, None, f"invalid JSON: {_json_error(e)}") from None
  if not isinstance(items, list):  # the sniffer saw `[`, so this cannot happen; stay safe
    raise DataError(source, None, f"expected a JSON array, got {_type_name(items)}")
  yield from enumerate(items)


def _parquet_records(source: str) -> Iterator[tuple[int, Any]]:
  import pyarrow  # pylint: disable=g-import-not-at-top  (only Parquet users pay the import)
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  try:
    parquet = pq.ParquetFile(source)
  except (pyarrow.ArrowException, OSError) as e:
    raise DataError(source, None, f"not a readable Parquet file: {e}") from None
  index = 0
  try:
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
      for row in batch.to_pylist():  # one batch at a time: the file is never held twice
        yield index, row
        index += 1
  except (pyarrow.ArrowException, OSError) as e:
    raise DataError(source, f"record {index}", f"unreadable Parquet data: {e}") from None


def parse_tfds_spec(spec: str) -> tuple[str, str]:
  """`tfds:NAME[/CONFIG][:VERSION][:SPLIT]` -> (tfds name, split); the split defaults to train."""
  rest = spec.removeprefix(TFDS_PREFIX)
  depth, cut = 0, -1  # the last `:` outside brackets: slices like `train[:10%]` have their own
  for i, char in enumerate(rest):
    depth += (char == "[") - (char == "]")
    if char == ":" and depth == 0:
      cut = i
  name, split = (rest, "") if cut < 0 else (rest[:cut], rest[cut + 1:])
  if split[:1].isdigit():  # `name:1.0.0` is a version, not a split
    name, split = rest, ""
  return name, split or "train"


def _tfds_records(source: str, data_dir: str | None) -> Iterator[tuple[int, Any]]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow, optional)

  name, split = parse_tfds_spec(source)
  try:
    records = tfds.data_source(name, data_dir=data_dir, split=split)
    size = len(records)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises many unrelated types)
    raise DataError(source, None, f"cannot open the TFDS dataset: {e}") from None
  for index in range(size):
    try:
      yield index, _from_tfds(records[index])
    except _Bad as bad:
      yield index, bad


def _from_tfds(value: Any, top: bool = True) -> Any:
  """TFDS example -> JSON-like values: bytes -> str, arrays -> lists, and a Sequence of
  dicts (stored by TFDS as a dict of equal-length lists) -> a list of dicts."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _Bad(f"invalid UTF-8 at byte {e.start} of a text feature") from None
  if hasattr(value, "tolist"):  # numpy arrays and scalars
    return _from_tfds(value.tolist(), top=False)
  if isinstance(value, list):
    return [_from_tfds(v, top=False) for v in value]
  if isinstance(value, dict):
    out = {k: _from_tfds(v, top=False) for k, v in value.items()}
    columns = list(out.values())
    if (not top and columns and all(isinstance(c, list) for c in columns)
        and len({len(c) for c in columns}) == 1):
      return [dict(zip(out, row)) for row in zip(*columns)]
    return out
  return value


# ------------------------------------------------------------------ records


def _detect_format(item: Any) -> str | None:
  if not isinstance(item, dict):
    return None
  if "messages" in item:
    return "tulu"
  if "conversations" in item:
    return "sharegpt"
  if "instruction" in item:
    return "alpaca"
  if "prompt" in item and "completion" in item:
    return "prompt_completion"
  return None


def _undetectable(item: Any, source: str, record: int) -> Conversation:
  del item, source, record
  raise _Bad("cannot detect the record format (no record has a 'messages', 'conversations', "
             "'instruction' or 'prompt' and 'completion' key); force one with format=/--format")


def _parse_tulu(item: Any, source: str, record: int) -> Conversation:
  obj = _object(item, "the record")
  return _conversation(_messages(obj, "messages"), obj, source, record)


def _messages(obj: dict, key: str) -> list[Message]:
  """`obj[key]`: a list of {role, content} messages."""
  messages = []
  for j, m in enumerate(_list(obj, key)):
    m = _object(m, f"{key}[{j}]")
    role = _string(m, "role", f"{key}[{j}].")
    if role not in ROLES:
      raise _Bad(f"{key}[{j}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    messages.append(Message(role, _string(m, "content", f"{key}[{j}].")))
  return messages


def _parse_prompt_completion(item: Any, source: str, record: int) -> Conversation:
  """TRL's prompt/completion records: two strings (a user turn and the reply), or two lists of
  messages (the prompt's turns, then the completion's assistant turns)."""
  obj = _object(item, "the record")
  turns = []
  for key, role in (("prompt", "user"), ("completion", "assistant")):
    if key in obj and isinstance(obj[key], list):
      turns.append(_messages(obj, key))
    elif key in obj and not isinstance(obj[key], str):
      raise _Bad(f"field '{key}' must be a string or an array of messages, got "
                 f"{_type_name(obj[key])}")
    else:
      turns.append([Message(role, _string(obj, key))])
  prompt, completion = turns
  if not completion or any(m.role != "assistant" for m in completion):
    raise _Bad("field 'completion' must hold assistant messages only (the reply to the prompt)")
  return _conversation(prompt + completion, obj, source, record)


def _parse_sharegpt(item: Any, source: str, record: int) -> Conversation:
  obj = _object(item, "the record")
  messages = []
  if obj.get("system") is not None:  # some dumps keep the system prompt beside the turns
    messages.append(Message("system", _string(obj, "system")))
  for j, turn in enumerate(_list(obj, "conversations")):
    turn = _object(turn, f"conversations[{j}]")
    speaker = _string(turn, "from", f"conversations[{j}].")
    if speaker not in SHAREGPT_ROLES:
      raise _Bad(f"conversations[{j}]: unknown role {speaker!r} "
                 f"(expected one of {', '.join(SHAREGPT_ROLES)})")
    value = _string(turn, "value", f"conversations[{j}].")
    messages.append(Message(SHAREGPT_ROLES[speaker], value))
  return _conversation(messages, obj, source, record)


def _parse_alpaca(item: Any, source: str, record: int) -> Conversation:
  """The user turn is `instruction`, plus a blank line and `input` when `input` is not blank;
  parts are stripped (open-instruct's non-random Alpaca encoding, minus its prompt/completion
  separators, which the chat template supplies). `input` may be missing or null."""
  obj = _object(item, "the record")
  instruction = _string(obj, "instruction").strip()
  extra = obj.get("input")
  extra = "" if extra is None else _string(obj, "input").strip()
  prompt = f"{instruction}\n\n{extra}" if extra else instruction
  output = _string(obj, "output").strip()
  return _conversation([Message("user", prompt), Message("assistant", output)], obj, source,
                       record)


_PARSERS: dict[str, Callable[[Any, str, Any], Conversation]] = {
    "tulu": _parse_tulu, "alpaca": _parse_alpaca, "sharegpt": _parse_sharegpt,
    "prompt_completion": _parse_prompt_completion}


def _conversation(messages: list[Message], obj: dict, source: str, record: int) -> Conversation:
  if not messages:
    raise _Bad("the conversation has no messages")
  raw_id = obj.get("id")
  has_id = isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool)
  return Conversation(tuple(messages), source=source, record=record,
                      id=str(raw_id) if has_id else None)


# ------------------------------------------------------------ field checks


def _type_name(value: Any) -> str:
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "a boolean"
  if isinstance(value, (int, float)):
    return "a number"
  return {str: "a string", list: "an array", dict: "an object"}.get(type(value),
                                                                   type(value).__name__)


def _object(value: Any, what: str) -> dict:
  if not isinstance(value, dict):
    raise _Bad(f"{what} must be an object, got {_type_name(value)}")
  return value


def _list(obj: dict, key: str) -> list:
  if key not in obj:
    raise _Bad(f"missing field '{key}'")
  if not isinstance(obj[key], list):
    raise _Bad(f"field '{key}' must be an array, got {_type_name(obj[key])}")
  return obj[key]


def _string(obj: dict, key: str, prefix: str = "") -> str:
  name = f"'{prefix}{key}'"
  if key not in obj:
    raise _Bad(f"missing field {name}")
  value = obj[key]
  if not isinstance(value, str):
    raise _Bad(f"field {name} must be a string, got {_type_name(value)}")
  try:
    value.encode("utf-8")  # JSON escapes can smuggle in lone surrogates, which no tokenizer takes
  except UnicodeEncodeError:
    raise _Bad(f"field {name} is not valid Unicode (a lone surrogate)") from None
  return value


def _json_error(e: Exception) -> str:
  if isinstance(e, json.JSONDecodeError):
    return f"{e.msg} (column {e.colno})"
  if isinstance(e, RecursionError):
    return "nested too deeply"
  return str(e)
