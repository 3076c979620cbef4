"""The committed study results still match the code (issue 31: a rebuild that works).

- Every committed result (docs/study/ and, when present, docs/study2/: runs, baselines,
  sizing) carries the key the current code computes for it (`orchestrate.result_keys`, no
  training and no model loaded). A code change that alters a key makes the documented rebuild
  stop with a stale-result error; this test names the file and the fields instead.
- A golden smoke result (study_smoke_golden.json): a few training steps of the smoke scale
  give the committed per-step losses, so a change in what training computes cannot land
  silently beside results made before it.
"""

import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest

from im_jax.study import orchestrate, results, runner, runs as runs_lib, scales, start_models
from im_jax.study import subsets

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
  expected = orchestrate.result_keys(_study(folder, scale, data_dir, tmp))
  problems = []
  for path, record in records.items():
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if path.stem not in expected:
      problems.append(f"{name}: no result of that name in the {scale.name} scale's plan")
    elif differences := results.key_differences(record["key"], expected[path.stem]):
      problems.append(f"{name}: key differs from the code's: {'; '.join(differences)}")
  return problems, set(expected)


def assert_result_keys_are_stored(folder: pathlib.Path, scale: scales.Scale,
                                  data_dir: pathlib.Path, out: pathlib.Path) -> None:
  """`orchestrate.result_keys` computes, without training, the very keys a study of `scale`
  (run in full) stored in `folder`: the check above checks what the study does."""
  store = results.ResultStore(folder)
  expected = orchestrate.result_keys(_study(folder, scale, data_dir, out))
  assert {k: r["key"] for k, r in store.all().items()} == expected


def _study(folder: pathlib.Path, scale: scales.Scale, data_dir: pathlib.Path,
           out: pathlib.Path) -> runner.Study:
  """A study of the results in `folder` as far as keys go: no model converted or loaded."""
  start = start_models.Start("", "", start_models.description(scale.model, ""))
  return runner.Study(out, scale, results.ResultStore(folder),
                      _splits(scale.held_out, data_dir), start)


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


def test_committed_control_weights_are_what_the_code_computes(shared_data_dir, tmp_path,
                                                             smollm2_tokenizer_dir):
  """The control's example weight (IM's mean instruction share of its subset, from the run's
  own encoding under IM's loss mode) and instruction count, as each committed control run
  of the second edition stored them: computed here with the same SmolLM2 tokenizer."""
  folder = ROOT / "docs" / "study2"
  study = dataclasses.replace(_study(folder, scales.REPLICATED, shared_data_dir, tmp_path),
                              start=start_models.Start("", str(smollm2_tokenizer_dir), ""))
  controls = [r for r in runs_lib.make_plan(scales.REPLICATED)
              if r.method == runs_lib.INSTRUCTIONS_ONLY]
  assert len(controls) == 3
  for run in controls:
    stored = json.loads((folder / f"{run.name}.json").read_text(encoding="utf-8"))["control"]
    kept, share = study.instruction_share(study.config(run), study.subset(run))
    assert {"instructions": len(kept), "example_weight": share} == stored, run.name


# The golden smoke result: what training computes, pinned (see the test's docstring).
GOLDEN = pathlib.Path(__file__).with_name("study_smoke_golden.json")
GOLDEN_STEPS = 5
GOLDEN_METHODS = ("it", "im", runs_lib.INSTRUCTIONS_ONLY)
EXACT = ("step", "tokens", "output_tokens", "instruction_tokens", "output_examples",
         "instruction_examples")  # what each step trained on: counts, equal
CLOSE = ("loss", "output_loss_per_example", "instruction_loss_per_example", "grad_norm", "lr")
RTOL = 1e-4  # float32 on another x86 CPU differs by ~1e-6; a changed computation by far more


def smoke_steps(tmp: pathlib.Path) -> dict[str, list[dict[str, float]]]:
  """GOLDEN_STEPS steps of a smoke-scale run of each of GOLDEN_METHODS: the study's own
  config (Study.config: runs.config_for with scales.SMOKE, the it_instr control's second
  source), starting model and tokenizer (start_models.start: tiny random init, a BPE
  tokenizer trained on the data) and trainer (experiment.build(...).run()), on 96 synthetic
  conversations (no data files needed); each logged step's EXACT and CLOSE fields."""
  from im_jax import report  # pylint: disable=g-import-not-at-top
  from im_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from im_jax.run import experiment  # pylint: disable=g-import-not-at-top

  conversations = synthetic.make_conversations(96)
  scale = dataclasses.replace(scales.SMOKE, overrides={**scales.SMOKE.overrides,
                                                       "train.max_steps": GOLDEN_STEPS})
  study = runner.Study(tmp, scale, results.ResultStore(tmp / "results"),
                       {"lima": subsets.DatasetSplit("lima", [], conversations)},
                       start_models.start(scale.model, tmp, "", conversations))
  subset = runs_lib.Subset("golden", "lima", len(conversations))
  out = {}
  for method in GOLDEN_METHODS:
    workdir = tmp / "runs" / method
    experiment.build(study.config(runs_lib.Run(subset, method, ())), workdir).run()
    out[method] = [{k: r[k] for k in EXACT + CLOSE} for r in report.load_run(workdir).train]
  return out


def test_smoke_training_computes_the_golden_losses(tmp_path):
  """A few smoke-scale training steps give the committed per-step losses (GOLDEN): a code
  change that alters what training computes (data encoding or packing, the loss, the model,
  the optimizer, the study's configs) fails here, before results made with the old code
  meet code that would no longer reproduce them.

  Regenerate (under this test environment: conftest's 8 simulated devices and LLVM -O0):

      IM_JAX_REGEN_GOLDEN=1 bash scripts/test.sh tests/test_study_rebuild.py -k golden

  Only when a change is meant to alter training (a fixed bug, a new data order, a changed
  recipe) or a pinned dependency's upgrade changes it (jax's numerics, the `tokenizers` BPE
  trainer behind the tiny tokenizer): say so in its commit, and rerun the committed study
  results it makes stale or say why they still stand (their keys need not change with it:
  this test is the alarm). Never to quiet a difference nobody explained.
  """
  got = smoke_steps(tmp_path)
  if os.environ.get("IM_JAX_REGEN_GOLDEN"):
    GOLDEN.write_text(json.dumps({"steps": GOLDEN_STEPS, "runs": got}, indent=1) + "\n")
    pytest.skip(f"regenerated {GOLDEN}")
  golden = json.loads(GOLDEN.read_text(encoding="utf-8"))["runs"]
  assert set(got) == set(golden)
  for method, steps in golden.items():
    assert len(got[method]) == len(steps) == GOLDEN_STEPS, method
    for want, have in zip(steps, got[method]):
      assert {k: have[k] for k in EXACT} == {k: want[k] for k in EXACT}, (method, want["step"])
      np.testing.assert_allclose([have[k] for k in CLOSE], [want[k] for k in CLOSE], rtol=RTOL,
                                 err_msg=f"{method} step {want['step']}: {CLOSE}")
