"""Sources: every container and record format read into Conversations, with record numbers."""

import json
import pathlib
import subprocess
import sys

import pytest

from im_jax.data import sources
from im_jax.data.conversation import Conversation, DataError, Message

U, A, S = "user", "assistant", "system"


def _roles_contents(conversation: Conversation) -> list[tuple[str, str]]:
  return [(m.role, m.content) for m in conversation.messages]


def _write_jsonl(path: pathlib.Path, records: list, blank_after_first: bool = False) -> None:
  lines = [json.dumps(r) for r in records]
  if blank_after_first:
    lines.insert(1, "   ")
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")


TULU = [
    {"id": "a", "messages": [{"role": S, "content": "Be brief."},
                             {"role": U, "content": " Hi\n"},
                             {"role": A, "content": "Hello."},
                             {"role": U, "content": "Bye"},
                             {"role": A, "content": ""}]},
    {"id": 7, "dataset": "x", "messages": [{"role": U, "content": "Q"},
                                           {"role": A, "content": "R", "extra": 1}]},
]

ALPACA = [
    {"instruction": " Add the numbers. ", "input": "2 and 3\n", "output": " 5 "},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Say bye.", "input": None, "output": "bye"},
    {"instruction": "Count.", "output": "1 2 3"},
]
# Independently written: instruction, a blank line, input; parts stripped; no input when blank.
ALPACA_EXPECTED = [
    [(U, "Add the numbers.\n\n2 and 3"), (A, "5")],
    [(U, "Say hi."), (A, "hi")],
    [(U, "Say bye."), (A, "bye")],
    [(U, "Count."), (A, "1 2 3")],
]

SHAREGPT = [
    {"id": "s0", "conversations": [{"from": "system", "value": "Sys"},
                                   {"from": "human", "value": "Q1"},
                                   {"from": "gpt", "value": "A1"},
                                   {"from": "user", "value": "Q2"},
                                   {"from": "chatgpt", "value": "A2"}]},
    {"system": "Top-level system", "conversations": [{"from": "human", "value": "Q"},
                                                     {"from": "bing", "value": "A"}]},
]
SHAREGPT_EXPECTED = [
    [(S, "Sys"), (U, "Q1"), (A, "A1"), (U, "Q2"), (A, "A2")],
    [(S, "Top-level system"), (U, "Q"), (A, "A")],
]


def test_tulu_jsonl_messages_ids_and_line_numbers(tmp_path):
  path = tmp_path / "t.jsonl"
  _write_jsonl(path, TULU, blank_after_first=True)
  loaded = sources.load_conversations(path)
  assert (loaded.format, loaded.container, len(loaded), loaded.skipped) == ("tulu", "jsonl", 2, [])
  first, second = loaded[0], loaded[1]
  assert _roles_contents(first) == [(m["role"], m["content"]) for m in TULU[0]["messages"]]
  assert first.messages[1] == Message(U, " Hi\n")  # content kept verbatim, whitespace too
  assert (first.record, first.id, first.source) == (1, "a", str(path))
  assert (second.record, second.id) == (3, "7")  # line 2 is blank: not a record


@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_alpaca_joins_instruction_and_input(tmp_path, container):
  path = tmp_path / f"a.{container}"
  if container == "json":
    path.write_text(json.dumps(ALPACA, indent=2))
  else:
    _write_jsonl(path, ALPACA)
  loaded = sources.load_conversations(path)
  assert (loaded.format, loaded.container) == ("alpaca", container)
  assert [_roles_contents(c) for c in loaded] == ALPACA_EXPECTED
  first_record = 0 if container == "json" else 1  # 0-based index vs 1-based line
  assert [c.record for c in loaded] == [first_record + i for i in range(4)]


@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_sharegpt_roles(tmp_path, container):
  path = tmp_path / f"s.{container}"
  if container == "json":
    path.write_text(json.dumps(SHAREGPT))
  else:
    _write_jsonl(path, SHAREGPT)
  loaded = sources.load_conversations(path)
  assert (loaded.format, loaded.container) == ("sharegpt", container)
  assert [_roles_contents(c) for c in loaded] == SHAREGPT_EXPECTED
  assert loaded[0].id == "s0" and loaded[1].id is None


def test_container_is_sniffed_not_taken_from_the_extension(tmp_path):
  lines_in_json = tmp_path / "lines.json"  # many hub files are JSON lines named .json
  _write_jsonl(lines_in_json, TULU)
  array_in_txt = tmp_path / "array.txt"
  array_in_txt.write_text("\ufeff  " + json.dumps(ALPACA))  # with a byte-order mark
  crlf = tmp_path / "crlf.data"
  crlf.write_bytes(b"\r\n".join(json.dumps(r).encode() for r in SHAREGPT) + b"\r\n")
  assert sources.load_conversations(lines_in_json).container == "jsonl"
  assert len(sources.load_conversations(lines_in_json)) == 2
  loaded = sources.load_conversations(array_in_txt)
  assert (loaded.container, loaded.format, len(loaded)) == ("json", "alpaca", 4)
  loaded = sources.load_conversations(crlf)
  assert [_roles_contents(c) for c in loaded] == SHAREGPT_EXPECTED


def test_forced_format_overrides_detection(tmp_path):
  # An Alpaca record carrying an unrelated `messages` key: detection says tulu and fails.
  path = tmp_path / "f.jsonl"
  _write_jsonl(path, [{"messages": "n/a", "instruction": "I", "output": "O"}])
  with pytest.raises(DataError, match="'messages' must be an array"):
    sources.load_conversations(path)
  loaded = sources.load_conversations(path, format="alpaca")
  assert [_roles_contents(c) for c in loaded] == [[(U, "I"), (A, "O")]]
  with pytest.raises(DataError, match=r"f\.jsonl:1: missing field 'conversations'"):
    sources.load_conversations(path, format="sharegpt")
  with pytest.raises(ValueError):
    sources.load_conversations(path, format="yaml")


def test_format_detected_past_an_unrecognised_first_record(tmp_path):
  path = tmp_path / "late.jsonl"
  _write_jsonl(path, [{"unrelated": 1}, *TULU])
  loaded = sources.load_conversations(path, on_bad_record="skip")
  assert loaded.format == "tulu" and [c.record for c in loaded] == [2, 3]
  assert loaded.skipped == [(f"{path}:1", "missing field 'messages'")]


def _write_parquet(path: pathlib.Path, rows: list[dict], row_group_size: int) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


@pytest.mark.parametrize("layout", ["tulu", "alpaca", "sharegpt"])
def test_parquet_layouts_and_row_numbers_across_batches(tmp_path, layout):
  base, expected = {
      "tulu": (TULU, [_roles_contents(Conversation(tuple(Message(m["role"], m["content"])
                                                         for m in r["messages"])))
                      for r in TULU]),
      "alpaca": (ALPACA, ALPACA_EXPECTED),
      "sharegpt": (SHAREGPT, SHAREGPT_EXPECTED),
  }[layout]
  # Arrow takes its columns from the first row and wants one type per column.
  if layout == "tulu":
    base = [dict(r, id=str(r["id"])) for r in base]
  if layout == "sharegpt":
    base = [dict(r, system=r.get("system"), id=r.get("id")) for r in base]  # null: no system
  copies = 700  # more rows than one record batch, over several row groups
  path = tmp_path / "data.bin"  # no .parquet suffix: detected from the PAR1 magic
  _write_parquet(path, base * copies, row_group_size=333)
  loaded = sources.load_conversations(path)
  assert (loaded.container, loaded.format, len(loaded)) == ("parquet", layout,
                                                            len(base) * copies)
  assert [c.record for c in loaded] == list(range(len(loaded)))
  for index in (0, 1, 1023, 1024, 1025, len(loaded) - 1):
    assert _roles_contents(loaded[index]) == expected[index % len(base)]


def test_real_files(shared_data_dir):
  counts = {"lima.jsonl": 1030, "alpagasus_dolly_3k.jsonl": 2996,
            "alpagasus_alpaca_5k.jsonl": 5305}
  for name, count in counts.items():
    loaded = sources.load_conversations(shared_data_dir / name)
    assert (len(loaded), loaded.format, loaded.skipped) == (count, "tulu", [])
    assert [c.record for c in loaded] == list(range(1, count + 1))
  lima = sources.load_conversations(shared_data_dir / "lima.jsonl")
  assert sum(len(c.messages) > 2 for c in lima) == 30
  alpaca = sources.load_conversations(shared_data_dir / "alpagasus_alpaca_5k.jsonl")
  empty = [c.record for c in alpaca if c.messages[-1].content == ""]
  assert empty == [2591, 3261, 4653, 4725]  # README's list of empty assistant replies


def test_grain_reads_a_loaded_dataset(tmp_path):
  import grain

  path = tmp_path / "t.jsonl"
  _write_jsonl(path, TULU * 3)
  loaded = sources.load_conversations(path)
  records = list(grain.MapDataset.source(loaded).map(lambda c: c.record))
  assert records == [1, 2, 3, 4, 5, 6]


def test_iter_conversations_is_lazy(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps(TULU[0]) + "\nnot json\n")
  iterator = sources.iter_conversations(path)
  assert next(iterator).record == 1  # the bad line 2 is not read yet
  with pytest.raises(DataError, match=":2: invalid JSON"):
    next(iterator)


# ---------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny ArrayRecord TFDS dataset, built locally with no TensorFlow."""
  import tensorflow_datasets as tfds

  class ImJaxTinyChat(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for a checksums file beside the builder's package through a resource API
    # this venv lacks (importlib_resources); a test builder has no checksums anyway.
    code_path = None

    def _info(self):
      # A builder outside a registered module must make its DatasetInfo itself.
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": tfds.features.Text(),
          "messages": tfds.features.Sequence({"role": tfds.features.Text(),
                                              "content": tfds.features.Text()}),
      }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(3), "test": self._generate_examples(1)}

    def _generate_examples(self, n):  # pylint: disable=arguments-differ
      for i in range(n):
        yield i, {"id": f"c{i}", "messages": [{"role": "user", "content": f"Q{i} é"},
                                              {"role": "assistant", "content": f"A{i}"}]}

  data_dir = tmp_path_factory.mktemp("tfds")
  ImJaxTinyChat(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source(tfds_dir):
  loaded = sources.load_conversations("tfds:im_jax_tiny_chat:train", tfds_data_dir=str(tfds_dir))
  assert (loaded.container, loaded.format, len(loaded)) == ("tfds", "tulu", 3)
  # ArrayRecord order is the builder's shuffled order: compare as a set, check indices.
  assert sorted(_roles_contents(c)[0][1] for c in loaded) == ["Q0 é", "Q1 é", "Q2 é"]
  assert all(_roles_contents(c)[1] == (A, f"A{c.id[1]}") for c in loaded)
  assert [c.record for c in loaded] == [0, 1, 2]
  test = sources.load_conversations("tfds:im_jax_tiny_chat:1.0.0:test",
                                    tfds_data_dir=str(tfds_dir))
  assert [_roles_contents(c) for c in test] == [[(U, "Q0 é"), (A, "A0")]]
  with pytest.raises(DataError, match="tfds:no_such_dataset:train: cannot open"):
    sources.load_conversations("tfds:no_such_dataset:train", tfds_data_dir=str(tfds_dir))


def test_tfds_records_read_by_index(tfds_dir):
  from im_jax.data import records as records_lib  # pylint: disable=g-import-not-at-top

  spec = "tfds:im_jax_tiny_chat:train"
  records = records_lib.open_records(spec, tfds_data_dir=str(tfds_dir))
  assert isinstance(records, records_lib.TfdsRecords) and records.files == []
  want = sources.load_conversations(spec, tfds_data_dir=str(tfds_dir)).conversations
  assert [records.read(i) for i in (2, 0, 1)] == [want[2], want[0], want[1]]


def test_tfds_source_in_a_fresh_process(tfds_dir):
  # A new process reads the dataset from its files alone, with no builder class registered.
  done = subprocess.run(
      [sys.executable, "-m", "im_jax.data", "stats", "--data", "tfds:im_jax_tiny_chat:train",
       "--tfds-data-dir", str(tfds_dir), "--json"],
      cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
      timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  report = json.loads(done.stdout)
  assert (report["examples"], report["container"], report["mean_output_words"]) == (3, "tfds", 1)


def test_tfds_spec_parsing():
  parse = sources.parse_tfds_spec
  assert parse("tfds:lima") == ("lima", "train")
  assert parse("tfds:lima:test") == ("lima", "test")
  assert parse("tfds:lima/cfg:train[:10%]") == ("lima/cfg", "train[:10%]")
  assert parse("tfds:lima/cfg:1.0.0") == ("lima/cfg:1.0.0", "train")
  assert parse("tfds:lima/cfg:1.0.0:validation") == ("lima/cfg:1.0.0", "validation")


def test_tfds_values_become_json_like():
  record = {"id": b"x", "conversations": {"from": [b"human", b"gpt"], "value": [b"q", b"a"]}}
  assert sources._from_tfds(record) == {  # pylint: disable=protected-access
      "id": "x", "conversations": [{"from": "human", "value": "q"},
                                   {"from": "gpt", "value": "a"}]}
