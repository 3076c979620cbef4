"""`python -m im_jax.report`: figure, Markdown summary and its numbers, bad workdirs."""

import json
import pathlib

import pytest

from im_jax import report
from im_jax.train import metrics_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(workdir: pathlib.Path, records: list[dict]) -> pathlib.Path:
  workdir.mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return workdir


def _train(step, loss, out, inst, tokens, tps):
  return {"step": step, "loss": loss, "output_loss": out, "instruction_loss": inst,
          "tokens": tokens, "tokens_per_sec": tps, "lr": 1e-5}


def _eval(step, out, inst):
  return {"step": step, "eval_loss": out, "eval_output_loss": out, "eval_instruction_loss": inst}


@pytest.fixture
def two_runs(tmp_path):
  # IT: train output loss falls lower, held-out output loss ends higher (the paper's picture).
  it = _write_run(tmp_path / "lima_it", [
      _train(1, 2.0, 2.0, 3.0, 1000, 100.0), _eval(2, 2.1, 3.0),
      _train(2, 1.5, 1.5, 3.2, 1000, 500.0), _train(3, 1.0, 1.0, 3.4, 3000, 1000.0),
      _eval(3, 1.9, 3.5)])
  im = _write_run(tmp_path / "lima_im", [
      _train(1, 2.5, 2.0, 3.0, 1000, 100.0), _train(2, 2.0, 1.7, 2.5, 2000, 1000.0),
      _eval(2, 2.0, 2.6), _train(3, 1.75, 1.5, 2.0, 2000, 500.0), _eval(3, 1.8, 2.1)])
  return it, im


def test_report_writes_png_and_table(two_runs, tmp_path, capsys):
  it, im = two_runs
  out = tmp_path / "plots" / "lima.png"
  assert report.main(["--workdir", str(it), str(im), "--out", str(out)]) == 0
  assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
  table = (tmp_path / "plots" / "lima.md").read_text()
  assert capsys.readouterr().out == table
  rows = [line.split("|")[1:-1] for line in table.splitlines()]
  header, rows = [c.strip() for c in rows[0]], {r[0].strip(): [c.strip() for c in r] for r in rows[2:]}
  assert header[:2] == ["run", "steps"] and "tokens seen" in header and "tokens/s" in header
  # Final train losses at step 3, final eval losses, tokens summed, throughput: tokens over
  # time of the intervals after the first (which holds the compilation).
  assert rows["lima_it"] == ["lima_it", "3", "1.0000", "1.0000", "3.4000", "1.9000", "3.5000",
                             "5,000", "800"]  # 4000 tokens / (2 s + 3 s)
  assert rows["lima_im"] == ["lima_im", "3", "1.7500", "1.5000", "2.0000", "1.8000", "2.1000",
                             "5,000", "667"]  # 4000 tokens / (2 s + 4 s)


def test_labels_missing_eval_and_single_record(tmp_path):
  one = _write_run(tmp_path / "a", [_train(5, 1.0, 0.5, 2.0, 100, 50.0)])
  png, md, table = report.report([one], tmp_path / "one.png", labels=["IT (lima)"])
  assert png.is_file() and md == tmp_path / "one.md"
  row = table.splitlines()[2]
  assert row.startswith("| IT (lima) | 5 | 1.0000 |") and "n/a | n/a | 100 | 50 |" in row


def test_the_paper_measure_per_example_is_reported_where_logged(tmp_path):
  # per-token output loss 1.0, per-example 1.25: the report takes the paper's (per example)
  run = _write_run(tmp_path / "a", [
      {**_train(1, 1.0, 1.0, 2.0, 100, 50.0), "output_loss_per_example": 1.25,
       "instruction_loss_per_example": 2.5},
      {**_eval(1, 1.0, 2.0), "eval_output_loss_per_example": 1.5}])
  summary = report.summarize(report.load_run(run))
  assert (summary.train_output_loss, summary.train_instruction_loss) == (1.25, 2.5)
  assert (summary.eval_output_loss, summary.eval_instruction_loss) == (1.5, 2.0)


@pytest.mark.parametrize("content, match", [
    (None, "metrics.jsonl: not found"),
    ("", "no metrics records yet"),
    ('{"step": 1, "loss": 1.0}\n{"step": 2,\n{"step": 3, "loss": 0.5}\n',
     "metrics.jsonl:2: not JSON"),  # a damaged middle line; a cut-off last one is skipped
    ('[1, 2]\n', "metrics.jsonl:1: a metrics record must be an object"),
])
def test_bad_workdir_is_one_error_line_exit_2(tmp_path, capsys, content, match):
  good = _write_run(tmp_path / "good", [_train(1, 1.0, 1.0, 1.0, 10, 1.0)])
  bad = tmp_path / "bad"
  bad.mkdir()
  if content is not None:
    (bad / "metrics.jsonl").write_text(content)
  out = tmp_path / "r.png"
  assert report.main(["--workdir", str(good), "--workdir", str(bad), "--out", str(out)]) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and not out.exists()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]


def test_a_cut_off_last_line_is_skipped_as_training_resume_skips_it(tmp_path):
  run = _write_run(tmp_path / "a", [_train(1, 1.0, 1.0, 2.0, 100, 50.0),
                                    _train(2, 0.5, 0.5, 1.5, 100, 50.0)])
  with (run / "metrics.jsonl").open("a") as f:
    f.write('{"step": 3, "loss": 0.2')  # a training run killed mid-write
  summary = report.summarize(report.load_run(run))
  assert (summary.steps, summary.train_loss) == (2, 0.5)


def test_resume_reads_metrics_jsonl_with_the_same_reader(tmp_path):
  run = _write_run(tmp_path / "a", [_train(1, 1.0, 1.0, 2.0, 100, 50.0),
                                    _train(2, 0.5, 0.5, 1.5, 100, 50.0)])
  with (run / "metrics.jsonl").open("a") as f:
    f.write('{"step": 3, "loss": 0.2')  # cut off: dropped with the steps past the checkpoint
  metrics_log.MetricsLogger(run, total_steps=9, start_step=1, tensorboard=False,
                            progress=False).close()
  assert [r["step"] for r in metrics_log.read_metrics(run)] == [1]
  (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
  with pytest.raises(metrics_log.MetricsFileError, match=r"metrics.jsonl:2: not JSON"):
    metrics_log.MetricsLogger(run, total_steps=9, start_step=1, tensorboard=False,
                              progress=False)


def test_label_count_must_match(two_runs, tmp_path, capsys):
  assert report.main(["--workdir", *map(str, two_runs), "--label", "only one",
                      "--out", str(tmp_path / "r.png")]) == 2
  assert "1 --label values for 2 workdirs" in capsys.readouterr().err


def test_labels_after_one_flag_like_workdirs_and_a_bad_format_is_one_line(two_runs, tmp_path,
                                                                           capsys):
  out = tmp_path / "r.png"
  assert report.main(["--workdir", *map(str, two_runs), "--label", "IT", "IM",
                      "--out", str(out)]) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[2].startswith("| IT |") and table[3].startswith("| IM |")
  assert report.main(["--workdir", *map(str, two_runs), "--out", str(tmp_path / "r.xyz")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: Format 'xyz' is not supported") and "\n" not in err


def test_harness_scores_side_by_side_with_stderr(tmp_path):
  """Benchmark scores logged in training (eval.harness_tasks): the last value per run, with
  lm-eval's standard error; a metric one run lacks is n/a."""
  it = _write_run(tmp_path / "it", [
      _train(1, 2.0, 2.0, 3.0, 100, 10.0),
      {"step": 1, "harness/arc_easy/acc": 0.25, "harness/arc_easy/acc_stderr": 0.04},
      {"step": 2, "harness/arc_easy/acc": 0.3125, "harness/arc_easy/acc_stderr": 0.0125}])
  im = _write_run(tmp_path / "im", [
      _train(1, 2.0, 2.0, 3.0, 100, 10.0),
      {"step": 2, "harness/arc_easy/acc": 0.375, "harness/arc_easy/acc_stderr": 0.02,
       "harness/lambada_openai/perplexity": 40.5}])
  _, _, table = report.report([it, im], tmp_path / "r.png", labels=["IT", "IM"])
  benchmarks = table[table.index("| benchmark"):].splitlines()
  assert benchmarks == ["| benchmark (lm-eval) | IT | IM |", "| --- | ---: | ---: |",
                        "| arc_easy/acc | 0.3125 ± 0.0125 | 0.3750 ± 0.0200 |",
                        "| lambada_openai/perplexity | n/a | 40.5000 |"]
  _, _, plain = report.report([tmp_path / "it"], tmp_path / "p.png")
  assert "benchmark" in plain  # a run with scores; none: no second table
  assert "benchmark" not in report.report([_write_run(tmp_path / "x", [
      _train(1, 2.0, 2.0, 3.0, 100, 10.0)])], tmp_path / "x.png")[2]


def test_harness_results_files_join_the_table(tmp_path, capsys):
  """`eval harness --out` files (lm-eval's results), one per workdir, add their scores."""
  runs = [_write_run(tmp_path / name, [_train(1, 2.0, 2.0, 3.0, 100, 10.0)])
          for name in ("it", "im")]
  files = []
  for name, acc in (("it", 0.5), ("im", 0.625)):
    files.append(tmp_path / f"{name}.json")
    files[-1].write_text(json.dumps({"results": {"piqa": {
        "alias": "piqa", "acc,none": acc, "acc_stderr,none": 0.01, "acc_norm,none": "N/A"}}}))
  args = ["--workdir", *map(str, runs), "--out", str(tmp_path / "r.png"), "--label", "IT", "IM"]
  assert report.main(args + ["--harness", *map(str, files)]) == 0
  assert "| piqa/acc | 0.5000 ± 0.0100 | 0.6250 ± 0.0100 |" in capsys.readouterr().out
  assert report.main(args + ["--harness", str(files[0])]) == 2  # one per workdir
  files[1].write_text("{}")
  assert report.main(args + ["--harness", *map(str, files)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: ") and "no lm-eval `results`" in err[-1]
