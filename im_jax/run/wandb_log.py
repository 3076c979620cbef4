"""Weights & Biases: an optional mirror of what `metrics.jsonl` gets (log.wandb_* keys).

Off unless `log.wandb_project` is set; `wandb` is then needed (an optional dependency:
`pip install wandb`). Only JAX process 0 logs: `WandbConfig` is a `SinkFactory` that
`im_jax.run.experiment` hands to the training loop's `MetricsLogger`. The run id is
kept in `WORKDIR/wandb_run_id`, so a restarted run resumes the same W&B run; W&B's own files
go to `WORKDIR/wandb/` (with `WANDB_MODE=offline` they are the whole record, for `wandb sync`).
W&B keeps one value per step: records a resumed run writes again for steps the interrupted run
had already logged are dropped by W&B, and they hold the same values (exact resume).
"""

import dataclasses
import os
import pathlib
import re
from typing import Any

RUN_ID_FILE = "wandb_run_id"
_FORBIDDEN = re.compile(r"[/\\#?%:]")  # characters W&B refuses in project and entity names
_MAX_NAME, _MAX_TAG = 128, 64  # W&B's limits


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  """The config's log section (its fields are the log.* keys, so errors name the key)."""

  wandb_project: str = ""  # "" = off
  wandb_entity: str = ""  # "" = the user's default entity
  wandb_run_name: str = ""  # "" = the workdir's name
  wandb_tags: str = ""  # comma-separated
  # SinkFactory (train/metrics_log.py): what a gs:// workdir keeps for W&B, what W&B writes
  state_files = (RUN_ID_FILE,)
  own_folder = "wandb"

  @property
  def tags(self) -> tuple[str, ...]:
    return (tuple(t.strip() for t in self.wandb_tags.split(","))
            if self.wandb_tags.strip() else ())

  def __post_init__(self):
    for name in ("wandb_project", "wandb_entity"):
      value = getattr(self, name)
      if _FORBIDDEN.search(value) or len(value) > _MAX_NAME or value != value.strip():
        raise ValueError(f"{name} {value!r} is not a W&B name (at most {_MAX_NAME} "
                         "characters, none of / \\ # ? % : and no surrounding spaces)")
    for tag in self.tags:
      if not tag or len(tag) > _MAX_TAG:
        raise ValueError(f"wandb_tags: each tag must have 1 to {_MAX_TAG} characters, got "
                         f"{tag!r}")
    for name in ("wandb_entity", "wandb_run_name", "wandb_tags"):
      if getattr(self, name) and not self.wandb_project:
        raise ValueError(f"{name} is set but wandb_project is empty (W&B is off)")
    if self.wandb_project:
      try:
        import wandb  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      except ImportError:
        raise ValueError(f"wandb_project={self.wandb_project} needs the wandb package "
                         "(pip install wandb)") from None

  def open(self, workdir: pathlib.Path,
           run_config: dict[str, Any] | None) -> "WandbSink | None":
    """The W&B run of this workdir (created or resumed); None when W&B is off."""
    return WandbSink(self, workdir, run_config) if self.wandb_project else None


class WandbUnavailable(ValueError):
  """W&B could not start (or resume) the run; one line for the user."""


def check_logged_in(config: WandbConfig) -> None:
  """Before any work: an online W&B run needs an API key (`wandb login`, WANDB_API_KEY)."""
  if not config.wandb_project:
    return
  import wandb  # pylint: disable=g-import-not-at-top

  settings = wandb.Settings()
  settings.update_from_env_vars(dict(os.environ))  # WANDB_MODE=offline|disabled need no key
  if settings.mode == "online" and wandb.api.api_key is None:
    raise WandbUnavailable(
        f"log.wandb_project={config.wandb_project}: no W&B API key (log in with `wandb login` "
        "or set WANDB_API_KEY), or set WANDB_MODE=offline to log locally and `wandb sync` later")


class WandbSink:
  """One W&B run per workdir: created on the first start, resumed on every restart."""

  def __init__(self, config: WandbConfig, workdir: str | pathlib.Path,
               run_config: dict[str, Any] | None = None):
    import wandb  # pylint: disable=g-import-not-at-top  (optional; slow to import)

    workdir = pathlib.Path(workdir)
    id_file = workdir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None  # None: W&B picks one
    try:
      self.run = wandb.init(
          project=config.wandb_project, entity=config.wandb_entity or None,
          name=config.wandb_run_name or workdir.absolute().name, tags=list(config.tags) or None,
          id=run_id, resume="allow", dir=str(workdir), config=run_config)
    except wandb.errors.Error as e:  # not logged in, no network, a project it may not write
      reason = " ".join(str(e).split()) or type(e).__name__
      raise WandbUnavailable(
          f"log.wandb_project={config.wandb_project}: W&B could not start the run: {reason} "
          "(log in with `wandb login` or WANDB_API_KEY, or set WANDB_MODE=offline)") from None
    if run_id is None:
      tmp = id_file.with_name(f".{RUN_ID_FILE}.partial")
      tmp.write_text(self.run.id + "\n")
      os.replace(tmp, id_file)

  def write(self, record: dict[str, Any]) -> None:
    values = {k: v for k, v in record.items()
              if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    self.run.log(values, step=int(record["step"]))

  def close(self) -> None:
    self.run.finish()
