"""One study from start to report: data, starting model, sizing, runs, write-up."""

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import time
from typing import Any

from im_jax.study import results, runner, runs as runs_lib, scales, sizing, start_models, subsets


def _compilation_cache(out: pathlib.Path) -> None:
  """Identical steps (an IT and an IM run of one subset) compile once, also across reruns."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_compilation_cache_dir", str(out / ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


SIZED_SCALE = "cpu"  # the scale whose subset sizes a measured speed fits to the budget


def _sized_scale(study: runner.Study) -> tuple[scales.Scale, dict[str, Any] | None]:
  """The cpu scale fitted to the budget by a measured tokens/s (measured once, stored)."""
  if study.scale.name != SIZED_SCALE:
    return study.scale, None
  key = study.base_key()
  stored = study.store.get("sizing", key)
  if stored is None:
    runner.say("sizing: measuring training tokens/s of the model on this machine")
    tps, tokens_per_example = runner.measure_speed(study)
    fitted, info = sizing.fit(study.scale, tokens_per_example, tps)
    stored = study.store.put("sizing", key, {**info, "overfit_size": fitted.overfit_size,
                                             "sizes": list(fitted.sizes),
                                             "ratio_size": fitted.ratio_size})
  fitted = _fitted(study.scale, stored)
  runner.say(f"sizing: {stored['tokens_per_sec']:.0f} tokens/s, factor {stored['factor']:.2f}, "
             f"estimated {stored['estimate_seconds'] / 3600:.2f} h")
  return fitted, stored


def _pilot(study: runner.Study, runs: list[runs_lib.Run], datasets) -> None:
  """The replicated design's pilot: replica 0's IT/IM pair runs first and its sizing is
  stored (`sizing.json`); a design the pilot rejects stops here, before the other runs."""
  pilot = _pilot_runs(runs)
  runner.run_all(study, pilot, datasets)
  key = _pilot_key(study, pilot)
  stored = study.store.get("sizing", key)
  if stored is None:
    it, im = (study.store.get(r.name, study.run_key(r)) for r in pilot)
    stored = study.store.put("sizing", key, sizing.pilot_decision(
        it, im, len(runs), study.scale.overrides["train.epochs"], study.scale.overfit_size))
  runner.say(f"pilot: {stored['t'] / 60:.0f} min for the pair, IT's best epoch "
             f"{stored['it_best_epoch']}: {stored['decision']}")
  if stored["decision"] != "keep the design":
    raise ValueError(f"{study.store.path('sizing')}: the pilot says {stored['decision']}: "
                     "the plan's rule changes the design (docs/study_plan.md)")


def _pilot_runs(runs: list[runs_lib.Run]) -> list[runs_lib.Run]:
  return [r for r in runs if r.seed == 0 and r.method in scales.CORE_METHODS]


def _pilot_key(study: runner.Study, pilot: list[runs_lib.Run]) -> dict[str, Any]:
  return {**study.base_key(), "pilot": [r.name for r in pilot]}


def _fitted(scale: scales.Scale, sizing: dict[str, Any]) -> scales.Scale:
  """The scale with the subset sizes a stored sizing result chose."""
  return dataclasses.replace(scale, overfit_size=sizing["overfit_size"],
                             sizes=tuple(sizing["sizes"]), ratio_size=sizing["ratio_size"])


def load_splits(held_out: int, data_dir: str | None) -> dict[str, subsets.DatasetSplit]:
  data_path = pathlib.Path(data_dir) if data_dir else None
  return {d: subsets.load_split(d, held_out, data_path) for d in subsets.DATASETS}


def result_keys(study: runner.Study) -> dict[str, dict[str, Any]]:
  """The key of every result the full study of `study.scale` stores, by result name, as
  `run_study` computes them, without training, converting or loading a model. The cpu
  scale's run keys depend on its sizing: they are computed from the stored sizing file
  (which must exist; its key is among those returned, not checked here). A pilot scale's
  sizing is the pilot's decision (`_pilot`): its key is returned, whether stored yet or not."""
  keys: dict[str, dict[str, Any]] = {}
  scale = study.scale
  if scale.name == SIZED_SCALE:
    keys["sizing"] = study.base_key()
    path = study.store.path("sizing")
    if not path.exists():
      raise ValueError(f"{path}: no sizing result, so the cpu scale's subset sizes are unknown")
    scale = _fitted(scale, json.loads(path.read_text(encoding="utf-8")))
  sized = dataclasses.replace(study, scale=scale)
  runs = runs_lib.make_plan(scale)
  for dataset in runs_lib.needed_datasets(runs):
    keys[runner.baseline_name(dataset)] = runner.baseline_work(sized, dataset)[2]
  keys.update({run.name: sized.run_key(run) for run in runs})
  if scale.pilot:  # as _pilot
    keys["sizing"] = _pilot_key(sized, _pilot_runs(runs))
  return json.loads(json.dumps(keys))  # as stored: tuples become lists


def run_study(out: pathlib.Path, scale_name: str, only: tuple[str, ...], results_dir: str | None,
              model: str, data_dir: str | None, command: str, started: float,
              results_mirror: str | None = None,
              first_edition: str | None = None) -> list[pathlib.Path]:
  scale = scales.SCALES[scale_name]
  store = results.ResultStore(pathlib.Path(results_dir) if results_dir
                              else out / "results" / scale.name, mirror=results_mirror)
  splits = load_splits(scale.held_out, data_dir)
  out.mkdir(parents=True, exist_ok=True)
  _compilation_cache(out)
  texts = [c for s in splits.values() for c in s.held_out + s.pool[:4 * scale.overfit_size]]
  start = start_models.start(scale.model, out, model, texts)
  study = runner.Study(out, scale, store, splits, start)
  study.scale, sized = _sized_scale(study)
  runs = runs_lib.make_plan(study.scale, only)
  datasets = runs_lib.needed_datasets(runs)
  for dataset in datasets:
    study.held_out_file(dataset)  # on disk too: `python -m im_jax.eval` can reuse them
  if study.scale.pilot:
    _pilot(study, runs, datasets)
  runner.run_all(study, runs, datasets)
  names = {runner.baseline_name(d) for d in datasets} | {r.name for r in runs}
  records = {k: v for k, v in store.all().items() if k in names}
  header = {
      "scale": scale.name, "model": start.description, "command": command,
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
      "date": datetime.date.today().isoformat(),
      "wall time of this invocation (s)": round(time.perf_counter() - started, 1),
      "training and evaluation time of all runs (s)":
          round(sum(r.get("seconds", 0) for r in records.values()), 1),
      "methods": ", ".join(runs_lib.methods(study.scale)),
      "held-out examples per dataset": scale.held_out,
      "subsets": ", ".join(sorted({r.subset.name for r in runs})),
      "results folder": str(store.folder),
      "overrides of configs/paper.py": json.dumps(scale.overrides),
      "reasons": scale.reasons}
  if sized:
    header["sizing rule"] = (f"im_jax/study/sizing.py: {sized['tokens_per_sec']:.0f} tokens/s "
                             f"measured, {sized['tokens_per_example']:.0f} tokens per example, "
                             f"factor {sized['factor']:.3f}, estimated "
                             f"{sized['estimate_seconds'] / 3600:.2f} h of "
                             f"{sized['budget_seconds'] / 3600:.1f} h")
  if scale.replicas:
    from im_jax.study import second_edition  # pylint: disable=g-import-not-at-top

    first = None
    if first_edition:
      first = results.ResultStore(pathlib.Path(first_edition)).all()
      header["first edition's results (re-read)"] = first_edition
    return second_edition.write(out, records, header, first)
  from im_jax.study import writeup  # pylint: disable=g-import-not-at-top  (matplotlib)
  return writeup.write(out, records, header)
