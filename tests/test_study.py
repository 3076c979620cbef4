"""The study (`python -m im_jax.study`): the smoke scale end to end, then its parts.

The smoke run trains every run of every experiment on the tiny model (about 2-3 minutes on
2 cores) once per session; the other tests read what it wrote.
"""

import json
import pathlib
import re

import pytest

from im_jax.study import __main__ as study_main
from im_jax.study import runs as runs_lib
from im_jax.study import claims as claims_lib
from im_jax.study import scales, sizing, statistics, subsets

pytestmark = [pytest.mark.slow]  # runs the study's smoke scale

FILES = ("results.json", "results.md", "curves_lima.png", "curves_alpaca5k.png",
         "gain_vs_size.png", "gain_vs_ratio.png")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, shared_data_dir):
  out = tmp_path_factory.mktemp("study") / "smoke"
  assert study_main.main(["--out", str(out), "--scale", "smoke",
                          "--data-dir", str(shared_data_dir)]) == 0
  return out


def _tables(markdown: str) -> list[list[str]]:
  tables, current = [], []
  for line in markdown.splitlines() + [""]:
    if line.startswith("|"):
      current.append(line)
    elif current:
      tables.append(current)
      current = []
  return tables


def test_smoke_writes_every_file_and_well_formed_tables(smoke):
  for name in FILES:
    path = smoke / name
    assert path.is_file() and path.stat().st_size > 0, name
    if name.endswith(".png"):
      assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  md = (smoke / "results.md").read_text()
  assert "may be within noise" in md
  for heading in ("Overfitting", "Memorisation", "Second seed", "Data size", "Length ratio"):
    assert heading in md
  tables = _tables(md)
  assert len(tables) >= 10
  for table in tables:
    columns = table[0].count("|")
    assert all(row.count("|") - row.count("\\|") == columns for row in table), table
    assert re.fullmatch(r"\|(---\|)+", table[1]), table[1]
    assert len(table) > 2, table  # a header with no rows is an experiment that did not run
  analysis = json.loads((smoke / "results.json").read_text())["analysis"]
  assert set(analysis["overfitting"]) == {"lima", "alpaca5k"}
  for entry in analysis["overfitting"].values():
    assert set(entry["methods"]) == {"it", "im"}
    assert set(entry["baseline"]["held_out_output_loss"]) == set(subsets.DATASETS)
    for m in entry["methods"].values():
      assert [e["epoch"] for e in m["epochs"]] == [1, 2]
      assert all(e["train_output_loss"] > 0 and e["held_out_output_loss"] > 0
                 for e in m["epochs"])
    d = entry["paired"]["im"]["held_out"][entry["subset"].split("_")[0]]
    assert d["low"] <= d["mean"] <= d["high"] and d["examples"] > 0
  assert [r["size"] for r in analysis["data_size"]] == list(scales.SMOKE.sizes)
  bands = analysis["length_ratio"]
  assert [r["band"] for r in bands] == ["low", "high"]
  assert bands[0]["length_ratio"] < bands[1]["length_ratio"]
  assert {"lima:it", "lima:im", "alpaca5k:it", "alpaca5k:im"} <= set(analysis["memorisation"])
  claims = json.loads((smoke / "results.json").read_text())["claims"]
  # 2 x overfitting (train, held-out), 2 for the second seed, 2 x memorisation, ratio, size
  assert len(claims) == 10
  assert analysis["second_seed"]["seed"] == runs_lib.SECOND_SEED
  assert {c["verdict"] for c in claims} <= set(claims_lib.VERDICTS)


def test_smoke_trained_and_the_untrained_baseline_is_worse(smoke):
  analysis = json.loads((smoke / "results.json").read_text())["analysis"]
  for entry in analysis["overfitting"].values():
    base = entry["baseline"]["train_output_loss"]
    for m in entry["methods"].values():
      assert m["train_output_loss"] < base  # training lowered the loss on its own data


def test_per_example_losses_average_to_eval_loss(smoke):
  """The study's per-example held-out losses average to `eval loss`'s paper measure."""
  from im_jax.convert.load import load_pretrained
  from im_jax.data import sources
  from im_jax.data.stats import load_tokenizer
  from im_jax.eval import loss_eval
  from im_jax.train import sharding

  record = json.loads((smoke / "results" / "smoke" / "alpaca5k_n24_im.json").read_text())
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=1))
  loaded = load_pretrained(record["workdir"], shardings=sharding.sharding_fn(mesh))
  held = sources.load_conversations(str(smoke / "data" / "heldout_alpaca5k.jsonl"))
  metrics = loss_eval.evaluate_loss(
      loaded.model, load_tokenizer(str(loaded.tokenizer_dir)), held,
      loss_eval.LossEvalConfig(template="tulu", max_seq_len=128), mesh)
  ours = record["held_out"]["alpaca5k"]
  assert ours["output_mean"] == pytest.approx(metrics["output_loss_per_example"], abs=1e-4)
  assert len([v for v in ours["output"] if v is not None]) == metrics["output_examples"]


def test_rerun_skips_finished_work(smoke, shared_data_dir, capsys):
  results = sorted((smoke / "results" / "smoke").glob("*.json"))
  before = {p: p.stat().st_mtime_ns for p in results}
  assert study_main.main(["--out", str(smoke), "--scale", "smoke",
                          "--data-dir", str(shared_data_dir)]) == 0
  err = capsys.readouterr().err
  runs = runs_lib.make_plan(scales.SMOKE)
  assert err.count("done (from results)") == len(runs) + 1  # and the baseline
  # --only picks runs from the same plan: their results are reused, not stale.
  assert study_main.main(["--out", str(smoke), "--scale", "smoke", "--only", "length_ratio",
                          "--data-dir", str(shared_data_dir)]) == 0
  err = capsys.readouterr().err
  assert err.count("done (from results)") == 4 + 1 and "training" not in err
  assert "training" not in err
  assert {p: p.stat().st_mtime_ns for p in results} == before


def test_result_keys_are_those_the_study_stored(smoke, shared_data_dir):
  from tests import test_study_rebuild  # pylint: disable=g-import-not-at-top

  test_study_rebuild.assert_result_keys_are_stored(smoke / "results" / "smoke", scales.SMOKE,
                                                   shared_data_dir, smoke)


def test_baseline_scored_on_other_examples_is_not_reused(smoke, shared_data_dir, capsys,
                                                         monkeypatch):
  """The baseline's key names the training examples it was scored on: when they change, the
  stored baseline is stale (the study stops and names it) instead of being reused."""
  from im_jax.study import runner  # pylint: disable=g-import-not-at-top

  drawn = runner._baseline_train  # pylint: disable=protected-access
  monkeypatch.setattr(runner, "_baseline_train", lambda study, d: drawn(study, d)[::-1])
  files = sorted((smoke / "results" / "smoke").glob("*.json"))
  before = {p: p.read_bytes() for p in files}
  code = study_main.main(["--out", str(smoke), "--scale", "smoke",
                          "--data-dir", str(shared_data_dir)])
  err = capsys.readouterr().err
  assert code != 0 and "baseline_" in err and "other settings" in err, err[-2000:]
  assert {p: p.read_bytes() for p in files} == before


@pytest.mark.parametrize("scale", list(scales.SCALES.values()), ids=list(scales.SCALES))
def test_every_planned_run_has_a_valid_config(scale, tmp_path):
  from im_jax.run import settings  # pylint: disable=g-import-not-at-top

  runs = runs_lib.make_plan(scale)
  assert {r.method for r in runs} == set(runs_lib.methods(scale))
  for run in runs:
    c = runs_lib.config_for(run, scale, tmp_path / "data.jsonl",
                            "" if scale.model == "tiny" else "hf:/models/m",
                            str(tmp_path / "tok") if scale.model == "tiny" else "")
    # cpu and replicated run on one CPU device; the smoke studies run here on the tests' 8.
    one_cpu = scale.model == "smollm2_135m"
    settings.check_mesh(c, num_devices=1 if one_cpu else 8, process_count=1)
    assert c.data.eval_fraction == 0 and c.train.seed == run.seed
    assert c.loss.mode == ("im" if run.method.startswith("im") else "it")
    sources = settings.train_sources(c)
    if run.method == runs_lib.INSTRUCTIONS_ONLY:  # IT beside the instructions under im
      assert [(s.loss, s.drop_rule) for s in sources] == [(None, None), ("im", "no_weight")]
    else:
      assert len(sources) == 1


def test_every_scale_finds_its_subsets_in_the_data(shared_data_dir):
  """Every planned subset exists, at its size, outside the held-out sets (LIMA has ~1,000)."""
  for scale in scales.SCALES.values():
    splits = {d: subsets.load_split(d, scale.held_out, shared_data_dir)
              for d in subsets.DATASETS}
    max_seq_len = scale.overrides.get("data.max_seq_len", 2048)
    for run in runs_lib.make_plan(scale):
      chosen = runs_lib.subset_conversations(run.subset, splits[run.subset.dataset],
                                             max_seq_len)
      assert len(chosen) == run.subset.size, run.name


def test_only_plans_the_chosen_experiments():
  runs = runs_lib.make_plan(scales.SMOKE, ("length_ratio",))
  assert {r.subset.band for r in runs} == {"low", "high"}
  assert runs_lib.needed_datasets(runs) == ("dolly3k",)
  sizes = runs_lib.make_plan(scales.SMOKE, ("data_size",))
  assert runs_lib.needed_datasets(sizes) == subsets.DATASETS  # the largest is an overfit run
  full = {r.name: r.experiments for r in runs_lib.make_plan(scales.SMOKE)}
  assert all(full[r.name] == r.experiments for r in sizes)
  assert study_main.EXPERIMENTS == runs_lib.EXPERIMENTS
  with pytest.raises(ValueError, match="unknown experiment"):
    runs_lib.make_plan(scales.SMOKE, ("nonsense",))


def test_speed_probe_measures_tokens_per_second(smoke, shared_data_dir):
  """The cpu scale's sizing probe (run here on the tiny model the smoke study set up)."""
  from im_jax.study import results, runner, start_models  # pylint: disable=g-import-not-at-top

  scale = scales.SMOKE
  splits = {d: subsets.load_split(d, scale.held_out, shared_data_dir) for d in subsets.DATASETS}
  study = runner.Study(smoke, scale, results.ResultStore(smoke / "results" / "smoke"), splits,
                       start_models.start("tiny", smoke, "", []))
  tokens_per_sec, tokens_per_example = runner.measure_speed(study)
  assert tokens_per_sec > 0
  assert 10 < tokens_per_example <= scale.overrides["data.max_seq_len"]
  assert [p.name for p in (smoke / "probe").iterdir()] == [runner.digest(study.base_key())]
  assert (smoke / "probe" / runner.digest(study.base_key()) / "metrics.jsonl").is_file()


def test_subsets_never_overlap_the_held_out_sets(shared_data_dir):
  split = subsets.load_split("dolly3k", 100, shared_data_dir)
  held = {c.id for c in split.held_out}
  bands = subsets.ratio_bands(split, 50, 170)
  assert not held & {c.id for band in bands.values() for c in band}
  assert not held & {c.id for c in subsets.first(split, 500)}
  assert not {c.id for c in bands["low"]} & {c.id for c in bands["high"]}
  assert subsets.length_ratio(bands["low"]) < 0.2 < 2 < subsets.length_ratio(bands["high"])
  again = subsets.load_split("dolly3k", 100, shared_data_dir)
  assert [c.id for c in again.held_out] == [c.id for c in split.held_out]


def test_cpu_report_states_noise_and_the_model_first():
  from im_jax.study import writeup  # pylint: disable=g-import-not-at-top

  empty = {"overfitting": {}, "memorisation": {}, "second_seed": {}, "data_size": [],
           "length_ratio": []}
  md = writeup.markdown(empty, {"scale": "cpu", "command": "python -m im_jax.study"})
  head = md[:md.index("| setting |")]
  for phrase in ("may be within noise", "already instruction-tuned", "Q4_1 GGUF"):
    assert phrase in head
  assert md.count("Not run in this invocation") == 5


def test_paired_bootstrap_interval():
  sure = statistics.paired_difference([2.0, 3.0, 2.5, 2.2] * 10, [1.0, 1.1, 0.9, 1.2] * 10)
  assert sure.excludes_zero and sure.low <= sure.mean <= sure.high
  assert sure.positive_fraction == 1.0
  noise = statistics.paired_difference([1.0, -1.0] * 20, [0.0, 0.0] * 20)
  assert not noise.excludes_zero
  with pytest.raises(ValueError):
    statistics.paired_difference([1.0], [1.0, 2.0])


def test_a_verdict_needs_enough_examples():
  """One example's bootstrap is a point that excludes 0: it must not read as reproduced."""
  one = statistics.paired_difference([2.0], [1.0]).as_dict()
  assert one["low"] == one["high"] == 1.0
  assert claims_lib._verdict(one, +1) == "too few examples"
  n = claims_lib.MIN_EXAMPLES
  enough = statistics.paired_difference([2.0, 2.1] * (n // 2), [1.0] * n).as_dict()
  assert claims_lib._verdict(enough, +1) == "reproduced"
  assert claims_lib._verdict(enough, -1) == "opposite"


def test_cpu_sizing_shrinks_to_the_budget_only_when_needed():
  slow, info = sizing.fit(scales.CPU, tokens_per_example=250, tokens_per_sec=300)
  assert info["factor"] < 1 and slow.overfit_size < scales.CPU.overfit_size
  assert info["estimate_at_full_size"] > sizing.SAFETY * sizing.BUDGET_SECONDS
  assert info["estimate_seconds"] <= sizing.SAFETY * sizing.BUDGET_SECONDS
  assert list(slow.sizes) == sorted(set(slow.sizes))  # still three distinct sizes
  with pytest.raises(ValueError, match="budget"):
    sizing.fit(scales.CPU, tokens_per_example=250, tokens_per_sec=20)
  fast, info = sizing.fit(scales.CPU, tokens_per_example=250, tokens_per_sec=1e6)
  assert info["factor"] == 1 and fast == scales.CPU


@pytest.mark.parametrize("argv, message", [
    (["--scale", "accelerator"], "--model hf:DIR"),
    (["--scale", "accelerator", "--model", "hf:/nonexistent"], "no config.json"),
    (["--out", "WORKDIR"], "is a training workdir"),
    (["--out", "DATA/study"], "is inside the input"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, shared_data_dir, capsys, argv,
                                              message):
  workdir = tmp_path / "workdir"
  (workdir / "checkpoints").mkdir(parents=True)
  argv = [a.replace("WORKDIR", str(workdir)).replace("DATA", str(shared_data_dir))
          for a in argv]
  before = sorted(p.name for p in shared_data_dir.iterdir())
  code = study_main.main(["--out", str(tmp_path / "o"), "--data-dir", str(shared_data_dir),
                          *argv])
  assert sorted(p.name for p in shared_data_dir.iterdir()) == before
  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints"]
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and message in err[0], err


def test_committed_cpu_results_give_the_claims_their_report_states(shared_data_dir, tmp_path):
  """The first edition's report (docs/study_report/results.md, its claim table by the first
  edition's rule; docs/study.md re-reads it by the second edition's) is what the committed
  results (docs/study/) compute to, and they are results the current code reuses (the keys
  it computes: no stale file)."""
  from im_jax.study import claims, results, writeup  # pylint: disable=g-import-not-at-top
  from tests.test_study_rebuild import key_problems  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(__file__).resolve().parents[1]
  problems, _ = key_problems(root / "docs" / "study", shared_data_dir, tmp_path)
  assert not problems, "\n".join(problems)
  records = {k: v for k, v in results.ResultStore(root / "docs" / "study").all().items()
             if k != "sizing"}
  verdicts = claims.verdicts(writeup.analyse(records))
  assert len(verdicts) == 10
  doc = (root / "docs" / "study_report" / "results.md").read_text()
  for v in verdicts:
    assert f"| {v['claim']} | {v['measured']} | {v['verdict']} |" in doc
