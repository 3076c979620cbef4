"""The study's report: OUT/results.json, OUT/results.md (tables) and PNG plots.

Everything is computed from the results folder (one file per run and the baseline), so the
report can be rebuilt from committed results on any machine. Gains are IT minus the other
method on the paper's held-out measure (positive: the other method, e.g. IM, has the lower
held-out output loss), paired per example with a bootstrap interval.
"""

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

from im_jax.study import claims, scales, statistics

Records = dict[str, dict[str, Any]]

NOISE_NOTE = (
    "**Read this first.** At this budget (small subsets, few updates, one seed but for the "
    "headline comparison) the effects "
    "the paper reports may be within noise. Every comparison below is therefore a paired "
    "per-example difference on the same held-out examples with a 95% bootstrap interval; "
    "an interval that contains 0 shows no effect at this size.")
SMOKE_NOTE = ("The `smoke` scale trains a random-init 2-layer model for seconds: its numbers "
              "test that every experiment and artefact is produced, not the paper's claims.")
CPU_NOTE = (
    "The `cpu` model is **SmolLM2-135M-Instruct, which is already instruction-tuned**: IT and "
    "IM fine-tune a model that has been through instruction tuning, not a base model as in "
    "the paper, so both start from a model already trained on replies of this kind and the "
    "room for IM's regularising effect may be smaller (the untrained row shows where they "
    "start). Its weights are **dequantized from a Q4_1 GGUF** "
    "(4-bit blocks), the only copy available offline: the starting point differs from the "
    "released float weights by the quantization error, the same for every method, so the "
    "comparisons stay paired and fair, but absolute losses are not those of the release.")
NOT_RUN = "Not run in this invocation (see `--only`).\n"


def _fmt(value: float | None, digits: int = 4) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _runs(records: Records, experiment: str) -> list[dict[str, Any]]:
  """The runs of an experiment, methods in the report's order (it, im, then the others)."""
  order = scales.CORE_METHODS + scales.EXTRA_METHODS
  runs = [r for name, r in records.items() if not name.startswith("baseline") and
          experiment in r.get("experiments", ())]
  return sorted(runs, key=lambda r: (order.index(r["method"]) if r["method"] in order
                                     else len(order), r["method"]))


def _diff(a: Sequence, b: Sequence) -> dict[str, Any]:
  return statistics.paired_difference(a, b).as_dict()


def analyse(records: Records) -> dict[str, Any]:
  """The numbers of every table, from the result records."""
  bases = {name.removeprefix("baseline_"): r for name, r in records.items()
           if name.startswith("baseline_")}
  out: dict[str, Any] = {"overfitting": {}, "memorisation": {}, "data_size": [],
                         "length_ratio": []}
  for run in _runs(records, "overfitting"):
    dataset = run["subset"]["dataset"]
    entry = out["overfitting"].setdefault(dataset, {"subset": run["subset"]["name"],
                                                    "methods": {}, "paired": {}})
    entry["methods"][run["method"]] = {
        "train_output_loss": run["train"]["output_mean"],
        "held_out_output_loss": {d: v["output_mean"] for d, v in run["held_out"].items()},
        "epochs": run["epochs"], "tokens": run.get("tokens"),
        "tokens_per_sec": run.get("tokens_per_sec")}
  for dataset, entry in out["overfitting"].items():
    its = next((r for r in _runs(records, "overfitting") if r["method"] == "it"
                and r["subset"]["dataset"] == dataset), None)
    for run in _runs(records, "overfitting"):
      if its is None or run["method"] == "it" or run["subset"]["dataset"] != dataset:
        continue
      entry["paired"][run["method"]] = {
          "held_out": {d: _diff(its["held_out"][d]["output"], run["held_out"][d]["output"])
                       for d in run["held_out"]},
          "train": _diff(its["train"]["output"], run["train"]["output"])}
    if dataset in bases:
      entry["baseline"] = {
          "train_output_loss": bases[dataset].get("train", {}).get("output_mean"),
          "held_out_output_loss": {d: b["held_out"][d]["output_mean"]
                                   for d, b in bases.items()}}
  mem = {r["subset"]["dataset"] + ":" + r["method"]: r for r in _runs(records, "memorisation")}
  for key, run in mem.items():
    m = run["memorisation"]
    out["memorisation"][key] = {
        "bleu": m["bleu"], "sentence_bleu_mean": _mean(m["bleu_per_example"]),
        "rouge_l_mean": _mean(m["rouge_l_per_example"])}
    dataset, method = key.split(":")
    it = mem.get(f"{dataset}:it")
    if method != "it" and it is not None:
      out["memorisation"][key]["paired_vs_it"] = {
          "sentence_bleu": _diff(it["memorisation"]["bleu_per_example"], m["bleu_per_example"]),
          "rouge_l": _diff(it["memorisation"]["rouge_l_per_example"], m["rouge_l_per_example"])}
  out["second_seed"] = {}
  seeds = {r["method"]: r for r in _runs(records, "second_seed")}
  if {"it", "im"} <= set(seeds):
    it, im = seeds["it"], seeds["im"]
    dataset = it["subset"]["dataset"]
    out["second_seed"] = {
        "subset": it["subset"]["name"], "seed": it["seed"],
        "held_out": _diff(it["held_out"][dataset]["output"], im["held_out"][dataset]["output"]),
        "train": _diff(it["train"]["output"], im["train"]["output"])}
  out["data_size"] = _gains(records, "data_size", "size")
  out["length_ratio"] = _gains(records, "length_ratio", "band")
  return out


def _mean(values: Sequence[float]) -> float | None:
  return sum(values) / len(values) if values else None


def _gains(records: Records, experiment: str, by: str) -> list[dict[str, Any]]:
  """IT - IM held-out output loss per subset of an experiment, paired per example."""
  groups: dict[str, dict[str, Any]] = {}
  for run in _runs(records, experiment):
    groups.setdefault(run["subset"]["name"], {})[run["method"]] = run
  rows = []
  for name, methods in groups.items():
    if "it" not in methods or "im" not in methods:
      continue
    it, im = methods["it"], methods["im"]
    dataset = it["subset"]["dataset"]
    a, b = it["held_out"][dataset]["output"], im["held_out"][dataset]["output"]
    rows.append({"subset": name, by: it["subset"]["size" if by == "size" else "band"],
                 "examples": it.get("data_stats", {}).get("kept", it["subset"]["size"]),
                 "length_ratio": it["length_ratio"],
                 "it": it["held_out"][dataset]["output_mean"],
                 "im": im["held_out"][dataset]["output_mean"], "gain": _diff(a, b),
                 # Held-out examples are shared: gains pair across subsets too (claims).
                 "gain_per_example": [x - y if x is not None and y is not None else None
                                      for x, y in zip(a, b)]})
  return sorted(rows, key=lambda r: r["length_ratio"] if by == "band" else r["size"])


def _ci(d: dict[str, Any]) -> str:
  return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def markdown(analysis: dict[str, Any], header: dict[str, Any]) -> str:
  parts = [f"# IM vs IT study: `{header['scale']}` scale\n\n", NOISE_NOTE + "\n\n"]
  if header["scale"] == "smoke":
    parts.append(SMOKE_NOTE + "\n\n")
  if header["scale"] == "cpu":
    parts.append(CPU_NOTE + "\n\n")
  verdicts = claims.verdicts(analysis)
  if verdicts:
    parts.append("## The paper's claims, as these numbers stand\n\n" + _table(
        ["claim", "measured (mean [95% CI])", "verdict"],
        [[v["claim"], v["measured"], v["verdict"]] for v in verdicts]) + "\n")
  parts.append(_table(["setting", "value"], [[k, f"`{v}`" if k == "command" else v]
                                             for k, v in header.items() if k != "reasons"]))
  if header.get("reasons"):
    parts.append("\nScaled down from the paper's recipe, and why:\n\n" +
                 _table(["setting", "reason"], list(header["reasons"].items())))
  parts.append("\n## 1. Overfitting (paper Fig. 3): output loss, the paper's per-example "
               "measure\n\nTrain: the final model on its first training examples; held-out: "
               "the fixed held-out sets (the other datasets are out-of-distribution).\n")
  if not analysis["overfitting"]:
    parts.append("\n" + NOT_RUN)
  for dataset, entry in analysis["overfitting"].items():
    datasets = sorted({d for m in entry["methods"].values() for d in m["held_out_output_loss"]})
    rows = []
    if "baseline" in entry:
      b = entry["baseline"]
      rows.append(["untrained", _fmt(b["train_output_loss"])] +
                  [_fmt(b["held_out_output_loss"].get(d)) for d in datasets])
    for method, m in entry["methods"].items():
      rows.append([method, _fmt(m["train_output_loss"])] +
                  [_fmt(m["held_out_output_loss"].get(d)) for d in datasets])
    parts.append(f"\n### {entry['subset']}\n\n" + _table(
        ["method", "train output loss"] + [f"held-out {d}" for d in datasets], rows))
    paired = [[method, _ci(p["train"])] + [_ci(p["held_out"][d]) for d in datasets]
              for method, p in entry["paired"].items()]
    if paired:
      parts.append("\nIT minus method, per example (mean [95% CI]); the paper expects train "
                   "< 0 and held-out > 0 for IM:\n\n" + _table(
                       ["method", "train"] + [f"held-out {d}" for d in datasets], paired))
    epochs = [[method, e["epoch"], _fmt(e["train_output_loss"]),
               _fmt(e["held_out_output_loss"])]
              for method, m in entry["methods"].items() for e in m["epochs"]]
    parts.append("\nPer epoch (train: mean over the epoch's steps):\n\n" + _table(
        ["method", "epoch", "train output loss", "held-out output loss"], epochs))
  parts.append("\n## 2. Memorisation (paper Table 2): greedy generations on training prompts "
               "vs the training outputs\n\n")
  rows = []
  for key, m in analysis["memorisation"].items():
    p = m.get("paired_vs_it")
    rows.append([key, _fmt(m["bleu"], 2), _fmt(m["sentence_bleu_mean"], 2),
                 _fmt(m["rouge_l_mean"], 4), _ci(p["sentence_bleu"]) if p else "",
                 _ci(p["rouge_l"]) if p else ""])
  parts.append(_table(["dataset:method", "corpus BLEU", "mean sentence BLEU", "mean ROUGE-L",
                       "IT - method, sentence BLEU", "IT - method, ROUGE-L"], rows)
               if rows else NOT_RUN)
  seed = analysis["second_seed"]
  parts.append("\n## Second seed: the LIMA comparison with another seed\n\n")
  parts.append(_table(["subset", "seed", "IT - IM train", "IT - IM held-out"],
                      [[seed["subset"], seed["seed"], _ci(seed["train"]),
                        _ci(seed["held_out"])]]) if seed else NOT_RUN)
  for title, key, column in (("3. Data size (paper Fig. 2)", "data_size", "size"),
                             ("4. Length ratio (paper Fig. 2)", "length_ratio", "band")):
    parts.append(f"\n## {title}: held-out gain of IM = IT - IM output loss\n\n")
    parts.append(_table(
        [column, "examples kept", "length ratio", "IT", "IM", "gain [95% CI]", "share IM better"],
        [[r[column], r["examples"], _fmt(r["length_ratio"], 3), _fmt(r["it"]), _fmt(r["im"]),
          _ci(r["gain"]), _fmt(r["gain"]["positive_fraction"], 2)]
         for r in analysis[key]]) if analysis[key] else NOT_RUN)
  return "".join(parts)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_curves(analysis: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
  """Per overfitting dataset: output loss per epoch, train (solid) and held-out (dashed)."""
  plt = _pyplot()
  written = []
  for dataset, entry in analysis["overfitting"].items():
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, m) in enumerate(entry["methods"].items()):
      color = f"C{i}"
      epochs = [e["epoch"] for e in m["epochs"]]
      ax.plot(epochs, [e["train_output_loss"] for e in m["epochs"]], color=color,
              marker="o", label=f"{method} train")
      ax.plot(epochs, [e["held_out_output_loss"] for e in m["epochs"]], color=color,
              marker="s", linestyle="--", label=f"{method} held-out")
    ax.set_xticks(sorted({e["epoch"] for m in entry["methods"].values() for e in m["epochs"]}))
    ax.set(title=f"{entry['subset']}: output loss per epoch", xlabel="epoch",
           ylabel="output loss (per-example mean, nats)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = out / f"curves_{dataset}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written


def plot_gains(rows: Sequence[dict[str, Any]], x_key: str, xlabel: str,
               path: pathlib.Path) -> pathlib.Path:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  xs = [r[x_key] for r in rows]
  means = [r["gain"]["mean"] for r in rows]
  errors = [[m - r["gain"]["low"] for m, r in zip(means, rows)],
            [r["gain"]["high"] - m for m, r in zip(means, rows)]]
  ax.errorbar(xs, means, yerr=errors, marker="o", capsize=4)
  ax.axhline(0, color="gray", linewidth=1)
  ax.set_xscale("log", base=2 if x_key == "size" else 10)  # sizes double; ratios span decades
  ax.set(xlabel=xlabel, ylabel="IT - IM held-out output loss", title="gain of IM (95% CI)")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write(out: pathlib.Path, records: Records, header: dict[str, Any]) -> list[pathlib.Path]:
  analysis = analyse(records)
  out.mkdir(parents=True, exist_ok=True)
  written = [out / "results.json", out / "results.md"]
  written[0].write_text(json.dumps({"header": header, "analysis": analysis,
                                    "claims": claims.verdicts(analysis)}, indent=1) + "\n")
  written[1].write_text(markdown(analysis, header))
  written += plot_curves(analysis, out)
  if analysis["data_size"]:
    written.append(plot_gains(analysis["data_size"], "size", "training examples",
                              out / "gain_vs_size.png"))
  if analysis["length_ratio"]:
    written.append(plot_gains(analysis["length_ratio"], "length_ratio",
                              "length ratio (instruction / output words)",
                              out / "gain_vs_ratio.png"))
  return written
