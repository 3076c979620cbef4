"""Benchmark tasks through lm-evaluation-harness: which tasks, run them, flatten the scores.

Shared by `python -m im_jax.eval harness` and training's `eval.harness_tasks` hook
(`im_jax.run.experiment` builds the hook; `train/` only calls it):

- `prepare_tasks(...)`: the task names (`paper` is the paper's group, `eval.harness_paper`),
  checked and built before any model loads: an unknown name (with close names), a task file
  that does not parse, a task whose data is not in the Hugging Face cache (offline: the
  `hf download` to run), a bad --limit / --num-fewshot are each one `HarnessError` line;
- `run_tasks(lm, tasks, ...)`: `lm_eval.simple_evaluate` on the built tasks;
- `flat_metrics(results)`: `{"harness/TASK/METRIC": value, "harness/TASK/METRIC_stderr": ...}`
  for metrics.jsonl, TensorBoard and W&B;
- `make_training_hook(...)`: `hook(model) -> flat metrics` for the training loop.
"""

import dataclasses
import difflib
import functools
import logging
import math
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from im_jax.eval import harness_paper

log = logging.getLogger(__name__)

PREFIX = "harness/"


class HarnessError(ValueError):
  """Bad harness input (task names, task files, ranges); the message is one line."""


@dataclasses.dataclass
class PreparedTasks:
  names: list[str]  # as requested, `paper` expanded
  built: list[Any]  # lm-eval Task / Group objects (datasets loaded), few-shot settings applied
  limit: int | None
  manager: Any  # the TaskManager that built them (simple_evaluate would index all of lm-eval's)


def check_ranges(limit: int | None, num_fewshot: int | None) -> None:
  if limit is not None and limit < 1:
    raise HarnessError(f"--limit must be >= 1 (documents per task), got {limit}")
  if num_fewshot is not None and num_fewshot < 0:
    raise HarnessError(f"--num-fewshot must be >= 0, got {num_fewshot}")


def split_names(spec: str) -> list[str]:
  names = [n.strip() for n in spec.split(",") if n.strip()]
  if not names:
    raise HarnessError("no task named: give --tasks T1,T2,... or --tasks paper")
  expanded = []
  for name in names:
    expanded += harness_paper.names() if name == harness_paper.GROUP else [name]
  return list(dict.fromkeys(expanded))


def check_task_files(include_path: str | None) -> None:
  """Every YAML under `include_path` parses as lm-eval reads it (lm-eval skips one that does
  not, and the task would then be reported unknown)."""
  if include_path is None:
    return
  root = pathlib.Path(include_path)
  if not root.is_dir():
    raise HarnessError(f"task folder {include_path}: no such folder")
  from lm_eval.tasks._yaml_loader import load_yaml  # pylint: disable=g-import-not-at-top

  for path in sorted(root.glob("**/*.yaml")):
    try:
      config = load_yaml(path, resolve_func=False, recursive=True)
    except Exception as e:  # pylint: disable=broad-except  (yaml and include errors alike)
      raise HarnessError(f"{path}: does not parse: {_one_line(e)}") from None
    if not isinstance(config, dict) or not ({"task", "group", "tag"} & set(config)):
      raise HarnessError(f"{path}: not an lm-eval task file (no task, group or tag key)")


def task_manager(names: Sequence[str], include_path: str | None):
  """A TaskManager that knows `names` (else HarnessError naming the unknown one, with close
  names): only the local folder's tasks when that is enough, as indexing lm-eval's own ~10k
  task files takes seconds."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  local = None if include_path is None else TaskManager(include_path=include_path,
                                                         include_defaults=False)
  local_names = set(local.all_tasks) if local else set()
  if all(n in local_names for n in names):
    return local
  known = local_names | set(_default_manager().all_tasks)
  for name in names:
    if name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
      hint = f" (did you mean {', '.join(close)}?)" if close else ""
      raise HarnessError(f"unknown task {name}{hint}; see `lm-eval ls tasks` or give "
                         "--include-path DIR for local task files")
  return _default_manager() if local is None else TaskManager(include_path=include_path)


@functools.lru_cache(maxsize=1)
def _default_manager():
  # lm-eval's own tasks, indexed once per process (the index maps names to files).
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  return TaskManager()


def prepare_tasks(spec: str, *, include_path: str | None = None, num_fewshot: int | None = None,
                  limit: int | None = None) -> PreparedTasks:
  """Checks and builds the tasks (their datasets loaded); see the module docstring."""
  check_ranges(limit, num_fewshot)
  check_task_files(include_path)
  names = split_names(spec)
  manager = task_manager(names, include_path)
  shots = harness_paper.fewshot_settings()
  built = []
  for name in names:
    try:
      # pinned lm-eval 0.4.13: the one-name loader, so groups keep their aggregation
      obj = manager._load_spec(name)  # pylint: disable=protected-access
    except (ConnectionError, FileNotFoundError) as e:
      raise HarnessError(_data_missing(name, e)) from None
    except Exception as e:  # pylint: disable=broad-except  (a task config lm-eval cannot build)
      raise HarnessError(f"task {name}: cannot be built: {_one_line(e)}") from None
    obj = obj if isinstance(obj, list) else [obj]
    k = num_fewshot if num_fewshot is not None else shots.get(name)
    for task in _leaf_tasks(obj):
      if k is not None and task.get_config("num_fewshot") != 0:  # lm-eval's rule: 0 stays 0
        task.set_config(key="num_fewshot", value=k)
    built += obj
  return PreparedTasks(names, built, limit, manager)


def _leaf_tasks(built: Sequence[Any]) -> list[Any]:
  from lm_eval.api.group import Group  # pylint: disable=g-import-not-at-top

  out = []
  for obj in built:
    out += obj.get_all_tasks() if isinstance(obj, Group) else [obj]
  return out


def _data_missing(name: str, error: Exception) -> str:
  text = _one_line(error)
  found = re.search(r"reach '([^']+)'", text)
  if found:
    return (f"task {name}: its data ({found.group(1)}) is not in the Hugging Face cache and the "
            f"Hub cannot be reached: run `hf download --repo-type dataset {found.group(1)}` "
            "where there is network (or copy that cache here)")
  return f"task {name}: its data cannot be read: {text}"


def _one_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def run_tasks(lm: Any, tasks: PreparedTasks, *, apply_chat_template: bool = False
              ) -> dict[str, Any]:
  """lm-eval's results dict (`results`, `n-shot`, `configs`, ...) for the prepared tasks."""
  import lm_eval  # pylint: disable=g-import-not-at-top

  return lm_eval.simple_evaluate(model=lm, tasks=list(tasks.built), limit=tasks.limit,
                                 apply_chat_template=apply_chat_template, log_samples=False,
                                 bootstrap_iters=1000, task_manager=tasks.manager)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
  """`harness/TASK/METRIC` (and `..._stderr`) floats from lm-eval's `results` section;
  lm-eval's filter suffix (`,none`) is dropped, other filters stay (`acc,flexible`)."""
  out = {}
  for task, metrics in results.get("results", {}).items():
    for key, value in metrics.items():
      if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
        continue
      metric, filt = key.split(",", 1)
      name = metric if filt == "none" else f"{metric},{filt}"
      if math.isfinite(float(value)):
        out[f"{PREFIX}{task}/{name}"] = float(value)
  return out


def make_training_hook(tasks: PreparedTasks, *, tokenizer_dir: str, template: str,
                       strip_content: bool | None, mesh: Any, batch_size: int
                       ) -> Callable[[Any], dict[str, float]]:
  """`hook(model) -> harness/... metrics` for training (tasks prepared before the run
  starts). One HarnessLM serves every call, so its steps compile once; every process
  computes, the loop writes from process 0."""
  from im_jax.data.stats import load_tokenizer  # pylint: disable=g-import-not-at-top
  from im_jax.eval import harness_lm  # pylint: disable=g-import-not-at-top

  tokenizer = load_tokenizer(tokenizer_dir)
  lms = []

  def hook(model) -> dict[str, float]:
    if not lms:
      lms.append(harness_lm.HarnessLM(model, tokenizer, mesh=mesh, batch_size=batch_size,
                                      template=template, strip_content=strip_content))
    lms[0].update(model)
    return flat_metrics(run_tasks(lms[0], tasks))

  return hook
