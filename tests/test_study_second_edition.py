"""The study's second edition (docs/study_plan.md): its statistics against independent
computations, its verdict rule, and the replicated design end to end at the smoke size.

Independent references: numpy sorting and slicing for the trimmed mean, the binomial
distribution summed by hand for the sign test, the tabulated t quantile, Holm's procedure
worked by hand; for the design, the data the study wrote (disjoint subsets, the control's
instruction sequences) and the trainer's own logged evaluation.
"""

import functools
import json
import math
import pathlib

import numpy as np
import pytest

from im_jax.study import claims, runs as runs_lib, scales, statistics
from im_jax.study import __main__ as study_main



def _binomial_two_sided(k: int, n: int) -> float:
  """Exact two-sided sign test by hand: the probability of outcomes no likelier than k."""
  probs = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
  return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-12)))


def test_robust_difference_against_hand_computations():
  rng = np.random.default_rng(3)
  diffs = np.r_[rng.normal(0.1, 0.05, 40), -4.0]  # one outlier drags the mean below 0
  d = statistics.robust_difference(diffs)
  cut = int(0.2 * diffs.size)
  assert d.trimmed_mean == pytest.approx(np.sort(diffs)[cut:diffs.size - cut].mean())
  assert d.median == pytest.approx(np.sort(diffs)[20])
  assert d.mean == pytest.approx(diffs.mean()) and d.mean < 0 < d.median
  positives = int((diffs > 0).sum())
  assert d.sign_p == pytest.approx(_binomial_two_sided(positives, diffs.size))
  assert d.mean_low <= d.mean <= d.mean_high and d.median_low <= d.median <= d.median_high
  # ties are left out of the sign test
  assert statistics.sign_test(np.array([1.0, 0.0, 0.0, 2.0])) == pytest.approx(0.5)


def test_across_runs_t_interval_and_sign_test():
  r = statistics.across_runs([0.1, 0.2, 0.15])
  t_975_2 = 4.302652729911275  # the tabulated 97.5% quantile of t with 2 degrees of freedom
  half = t_975_2 * 0.05 / math.sqrt(3)
  assert (r.mean, r.sd) == (pytest.approx(0.15), pytest.approx(0.05))
  assert (r.low, r.high) == (pytest.approx(0.15 - half), pytest.approx(0.15 + half))
  assert r.sign_p == pytest.approx(0.25)  # the smallest two-sided p of 3 runs
  with pytest.raises(ValueError):
    statistics.across_runs([0.1])


def test_holm_by_hand():
  # sorted 0.01, 0.03, 0.04, 0.5 -> x4, x3, x2, x1 = 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.5
  assert statistics.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
  assert statistics.holm([0.9, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
  assert statistics.holm([0.6, 0.1]) == pytest.approx([0.6, 0.2])


def _diff(values):
  return statistics.robust_difference(values).as_dict()


def test_the_verdict_rule():
  clear = _diff(np.linspace(0.01, 0.05, 30))
  assert claims.robust_verdict(clear, +1, 1e-6) == "reproduced"
  assert claims.robust_verdict(clear, -1, 1e-6) == "opposite"
  # the Alpaca case: the mean is carried by one example, the median is not
  skewed = _diff(np.r_[np.full(30, 0.01), np.full(20, -0.005), 5.0])
  assert claims.mean_reading(skewed, +1) == "reproduced"
  assert claims.robust_verdict(skewed, +1, 0.4) == claims.DEPENDS
  assert claims.robust_verdict(_diff(np.linspace(-1, 1, 31)), +1, 1.0) == "within noise"
  assert claims.robust_verdict(_diff([0.1] * 9), +1, 1e-6) == "too few examples"
  runs_disagree = {"values": [0.1, 0.2, -0.05], "low": -0.2, "high": 0.4}
  assert claims.robust_verdict(clear, +1, 1e-6, runs_disagree) == claims.NOT_ACROSS_RUNS
  runs_agree = {"values": [0.1, 0.2, 0.15], "low": 0.03, "high": 0.27}
  assert claims.robust_verdict(clear, +1, 1e-6, runs_agree) == "reproduced"


def test_replicas_are_disjoint_each_with_its_seed():
  scale = scales.REPLICATED
  plan = runs_lib.make_plan(scale)
  assert len(plan) == scale.replicas * 3
  assert {(r.subset.offset, r.seed) for r in plan} == {
      (i * scale.overfit_size, i) for i in range(scale.replicas)}
  with pytest.raises(ValueError, match="--only does not apply"):
    runs_lib.make_plan(scale, ("overfitting",))


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, shared_data_dir):
  out = tmp_path_factory.mktemp("study2") / "smoke"
  root = pathlib.Path(__file__).resolve().parents[1]
  assert study_main.main(["--out", str(out), "--scale", "smoke_replicated",
                          "--data-dir", str(shared_data_dir),
                          "--first-edition", str(root / "docs" / "study")]) == 0
  return out


@pytest.mark.slow  # runs the study
def test_smoke_replicated_writes_every_artefact(replicated):
  scale = scales.SMOKE_REPLICATED
  results = replicated / "results" / scale.name
  names = sorted(p.stem for p in results.glob("*.json"))
  runs = runs_lib.make_plan(scale)
  assert names == sorted([r.name for r in runs] + [f"baseline_{d}" for d in
                                                   ("alpaca5k", "dolly3k", "lima")])
  for name in ("results.json", "results.md", "curves_replicated.png"):
    assert (replicated / name).stat().st_size > 0
  md = (replicated / "results.md").read_text()
  for claim in ("| C1 |", "| C3 |", "| C4 |", "| C5 |", "| C6 |", "E1 lima_n64 |",
                "E1 length_ratio |", "## Memorisation", "## Overfitting per run"):
    assert claim in md, claim
  analysis = json.loads((replicated / "results.json").read_text())["analysis"]
  judged = [r for r in analysis["main"]["rows"] + analysis["first_edition"]
            if not r["descriptive"]]
  assert all(r["holm_p"] >= r["per_example"]["sign_p"] for r in judged)
  # the re-read reproduces the independent figures for the first edition
  alpaca = next(r for r in analysis["first_edition"] if r["id"] == "E1 alpaca5k_n64")
  assert alpaca["per_example"]["mean"] == pytest.approx(-0.0518, abs=1e-4)
  assert alpaca["per_example"]["median"] == pytest.approx(0.0025, abs=1e-4)
  assert alpaca["verdict"] == claims.DEPENDS
  # the floor: the untrained model on every memorisation replica's prompts, in their order
  base = json.loads((results / "baseline_lima.json").read_text())["memorisation"]
  generated = [json.loads((results / f"{r.name}.json").read_text())["memorisation"]
               for r in runs if r.method == "it" and "memorisation" in r.experiments]
  assert len(generated) == 2 and [g["instruction"] for g in base["generations"]] == [
      g["instruction"] for part in generated for g in part["generations"]]


@pytest.mark.slow  # runs the study
def test_each_epoch_scores_every_held_out_example(replicated, shared_data_dir):
  """The per-example curve: one file per epoch, its mean the loss the run logged then; the
  last epoch's losses are the final model's held-out losses of the result."""
  scale = scales.SMOKE_REPLICATED
  for run in runs_lib.make_plan(scale):
    record = json.loads((replicated / "results" / scale.name / f"{run.name}.json").read_text())
    epochs = record["held_out_epochs"]
    assert len(epochs) == scale.overrides["train.epochs"]
    assert all(len(e["output"]) == scale.held_out for e in epochs)
    logged = [json.loads(line) for line in
              (replicated / "runs" / run.name / "metrics.jsonl").read_text().splitlines()]
    logged = [r["held_out_output_loss_per_example"] for r in logged
              if "held_out_output_loss_per_example" in r]
    present = [[v for v in e["output"] if v is not None] for e in epochs]
    assert logged == pytest.approx([sum(p) / len(p) for p in present])
    assert record["held_out"]["lima"]["output"] == epochs[-1]["output"]
  # The last epoch's file (the model in memory) is the saved model's held-out losses: the
  # checkpoint loaded as any evaluation loads it, scored again.
  import ml_collections  # pylint: disable=g-import-not-at-top
  from im_jax.convert.load import load_pretrained  # pylint: disable=g-import-not-at-top
  from im_jax.run import settings  # pylint: disable=g-import-not-at-top
  from im_jax.study import evaluation, runner, subsets  # pylint: disable=g-import-not-at-top

  workdir = replicated / "runs" / run.name
  c = settings.load(ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text())))
  mut = runner._mut_from_loaded(load_pretrained(str(workdir), **runner.eval_options(c)))
  held = subsets.load_split("lima", scale.held_out, shared_data_dir).held_out
  again = evaluation.example_losses(mut, held, c.data.max_seq_len, c.eval.batch_size,
                                    c.loss.chunk_size)["output"]
  assert [v is None for v in again] == [v is None for v in epochs[-1]["output"]]
  assert [v for v in again if v is not None] == pytest.approx(
      [v for v in epochs[-1]["output"] if v is not None], rel=1e-5, abs=1e-6)


@pytest.mark.slow  # runs the study
def test_the_control_trains_each_instruction_alone(replicated):
  """it_instr's second source: every example's instruction without its reply, kept and
  weighted (the IT source alone would drop such examples)."""
  scale = scales.SMOKE_REPLICATED
  control = next(r for r in runs_lib.make_plan(scale) if r.method == runs_lib.INSTRUCTIONS_ONLY)
  data = replicated / "data" / f"{control.subset.name}.jsonl"
  pairs = [json.loads(line) for line in data.read_text().splitlines()]
  alone = [json.loads(line) for line in
           runs_lib.instructions_file(data).read_text().splitlines()]
  by_id = {p["id"]: p for p in pairs}
  assert [a["messages"] for a in alone] == [
      [m for m in by_id[a["id"].removesuffix("/instruction")]["messages"]
       if m["role"] != "assistant"] for a in alone]
  record = json.loads((replicated / "results" / scale.name / f"{control.name}.json").read_text())
  it = json.loads((replicated / "results" / scale.name /
                   f"{control.subset.name}_it.json").read_text())
  # only the instructions of the examples IT keeps (one example each, read once an epoch)
  kept_ids = {p["id"] + "/instruction" for p in pairs}
  assert {a["id"] for a in alone} <= kept_ids
  assert len(alone) == it["data_stats"]["kept"] == record["control"]["instructions"]
  assert record["data_stats"]["kept"] == 2 * it["data_stats"]["kept"]
  # each weighs IM's mean share of instruction tokens, as the run's config says
  share = record["control"]["example_weight"]
  assert 0 < share < 1
  config = json.loads((replicated / "runs" / control.name / "config.json").read_text())
  assert f"@example_weight={share:.6g}@" in config["data"]["train"]


@pytest.mark.slow  # runs the study
def test_result_keys_are_those_the_study_stored(replicated, shared_data_dir):
  from tests import test_study_rebuild  # pylint: disable=g-import-not-at-top

  scale = scales.SMOKE_REPLICATED
  test_study_rebuild.assert_result_keys_are_stored(replicated / "results" / scale.name, scale,
                                                   shared_data_dir, replicated)


def test_the_pilot_sizing_rule():
  """docs/study_plan.md: 9 runs of the pilot's mean time + 10 min must fit 5.5 h and each run
  45 min, else 32 examples; no upturn in IT's held-out loss doubles the epochs."""
  from im_jax.study import sizing  # pylint: disable=g-import-not-at-top

  def record(seconds, losses=()):
    return {"seconds": seconds, "epochs": [{"held_out_output_loss": v} for v in losses]}

  turns_up = (2.0, 1.9, 1.95)
  keep = sizing.pilot_decision(record(2000, turns_up), record(2100), 9, 10, 64)
  assert (keep["decision"], keep["it_best_epoch"], keep["size"]) == ("keep the design", 2, 64)
  too_slow = sizing.pilot_decision(record(2600, turns_up), record(2600), 9, 10, 64)
  assert (too_slow["size"], too_slow["epochs"]) == (32, 10)  # 9 x 43 min > 5.5 h
  flat = sizing.pilot_decision(record(1000, (2.0, 1.9, 1.85)), record(1000), 9, 10, 64)
  assert (flat["it_overfits"], flat["size"], flat["epochs"]) == (False, 64, 20)
  # already at 32 and still over the budget (or the run limit): no decision to go on with
  over = sizing.pilot_decision(record(2900, turns_up), record(2900), 9, 10, 32)
  assert over["decision"] != "keep the design" and not over["fits_in_budget"]
  flat32 = sizing.pilot_decision(record(1500, (2.0, 1.9, 1.85)), record(1500), 9, 10, 32)
  assert flat32["epochs"] == 20 and not flat32["fits_in_budget"]  # 50 min a run > 45


ROOT = pathlib.Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "study2_report"


@functools.cache  # read only by the tests below
def _committed_analysis():
  """The second edition's analysis as the report computes it from the committed results."""
  from im_jax.study import results, second_edition  # pylint: disable=g-import-not-at-top

  records = {k: v for k, v in results.ResultStore(ROOT / "docs" / "study2").all().items()
             if k != "sizing"}
  first = results.ResultStore(ROOT / "docs" / "study").all()
  return second_edition.analyse(records, first), records


def test_committed_report_is_what_the_committed_results_compute():
  """docs/study2_report is the report code's output on docs/study2 and docs/study: a change
  to the statistics or the tables, or an edited result, fails here until it is rebuilt."""
  from im_jax.study import second_edition  # pylint: disable=g-import-not-at-top

  analysis, records = _committed_analysis()
  assert second_edition.replicas(records).keys() == {0, 1, 2}
  assert all(len(runs) == 3 for runs in second_edition.replicas(records).values())
  stored = json.loads((REPORT / "results.json").read_text())
  assert json.loads(json.dumps(analysis, default=second_edition._jsonable)) == stored["analysis"]  # pylint: disable=protected-access
  assert (REPORT / "results.md").read_text() == second_edition.markdown(analysis,
                                                                       stored["header"])
  assert (REPORT / "curves_replicated.png").stat().st_size > 10_000


def _table_rows(markdown: str, section: str) -> list[str]:
  body = markdown.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
  rows = [line for line in body.splitlines() if line.startswith("| ")]
  return rows[1:]  # the header row


def test_docs_study_shows_the_second_edition_as_committed():
  """Every table row of docs/study.md's second edition is the committed report's."""
  from im_jax.study import second_edition  # pylint: disable=g-import-not-at-top

  analysis, _ = _committed_analysis()
  md = second_edition.markdown(analysis, {"scale": "replicated"})
  doc = (ROOT / "docs" / "study.md").read_text()
  sections = ("Claims", "The first edition's cells, re-read", "Held-out output loss by epoch",
              "Overfitting per run", "Train output loss by epoch", "Memorisation")
  for section in sections:
    rows = _table_rows(md, section)
    assert rows, section
    for row in rows:
      assert row in doc, f"{section}: {row}"


def test_docs_study_prose_numbers_are_the_committed_results(shared_data_dir):
  """The numbers docs/study.md's sentences cite, recomputed from the committed results."""
  from im_jax.study import orchestrate, results, subsets, writeup  # pylint: disable=g-import-not-at-top

  analysis, records = _committed_analysis()
  cell = analysis["main"]
  over, rows = cell["overfitting"], {r["id"]: r for r in cell["rows"]}
  doc = " ".join((ROOT / "docs" / "study.md").read_text().split())  # sentences over lines
  cited = []
  for claim in ("C1", "C3", "C4", "C6"):
    d = rows[claim]["per_example"]
    cited += [f"{d['mean']:+.4f}", f"[{d['mean_low']:+.4f}, {d['mean_high']:+.4f}]",
              ", ".join(f"{v:+.4f}" for v in rows[claim]["runs"]["values"]),
              f"{claim}): {rows[claim]['verdict']}"]
  gaps = np.mean([np.subtract(over["it"][r]["curve"], over["im"][r]["curve"])
                  for r in cell["replicas"]], axis=0)
  cited.append(f"{gaps[1]:.4f} after epoch 1, {gaps[3]:.4f} at epoch 3")
  cited.append(f"and {gaps[10]:.4f} after epoch 10")
  assert all(o["best_epoch"] == 3 for m in over for o in over[m].values())
  # "rises every epoch after it"
  assert all(np.all(np.diff(o["curve"][3:]) > 0) for o in over["it"].values())
  rise = {m: np.mean([o["amount"] for o in over[m].values()]) for m in over}
  cited.append(f"IT's held-out loss rises by {rise['it']:.4f} and IM's by {rise['im']:.4f}")
  cited.append(f"IM's rise is {rise['im'] / rise['it']:.0%} of IT's")
  cited.append(f"IM's best, {np.mean([o['curve'][3] for o in over['im'].values()]):.4f}")
  shares = [(over["it"][r]["curve"][-1] - over["it_instr"][r]["curve"][-1]) /
            (over["it"][r]["curve"][-1] - over["im"][r]["curve"][-1]) for r in cell["replicas"]]
  assert all(0 < s < 1 for s in shares)  # "between IT's and IM's in every replica"
  cited.append(", ".join(f"{s:.0%}" for s in shares) + " of IM's gain")
  train_last = {m: np.mean([c[-1] for c in cell["train_curves"][m].values()]) for m in over}
  assert train_last["it"] < train_last["it_instr"] < train_last["im"]
  cited.append(f"({train_last['it_instr']:.4f} after epoch 10, between IT's "
               f"{train_last['it']:.4f} and IM's {train_last['im']:.4f})")
  cited.append(f"({gaps[10] - gaps[3]:+.4f} from epoch 3 to 10, after {gaps[3] - gaps[1]:+.4f} "
               "from epoch 1 to 3)")
  # out of distribution: "IM is lower than IT on both in replicas 1 and 2, higher in replica 0"
  other = cell["other_held_out"]
  for dataset in ("alpaca5k", "dolly3k"):
    lower = [i < t for i, t in zip(other["im"][dataset], other["it"][dataset])]
    assert lower == [False, True, True], dataset
  cited.append(f"{sum(r.get('seconds', 0) for r in records.values()):,.0f} s (3.9 h)")
  controls = sorted((r for r in records.values() if r.get("method") == "it_instr"),
                    key=lambda r: r["seed"])
  cited.append(", ".join(f"{r['control']['example_weight']:.3f}" for r in controls))
  train = next(r for r in cell["rows"] if r["claim"].startswith("IM's train"))
  cited.append(f"{-train['runs']['mean']:.4f} nats on average over the runs")
  memo = cell["memorisation"]
  cited.append(f"({memo['im']['sentence_bleu']:.2f} vs {memo['it']['sentence_bleu']:.2f})")
  cited.append(f"({memo['im']['corpus_bleu']:.2f} vs {memo['it']['corpus_bleu']:.2f})")
  cited.append(f"({memo['im']['rouge_l']:.4f} vs {memo['it']['rouge_l']:.4f})")
  cited.append(f"(corpus BLEU {memo['base']['corpus_bleu']:.2f})")
  cited.append(" and ".join(f"{v:+.2f}" for v in rows["C5"]["runs"]["values"]))
  # the first edition's figures in the re-read's prose
  first = {r["id"]: r["per_example"] for r in analysis["first_edition"]}
  alpaca = first["E1 alpaca5k_n64"]
  cited.append(f"its median is {alpaca['median']:+.4f} and IM is better on "
               f"{alpaca['positive_fraction']:.0%}")
  first_records = results.ResultStore(ROOT / "docs" / "study").all()
  report = writeup.analyse({k: v for k, v in first_records.items()
                            if k != "sizing"})["memorisation"]
  bleu = {d: [report[f"{d}:{m}"]["bleu"] for m in ("it", "im")] for d in ("alpaca5k", "lima")}
  cited.append(f"is {bleu['alpaca5k'][0]:.2f} (IT) vs {bleu['alpaca5k'][1]:.2f} (IM)")
  cited.append(f"(LIMA: {bleu['lima'][0]:.2f} vs {bleu['lima'][1]:.2f})")
  it, im = first_records["alpaca5k_n64_it"], first_records["alpaca5k_n64_im"]
  alpaca_gaps = np.subtract(it["held_out"]["alpaca5k"]["output"],
                            im["held_out"]["alpaca5k"]["output"])
  cited.append(f"carries {alpaca_gaps.min() / alpaca_gaps.size:+.4f} of the "
               f"{alpaca_gaps.mean():+.4f}")
  # the control's multi-turn examples, per subset
  split = orchestrate.load_splits(scales.REPLICATED.held_out, str(shared_data_dir))["lima"]
  n = scales.REPLICATED.overfit_size
  multi = [sum(sum(m.role == "user" for m in c.messages) > 1
               for c in subsets.first(split, n, r * n)) for r in cell["replicas"]]
  cited.append(f"({multi[0]}, {multi[1]} and {multi[2]} of the three subsets' {n})")
  for text in cited:
    assert " ".join(text.split()) in doc, text
