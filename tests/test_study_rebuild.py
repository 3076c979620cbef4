"""The committed study results still match the code (issue 31: a rebuild that works).

- Every committed result (docs/study/ and, when present, docs/study2/: runs, baselines,
  sizing) carries the key the current code computes for it (`orchestrate.result_keys`, no
  training and no model loaded). A code change that alters a key makes the documented rebuild
  stop with a stale-result error; this test names the file and the fields instead.
"""

import json
import pathlib

import pytest

from im_jax.study import orchestrate, results, runner, scales, start_models

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The committed results folders; the second edition's fills as its runs finish.
COMMITTED = ("study", "study2")


def key_problems(folder: pathlib.Path, data_dir: pathlib.Path,
                 tmp: pathlib.Path) -> tuple[list[str], set[str]]:
  """(each mismatch as one line naming the file and fields, the names the plan expects)."""
  records = {p: json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))}
  scale_names = {r["key"]["scale"] for r in records.values()}
  assert len(scale_names) == 1, f"{folder}: results of several scales {sorted(scale_names)}"
  scale = scales.SCALES[scale_names.pop()]
  start = start_models.Start("", "", start_models.description(scale.model, ""))
  study = runner.Study(tmp, scale, results.ResultStore(folder),
                       _splits(scale.held_out, data_dir), start)
  expected = orchestrate.result_keys(study)
  problems = []
  for path, record in records.items():
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if path.stem not in expected:
      problems.append(f"{name}: no result of that name in the {scale.name} scale's plan")
    elif differences := results.key_differences(record["key"], expected[path.stem]):
      problems.append(f"{name}: key differs from the code's: {'; '.join(differences)}")
  return problems, set(expected)


_SPLITS: dict[int, dict] = {}


def _splits(held_out: int, data_dir: pathlib.Path) -> dict:
  if held_out not in _SPLITS:  # both editions hold out 100: the data is read once
    _SPLITS[held_out] = orchestrate.load_splits(held_out, str(data_dir))
  return _SPLITS[held_out]


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_results_have_the_keys_the_code_computes(name, shared_data_dir, tmp_path):
  folder = ROOT / "docs" / name
  if not any(folder.glob("*.json")):
    pytest.skip(f"docs/{name}/ holds no results yet")
  problems, expected = key_problems(folder, shared_data_dir, tmp_path)
  assert not problems, "\n".join(problems)
  if name == "study":  # complete: the doc's rebuild command trains nothing
    missing = sorted(expected - {p.stem for p in folder.glob("*.json")})
    assert not missing, f"docs/study/ lacks {missing}: its rebuild would train them"


def test_a_changed_key_is_named(shared_data_dir, tmp_path):
  """The check can fail: one committed result with a field of its key altered."""
  folder = tmp_path / "results"
  folder.mkdir()
  for path in (ROOT / "docs" / "study").glob("*.json"):
    (folder / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
  record = json.loads((folder / "lima_n64_it.json").read_text(encoding="utf-8"))
  record["key"]["examples"] = "0" * 16
  (folder / "lima_n64_it.json").write_text(json.dumps(record), encoding="utf-8")
  problems, _ = key_problems(folder, shared_data_dir, tmp_path)
  assert len(problems) == 1 and "lima_n64_it.json" in problems[0], problems
  assert 'examples: stored "0000000000000000", now "c7241fb7783e254b"' in problems[0], problems

