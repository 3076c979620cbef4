"""Dataset statistics, the IT/IM recommendation and the `python -m im_jax.data` command line."""

import json
import pathlib
import subprocess
import sys

import pytest

from im_jax.data import sources, stats

REPO = pathlib.Path(__file__).resolve().parents[1]

# Hand-counted below: whitespace-separated words, system+user vs assistant.
SMALL = [
    {"messages": [{"role": "system", "content": "You are terse."},        # 3
                  {"role": "user", "content": " Add  two\tand\nthree "},   # 4
                  {"role": "assistant", "content": "five"}]},             # 1
    {"messages": [{"role": "user", "content": "hi"},                      # 1
                  {"role": "assistant", "content": "hello there friend"},  # 3
                  {"role": "user", "content": "bye now"},                 # 2
                  {"role": "assistant", "content": ""}]},                 # 0
]
# instruction words 7 and 3 -> mean 5; output words 1 and 3 -> mean 2; ratio 2.5.


@pytest.fixture
def small_file(tmp_path) -> pathlib.Path:
  path = tmp_path / "small.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in SMALL))
  return path


def test_word_stats_match_a_hand_count(small_file):
  result = stats.compute_stats(sources.load_conversations(small_file).conversations)
  assert (result.examples, result.messages, result.assistant_turns,
          result.multi_turn_examples) == (2, 7, 3, 1)
  assert result.mean_instruction_words == 5.0
  assert result.mean_output_words == 2.0
  assert result.length_ratio == 2.5
  assert result.mean_instruction_tokens is None
  assert result.recommendation == "im"


def test_token_stats_match_the_tokenizer_file(small_file, tiny_tokenizer_dir):
  import tokenizers  # the Rust tokenizer read from its own file: independent of transformers

  raw = tokenizers.Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
  def count(text):
    return len(raw.encode(text, add_special_tokens=False).ids)
  instruction = sum(count(m["content"]) for r in SMALL for m in r["messages"]
                    if m["role"] != "assistant")
  output = sum(count(m["content"]) for r in SMALL for m in r["messages"]
               if m["role"] == "assistant")
  assert instruction > 10 and output > 3  # the check below compares real counts
  result = stats.compute_stats(sources.load_conversations(small_file).conversations,
                               stats.load_tokenizer(str(tiny_tokenizer_dir)))
  assert result.mean_instruction_tokens == instruction / 2
  assert result.mean_output_tokens == output / 2


@pytest.mark.parametrize("examples, ratio, expected", [
    (1_030, 0.09, "im"),      # LIMA: short instructions but few examples
    (5_305, 0.55, "im"),      # AlpaGasus-sized
    (52_000, 0.5, "it"),      # Stanford Alpaca-sized, outputs longer than instructions
    (52_000, 3.0, "im"),      # few-shot prompts with short answers
    (52_000, 1.0, "im"),      # the ratio threshold is inclusive
    (10_000, 0.2, "im"),      # the size threshold is inclusive
    (10_001, 0.2, "it"),
    (50, None, "im"),         # no output words at all
])
def test_recommendation_thresholds(examples, ratio, expected):
  choice, reason = stats.recommend(examples, ratio)
  assert choice == expected
  assert reason.endswith(".") and "paper" in reason
  assert (f"{ratio:.2f}" in reason) if ratio is not None else ("no example" in reason)


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "im_jax.data", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=False)


def test_cli_json_on_lima_with_a_tokenizer(shared_data_dir, smollm2_tokenizer_dir):
  done = _cli("stats", "--data", str(shared_data_dir / "lima.jsonl"), "--json",
              "--tokenizer", str(smollm2_tokenizer_dir))
  assert done.returncode == 0, done.stderr
  report = json.loads(done.stdout)
  assert report["examples"] == 1030 and report["multi_turn_examples"] == 30
  # Independent of the package: count words straight from the file.
  instruction = output = 0
  for line in (shared_data_dir / "lima.jsonl").read_text().splitlines():
    for m in json.loads(line)["messages"]:
      if m["role"] == "assistant":
        output += len(m["content"].split())
      else:
        instruction += len(m["content"].split())
  assert report["mean_instruction_words"] == pytest.approx(instruction / 1030)
  assert report["mean_output_words"] == pytest.approx(output / 1030)
  assert report["length_ratio"] == pytest.approx(instruction / output)
  assert report["length_ratio"] < 0.2  # LIMA's outputs are far longer than its prompts
  # Subword tokens outnumber words.
  assert report["mean_output_tokens"] > report["mean_output_words"]
  assert report["recommendation"] in ("im", "it") and report["reason"]


def test_cli_text_report_and_skipped_records(tmp_path, small_file):
  bad = tmp_path / "mixed.jsonl"
  bad.write_text(small_file.read_text() + '{"messages": [{"role": "bot", "content": "x"}]}\n')
  done = _cli("stats", "--data", str(bad), "--on-bad-record", "skip")
  assert done.returncode == 0, done.stderr
  assert "length ratio             2.50" in done.stdout
  assert f"{bad}:3: messages[0]: unknown role 'bot'" in done.stdout
  done = _cli("stats", "--data", str(bad), "--on-bad-record", "skip", "--json")
  report = json.loads(done.stdout)
  assert (report["examples"], report["skipped"]) == (2, 1)
  assert report["skipped_records"][0]["where"] == f"{bad}:3"


def test_cli_bad_file_exits_2_with_one_line(tmp_path, small_file):
  bad = tmp_path / "bad.jsonl"
  lines = small_file.read_text().splitlines()
  bad.write_text(lines[0] + "\n" + lines[1][:40] + "\n")  # line 2 cut mid-object
  done = _cli("stats", "--data", str(bad), "--json")
  assert done.returncode == 2
  assert done.stdout == ""
  assert f"{bad}:2: invalid JSON" in done.stderr
  assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_forced_format(tmp_path):
  path = tmp_path / "alpaca.json"
  path.write_text(json.dumps([{"instruction": "a b", "input": "c", "output": "d"}]))
  done = _cli("stats", "--data", str(path), "--format", "sharegpt")
  assert done.returncode == 2 and "record 0: missing field 'conversations'" in done.stderr
  done = _cli("stats", "--data", str(path), "--format", "alpaca", "--json")
  report = json.loads(done.stdout)
  assert (report["format"], report["container"], report["length_ratio"]) == ("alpaca", "json", 3.0)


def test_cli_preview_is_wired_and_a_bad_tokenizer_is_one_line(tmp_path, small_file):
  done = _cli("preview", "--help")
  assert done.returncode == 0 and "--loss-mode" in done.stdout
  done = _cli("stats", "--data", str(small_file), "--tokenizer", str(tmp_path / "none"))
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert f"{tmp_path / 'none'}: cannot load a tokenizer" in done.stderr


def test_the_tokenizer_loader_names_a_folder_without_tokenizer_files(tmp_path):
  (tmp_path / "config.json").write_text("{}")  # a folder, but no tokenizer in it
  with pytest.raises(stats.DataError, match=f"^{tmp_path}: cannot load a tokenizer: no "
                     "tokenizer files"):
    stats.load_tokenizer(str(tmp_path))


def test_cli_bad_option_value_is_one_line(small_file, tiny_tokenizer_dir, capsys):
  from im_jax.data.__main__ import main  # pylint: disable=import-outside-toplevel

  assert main(["preview", "--data", str(small_file), "--tokenizer", str(tiny_tokenizer_dir),
               "--max-seq-len", "1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == "error: max_seq_len must be >= 2"
