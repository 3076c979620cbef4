"""Bad input: every problem is a DataError naming the file, the line/record and the reason."""

import json
import pathlib
import re

from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from im_jax.data import sources
from im_jax.data.conversation import DataError

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
GOOD_LINE = json.dumps(GOOD).encode()


def _file(tmp_path: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
  path = tmp_path / name
  path.write_bytes(data)
  return path


def _lines(*lines: bytes) -> bytes:
  return b"\n".join(lines) + b"\n"


def _tulu(**message) -> bytes:
  return json.dumps({"messages": [message]}).encode()


# (file name, content, the "file:where: reason" the error must contain)
CASES = {
    "malformed json": ("a.jsonl", _lines(GOOD_LINE, b'{"messages": [}'), ":2: invalid JSON"),
    "not an object": ("a.jsonl", _lines(GOOD_LINE, b"[1, 2]"), ":2: the record must be an object"),
    "missing messages": ("a.jsonl", _lines(GOOD_LINE, b'{"id": "x"}'),
                         ":2: missing field 'messages'"),
    "messages not a list": ("a.jsonl", _lines(b'{"messages": "hi"}'),
                            ":1: field 'messages' must be an array, got a string"),
    "no messages": ("a.jsonl", _lines(b'{"messages": []}'), ":1: the conversation has no messages"),
    "message not an object": ("a.jsonl", _lines(b'{"messages": ["hi"]}'),
                              ":1: messages[0] must be an object, got a string"),
    "missing content": ("a.jsonl", _lines(_tulu(role="user")),
                        ":1: missing field 'messages[0].content'"),
    "missing role": ("a.jsonl", _lines(_tulu(content="x")), ":1: missing field 'messages[0].role'"),
    "null content": ("a.jsonl", _lines(GOOD_LINE, GOOD_LINE, _tulu(role="user", content=None)),
                     ":3: field 'messages[0].content' must be a string, got null"),
    "number content": ("a.jsonl", _lines(_tulu(role="user", content=3)),
                       ":1: field 'messages[0].content' must be a string, got a number"),
    "unknown role": ("a.jsonl", _lines(_tulu(role="bot", content="x")),
                     ":1: messages[0]: unknown role 'bot'"),
    "lone surrogate": ("a.jsonl", _lines(b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
                       ":1: field 'messages[0].content' is not valid Unicode"),
    "invalid utf-8": ("a.jsonl", _lines(GOOD_LINE, GOOD_LINE, b'{"messages": "\xff\xfe"}'),
                      ":3: invalid UTF-8 at byte 14"),
    "truncated last line": ("a.jsonl", _lines(GOOD_LINE) + GOOD_LINE[:30],
                            ":2: invalid JSON (the file looks truncated)"),
    "sharegpt unknown role": (
        "s.json", json.dumps([{"conversations": [{"from": "robot", "value": "x"}]}]).encode(),
        ":record 0: conversations[0]: unknown role 'robot'"),
    "sharegpt missing value": (
        "s.jsonl", _lines(json.dumps({"conversations": [{"from": "gpt"}]}).encode()),
        ":1: missing field 'conversations[0].value'"),
    "alpaca missing output": (
        "p.json", json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]).encode(),
        ":record 1: missing field 'output'"),
    "alpaca input not a string": (
        "p.jsonl", _lines(json.dumps({"instruction": "a", "input": [], "output": "b"}).encode()),
        ":1: field 'input' must be a string, got an array"),
    "json array cut short": ("t.json", b'[\n' + GOOD_LINE + b',\n' + GOOD_LINE[:25],
                             ":line 3 column 24: invalid JSON (the file looks truncated): "
                             "Unterminated string"),
    "json array bad utf-8": ("t.json", b'[\n' + GOOD_LINE + b',\n"\xc3"]',
                             ":line 3: invalid UTF-8"),
    "empty file": ("e.jsonl", b"", ": empty dataset: no records"),
    "blank lines only": ("e.jsonl", b"\n  \n\t\n", ": empty dataset: no records"),
    "empty json array": ("e.json", b" [ ] ", ": empty dataset: no records"),
    "undetectable": ("u.jsonl", _lines(b'{"text": "x"}'), ":1: cannot detect the record format"),
    "missing file": ("does-not-exist.jsonl", None, ": no such file"),
    "truncated parquet": ("t.parquet", b"PAR1\x00\x00", ": not a readable Parquet file"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_names_file_record_and_reason(tmp_path, case):
  name, data, expected = CASES[case]
  path = tmp_path / name if data is None else _file(tmp_path, name, data)
  with pytest.raises(DataError) as info:
    sources.load_conversations(path)
  assert f"{path}{expected}" in str(info.value)
  assert info.value.source == str(path)


def test_empty_content_is_legal(tmp_path):
  path = _file(tmp_path, "e.jsonl", _lines(_tulu(role="assistant", content="")))
  assert sources.load_conversations(path)[0].messages[0].content == ""


def test_skip_counts_and_reports_every_bad_record(tmp_path):
  path = _file(tmp_path, "m.jsonl", _lines(
      b"{oops", GOOD_LINE, _tulu(role="bot", content="x"), b"", GOOD_LINE, b"\xff"))
  loaded = sources.load_conversations(path, on_bad_record="skip")
  assert [c.record for c in loaded] == [2, 5]
  assert [(where, reason.split(":")[0]) for where, reason in loaded.skipped] == [
      (f"{path}:1", "invalid JSON"), (f"{path}:3", "messages[0]"),
      (f"{path}:6", "invalid UTF-8 at byte 0 of the line")]


def test_skip_with_every_record_bad_is_an_empty_dataset(tmp_path):
  path = _file(tmp_path, "all-bad.jsonl", _lines(b"{", _tulu(role="x", content="y")))
  with pytest.raises(DataError, match=re.escape(
      f"{path}: empty dataset: all 2 records are bad (first: {path}:1: invalid JSON")):
    sources.load_conversations(path, on_bad_record="skip")


def test_structural_errors_raise_even_when_skipping(tmp_path):
  path = _file(tmp_path, "cut.json", b"[" + GOOD_LINE)
  with pytest.raises(DataError, match="truncated"):
    sources.load_conversations(path, on_bad_record="skip")


# ------------------------------------------------------------ property tests

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=10)
# Records shaped like each format with any value in any place, so validation goes deep.
ROLE = st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot", ""]) | JSON
MESSAGE = st.fixed_dictionaries({}, optional={"role": ROLE, "content": st.text() | JSON})
TURN = st.fixed_dictionaries({}, optional={"from": ROLE, "value": st.text() | JSON})
RECORD = (
    JSON
    | st.fixed_dictionaries({"messages": st.lists(MESSAGE | JSON, max_size=3) | JSON})
    | st.fixed_dictionaries({"conversations": st.lists(TURN | JSON, max_size=3) | JSON},
                            optional={"system": st.text() | JSON})
    | st.fixed_dictionaries({"instruction": st.text() | JSON},
                            optional={"input": st.text() | JSON, "output": st.text() | JSON}))


def _check_error(error: DataError, path: pathlib.Path, lines: int, records: int = 0) -> None:
  """The message names the file and a line in it (JSONL: `file:7:`, a JSON array's syntax:
  `file:line 7 column 3:`), a record of a JSON array (`file:record 2:`, when `records`), or
  the whole file for an empty dataset."""
  message = str(error)
  assert message.startswith(f"{path}:")
  where = message[len(str(path)) + 1:]
  if line := re.match(r"(?:line )?(\d+)[: ]", where):
    assert 1 <= int(line.group(1)) <= lines, message
  elif record := re.match(r"record (\d+): ", where):
    assert 0 <= int(record.group(1)) < records, message
  else:
    assert where.startswith(" empty dataset"), message


@PROPERTY
@given(record=RECORD, position=st.integers(0, 2), mode=st.sampled_from(["error", "skip"]))
def test_any_json_record_loads_or_raises_data_error(tmp_path, record, position, mode):
  lines = [GOOD_LINE, GOOD_LINE]
  lines.insert(position, json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass"))
  path = _file(tmp_path, "prop.jsonl", _lines(*lines))
  try:
    loaded = sources.load_conversations(path, on_bad_record=mode)
  except DataError as e:
    _check_error(e, path, 3)
    assert mode == "error" or "empty dataset" in str(e) or "cannot detect" in str(e)
  else:
    assert len(loaded) + len(loaded.skipped) == 3  # never silently lost
    # Usually only the random record is skipped; when it comes first and looks like another
    # format, that format wins and the good Tulu lines are the ones skipped.
    assert len({where for where, _ in loaded.skipped}) == len(loaded.skipped)
    assert all(where in {f"{path}:{n}" for n in (1, 2, 3)} for where, _ in loaded.skipped)


@PROPERTY
@given(records=st.lists(RECORD, min_size=1, max_size=3),
       forced=st.sampled_from([None, *sources.FORMATS]), array=st.booleans())
def test_any_records_in_any_container_and_format(tmp_path, records, forced, array):
  if array:
    data = json.dumps(records, indent=1).encode("utf-8", "surrogatepass")
  else:
    data = _lines(*(json.dumps(r).encode() for r in records))
  # A .json file whose first line is an array is a JSON array; .jsonl is always JSON lines.
  path = _file(tmp_path, "prop.json" if array else "prop.jsonl", data)
  try:
    sources.load_conversations(path, format=forced)
  except DataError as e:
    _check_error(e, path, data.count(b"\n") + 1, records=len(records) if array else 0)


@PROPERTY
@given(garbage=st.binary(max_size=40), position=st.integers(0, 2))
def test_any_bytes_as_a_line(tmp_path, garbage, position):
  lines = [GOOD_LINE, GOOD_LINE]
  lines.insert(position, garbage.replace(b"\n", b" "))
  path = _file(tmp_path, "bytes.jsonl", _lines(*lines))
  try:
    loaded = sources.load_conversations(path)
  except DataError as e:
    _check_error(e, path, 3)
    assert f"{path}:{position + 1}: " in str(e)
  else:  # blank or whitespace garbage is not a record; anything else must have been valid
    assert len(loaded) in (2, 3)


@PROPERTY
@given(count=st.integers(1, 4), cut=st.floats(0, 1), array=st.booleans())
def test_files_cut_anywhere(tmp_path, count, cut, array):
  record = {"messages": [{"role": "user", "content": "héllo wörld ✓"},
                         {"role": "assistant", "content": "ok"}]}
  if array:
    data = json.dumps([record] * count, indent=1, ensure_ascii=False).encode()
  else:
    data = _lines(*[json.dumps(record, ensure_ascii=False).encode()] * count)
  cut_data = data[:round(cut * len(data))]  # may split a multi-byte character
  path = _file(tmp_path, "cut.json" if array else "cut.jsonl", cut_data)
  try:
    loaded = sources.load_conversations(path)
  except DataError as e:
    _check_error(e, path, cut_data.count(b"\n") + 1)
  else:
    if array:
      assert len(loaded) == count and cut_data == data
    else:  # every whole line, plus the last piece when the cut fell just before a newline
      line = data.split(b"\n")[0]
      assert len(loaded) == cut_data.count(b"\n") + (cut_data.rsplit(b"\n", 1)[-1] == line)
