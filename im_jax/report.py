"""Loss curves and a summary table for one or several training runs.

    python -m im_jax.report --workdir DIR [DIR ...] --out FILE.png [--label NAME [NAME ...]]
        [--harness RESULTS.json [RESULTS.json ...]]

Reads each workdir's `metrics.jsonl` and draws the paper's IT-vs-IM overfitting picture:
output loss and instruction loss over steps, each as the paper measures it (every example's
mean over its output, or instruction, tokens, averaged over examples: `*_loss_per_example`;
workdirs that predate it fall back to the per-token `*_loss`), on train (left) and on the
held-out split (right). With IT the train output loss falls lower; with IM the held-out output loss
stays lower. The Markdown summary (final losses, tokens seen, throughput) is printed to
stdout and written next to the PNG as FILE.md. Runs that scored lm-eval tasks in training
(`eval.harness_tasks`) get a second table: each `harness/TASK/METRIC`'s last value per run,
side by side, with its standard error as lm-eval reports it; `--harness FILE ...` (one
`eval harness --out` file per workdir) adds scores measured after training.

A missing or empty `metrics.jsonl`, a label count that differs from the workdir count, or an
--out inside a workdir prints one error line and exits with status 2.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import tempfile
from typing import Any, Sequence

from im_jax import cli, output_guard, paths
from im_jax.train import metrics_log

EVAL_PREFIX = "eval_"
HARNESS_PREFIX = "harness/"  # lm-eval scores logged in training (im_jax.eval.harness)
STDERR = "_stderr"

Record = dict[str, Any]


class ReportError(ValueError):
  """A run that cannot be reported; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class Run:
  label: str
  train: list[Record]  # logged train steps (records with a "loss"), in step order
  eval: list[Record]  # held-out evaluations (records with "eval_*" keys), in step order
  # benchmark scores (eval.harness_tasks): each harness/TASK/METRIC's last logged value
  harness: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Summary:
  label: str
  steps: int
  train_loss: float | None
  train_output_loss: float | None
  train_instruction_loss: float | None
  eval_output_loss: float | None
  eval_instruction_loss: float | None
  tokens: int | None  # non-padding tokens seen in training (sum of the records' "tokens")
  tokens_per_sec: float | None


def load_run(workdir: str | pathlib.Path, label: str | None = None) -> Run:
  """Reads `workdir/metrics.jsonl`; a missing, empty or unreadable file is a ReportError."""
  try:
    paths.check_ready(workdir, what="--workdir")
    workdir = paths.path(workdir)  # a local folder or gs://BUCKET/...
  except paths.CloudError as e:
    raise ReportError(str(e)) from None
  path = workdir / metrics_log.METRICS_FILE
  if not path.is_file():
    raise ReportError(f"{path}: not found (is {workdir} a training workdir?)")
  try:
    records = [record for _, record in metrics_log.read_records(path)]
  except metrics_log.MetricsFileError as e:
    raise ReportError(str(e)) from None
  train = sorted((r for r in records if "loss" in r), key=lambda r: r["step"])
  evals = sorted((r for r in records if any(k.startswith(EVAL_PREFIX) for k in r)),
                 key=lambda r: r["step"])
  harness = {}
  for record in sorted(records, key=lambda r: r["step"]):
    harness.update({k: float(v) for k, v in record.items() if k.startswith(HARNESS_PREFIX)})
  if not train and not evals:
    raise ReportError(f"{path}: no metrics records yet")
  # resolve() so "." and "runs/x/" get a real name.
  return Run(label or (workdir.name if paths.is_remote(workdir) else workdir.resolve().name),
             train, evals, harness)


PER_EXAMPLE = "_per_example"


def _value(record: Record, key: str) -> float | None:
  """The paper's measure: a group loss's mean over examples (`KEY_per_example`), else the
  pooled per-token `KEY` (workdirs from before it was logged)."""
  for name in (key + PER_EXAMPLE, key):
    if name in record:
      return float(record[name])
  return None


def _last(records: Sequence[Record], key: str) -> float | None:
  for record in reversed(records):
    value = _value(record, key)
    if value is not None:
      return value
  return None


def summarize(run: Run) -> Summary:
  """Final losses, tokens seen and throughput of one run.

  Throughput is total tokens over total time of the logged intervals (each interval's time is
  tokens / tokens_per_sec). The first interval is left out when there are others: it holds
  the compilation.
  """
  timed = [r for r in run.train if r.get("tokens") and r.get("tokens_per_sec")]
  if len(timed) > 1:
    timed = timed[1:]
  seconds = sum(r["tokens"] / r["tokens_per_sec"] for r in timed)
  with_tokens = [r["tokens"] for r in run.train if "tokens" in r]
  steps = [r["step"] for r in run.train + run.eval]
  return Summary(
      label=run.label, steps=int(max(steps)),
      train_loss=_last(run.train, "loss"),
      train_output_loss=_last(run.train, "output_loss"),
      train_instruction_loss=_last(run.train, "instruction_loss"),
      eval_output_loss=_last(run.eval, "eval_output_loss"),
      eval_instruction_loss=_last(run.eval, "eval_instruction_loss"),
      tokens=int(sum(with_tokens)) if with_tokens else None,
      tokens_per_sec=sum(r["tokens"] for r in timed) / seconds if seconds > 0 else None)


_COLUMNS = (
    ("run", "label", "{}"),
    ("steps", "steps", "{:d}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("train output loss", "train_output_loss", "{:.4f}"),
    ("train instruction loss", "train_instruction_loss", "{:.4f}"),
    ("eval output loss", "eval_output_loss", "{:.4f}"),
    ("eval instruction loss", "eval_instruction_loss", "{:.4f}"),
    ("tokens seen", "tokens", "{:,d}"),
    ("tokens/s", "tokens_per_sec", "{:,.0f}"),
)


def _cell(value: float | None, fmt: str = "{:.4f}") -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  return fmt.format(value).replace("|", "\\|")


def markdown_table(summaries: Sequence[Summary]) -> str:
  """One row per run; "n/a" where a run has no such metric (e.g. no held-out split)."""
  def cell(summary: Summary, field: str, fmt: str) -> str:
    return _cell(getattr(summary, field), fmt)

  lines = ["| " + " | ".join(name for name, _, _ in _COLUMNS) + " |",
           "| " + " | ".join("---" if f == "label" else "---:" for _, f, _ in _COLUMNS) + " |"]
  for s in summaries:
    lines.append("| " + " | ".join(cell(s, f, fmt) for _, f, fmt in _COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def harness_table(runs: Sequence[Run]) -> str:
  """Benchmark scores side by side, one row per TASK/METRIC, one column per run: the last
  logged value with lm-eval's standard error (`value ± stderr`); "" when no run has any."""
  metrics = sorted({k for run in runs for k in run.harness if not k.endswith(STDERR)})
  if not metrics:
    return ""

  def cell(run: Run, key: str) -> str:
    if key not in run.harness:
      return "n/a"
    stderr = run.harness.get(key + STDERR)
    return f"{run.harness[key]:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")

  lines = ["| benchmark (lm-eval) | " + " | ".join(run.label for run in runs) + " |",
           "| --- | " + " | ".join("---:" for _ in runs) + " |"]
  for key in metrics:
    name = key.removeprefix(HARNESS_PREFIX).replace("|", "\\|")
    lines.append(f"| {name} | " + " | ".join(cell(run, key) for run in runs) + " |")
  return "\n".join(lines) + "\n"


SOURCE_KEY = "output_loss_per_example/"  # a mixture's per-source metrics (train.loss)


def source_names(run: Run) -> list[str]:
  """The sources of a mixture run, in the order its records name them."""
  names: dict[str, None] = {}
  for record in run.train + run.eval:
    for key in record:
      if key.removeprefix(EVAL_PREFIX).startswith(SOURCE_KEY):
        names[key.removeprefix(EVAL_PREFIX)[len(SOURCE_KEY):]] = None
  return list(names)


def _last_of_source(records: Sequence[Record], prefix: str, group: str,
                    name: str) -> float | None:
  """The latest value of a source's group loss, from a record that saw its examples (a
  training batch may hold none of a source: it then logs 0 over 0 examples)."""
  for record in reversed(records):
    if record.get(f"{prefix}{group}_examples/{name}", 0) > 0:
      return float(record[f"{prefix}{group}_loss_per_example/{name}"])
  return None


def source_table(runs: Sequence[Run]) -> str:
  """Per run and source of a mixture, the final per-example output and instruction losses
  (train: the last logged batch holding the source; eval: the held-out split); "" when no
  run is a mixture of several sources."""
  lines = []
  for run in runs:
    for name in source_names(run):
      values = [_last_of_source(run.train, "", g, name) for g in ("output", "instruction")]
      values += [_last_of_source(run.eval, EVAL_PREFIX, g, name)
                 for g in ("output", "instruction")]
      lines.append(f"| {_cell(run.label, '{}')} | {_cell(name, '{}')} | "
                   + " | ".join(_cell(v) for v in values) + " |")
  if not lines:
    return ""
  return ("| run | source | train output loss | train instruction loss | eval output loss | "
          "eval instruction loss |\n| --- | --- | ---: | ---: | ---: | ---: |\n"
          + "\n".join(lines) + "\n")


# (row, column) of each panel: output loss on top, instruction loss below; train | eval.
_PANELS = (
    (0, 0, "output_loss", "train output loss"),
    (0, 1, "eval_output_loss", "held-out output loss"),
    (1, 0, "instruction_loss", "train instruction loss"),
    (1, 1, "eval_instruction_loss", "held-out instruction loss"),
)


def plot(runs: Sequence[Run], out: str | pathlib.Path) -> pathlib.Path:
  """Writes the 2x2 loss figure; each run keeps its colour in every panel."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")  # files only: no display on servers
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True, squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for row, col, key, title in _PANELS:
    ax = axes[row][col]
    records_of = (lambda run: run.eval) if key.startswith(EVAL_PREFIX) else (lambda run: run.train)
    drawn = False
    for i, run in enumerate(runs):
      points = [(r["step"], _value(r, key)) for r in records_of(run)
                if _value(r, key) is not None]
      if not points:
        continue
      steps, values = zip(*points)
      # Eval is sparse (often one point per run): markers keep single points visible.
      ax.plot(steps, values, color=colors[i % len(colors)], label=run.label,
              marker="o" if key.startswith(EVAL_PREFIX) else None, markersize=4)
      drawn = True
    if not drawn:
      ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes,
              color="gray")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if row == 1:
      ax.set_xlabel("step")
    if col == 0:
      ax.set_ylabel("cross-entropy (nats/token)")
  handles, labels = [], []
  for ax in axes.flat:  # one legend for the figure, from whichever panels have lines
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  if handles:
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 5), frameon=False)
  fig.tight_layout(rect=(0, 0, 1, 0.94))
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def harness_scores(path: str | pathlib.Path) -> dict[str, float]:
  """`harness/TASK/METRIC` scores from an `eval harness --out` file (lm-eval's results)."""
  from im_jax.eval.harness import flat_metrics  # pylint: disable=g-import-not-at-top

  try:
    results = json.loads(paths.path(path).read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError) as e:
    raise ReportError(f"{path}: not a readable JSON file ({e})") from None
  if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
    raise ReportError(f"{path}: no lm-eval `results` (write it with eval harness --out)")
  return flat_metrics(results)


def report(workdirs: Sequence[str | pathlib.Path], out: str | pathlib.Path,
           labels: Sequence[str] | None = None,
           harness: Sequence[str | pathlib.Path] | None = None
           ) -> tuple[pathlib.Path, pathlib.Path, str]:
  """Plots the runs to `out` and writes the table to `out` with a .md suffix. `harness`: one
  `eval harness --out` file per workdir, whose scores join (and replace) those it logged."""
  if labels and len(labels) != len(workdirs):
    raise ReportError(f"{len(labels)} --label values for {len(workdirs)} workdirs")
  if harness and len(harness) != len(workdirs):
    raise ReportError(f"{len(harness)} --harness files for {len(workdirs)} workdirs")
  remote = paths.is_remote(out)
  md = paths.path(out).with_suffix(".md") if remote else pathlib.Path(out).with_suffix(".md")
  try:  # a report is never written over (or into) the runs it reads
    for path in (out, md):
      output_guard.check_not_input(str(path), [*workdirs, *(harness or [])])
      if not remote:
        output_guard.check_writable_file(path)
    if remote:
      paths.check_ready(out, what="--out", write=True)
  except (output_guard.UnsafeOutput, paths.CloudError) as e:
    raise ReportError(str(e)) from None
  runs = [load_run(w, labels[i] if labels else None) for i, w in enumerate(workdirs)]
  if harness:
    runs = [dataclasses.replace(run, harness={**run.harness, **harness_scores(path)})
            for run, path in zip(runs, harness)]
  table = markdown_table([summarize(run) for run in runs])
  benchmarks = harness_table(runs)
  table += "\n" + benchmarks if benchmarks else ""
  per_source = source_table(runs)
  if per_source:
    table += "\nPer source (per-example losses):\n\n" + per_source
  if not remote:
    png = plot(runs, out)
    md.write_text(table, encoding="utf-8")
    return png, md, table
  with tempfile.TemporaryDirectory() as tmp:  # a gs:// --out: drawn here, then uploaded
    local = plot(runs, pathlib.Path(tmp) / pathlib.PurePosixPath(str(out)).name)
    paths.upload_tree(local, out)
  paths.write_text(md, table)
  return paths.path(out), md, table


def _parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m im_jax.report",
                              description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", nargs="+", action="extend", required=True,
                      help="training run folders (one flag with several, or repeated)")
  parser.add_argument("--out", required=True, help="the PNG to write (the table goes to .md)")
  parser.add_argument("--label", nargs="+", action="extend",
                      help="legend names, one per workdir in order (one flag with several, or "
                      "repeated; default: each workdir's folder name)")
  parser.add_argument("--harness", nargs="+", action="extend",
                      help="`eval harness --out` results, one per workdir in order: their "
                      "benchmark scores join the table")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    png, md, table = report(args.workdir, args.out, args.label, args.harness)
  except (ReportError, ValueError, OSError) as e:  # e.g. an image format matplotlib lacks
    return cli.report(e)
  print(table, end="")
  print(f"wrote {png} and {md}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
