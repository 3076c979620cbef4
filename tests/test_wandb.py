"""Weights & Biases mirrors metrics.jsonl, in one run across restarts (WANDB_MODE=offline).

The offline run files are read back with wandb's own record reader and compared with what
`metrics.jsonl` holds; no network.
"""

import pytest

from im_jax.train.metrics_log import MetricsLogger, read_metrics
from im_jax.run.wandb_log import RUN_ID_FILE, WandbConfig, WandbUnavailable
from tests.wandb_runs import by_step, offline_runs

wandb = pytest.importorskip("wandb", reason="wandb is a pinned test dependency (requirements.txt)")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    monkeypatch.setenv(name, str(tmp_path / "wandb_home"))


def test_records_mirror_to_one_run_resumed_after_a_restart(tmp_path):
  config = WandbConfig("im-jax-test", wandb_run_name="lima-im", wandb_tags="im,lima")
  first = [{"step": 1, "loss": 2.5, "output_loss": 2.0, "tokens": 300},
           {"step": 2, "loss": 2.25, "output_loss": 1.75, "tokens": 310},
           {"step": 2, "eval_output_loss": 2.125},
           {"step": 3, "loss": 9.0, "output_loss": 9.0, "tokens": 1}]  # lost: no checkpoint
  logger = MetricsLogger(tmp_path, total_steps=4, tensorboard=False, progress=False,
                         sinks=(config,), run_config={"loss": {"mode": "im"}})
  for record in first:
    logger.write(record)
  logger.close()
  wandb.teardown()  # the process ends: W&B's service writes out the run
  run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
  # The restart resumes from the checkpoint at step 2.
  logger = MetricsLogger(tmp_path, total_steps=4, start_step=2, tensorboard=False,
                         progress=False, sinks=(config,))
  for record in ({"step": 3, "loss": 2.0, "output_loss": 1.5, "tokens": 305},
                 {"step": 4, "loss": 1.875, "output_loss": 1.25, "tokens": 290}):
    logger.write(record)
  logger.close()
  wandb.teardown()

  runs = offline_runs(tmp_path)
  assert [(r["id"], r["project"], r["name"], r["tags"]) for r in runs] == [
      (run_id, "im-jax-test", "lima-im", ["im", "lima"])] * 2
  # W&B keeps the newest value per step, as the rewritten metrics.jsonl does.
  mirrored = {**runs[0]["history"], **runs[1]["history"]}
  assert mirrored == by_step(read_metrics(tmp_path))
  assert mirrored[3]["loss"] == 2.0 and mirrored[2]["eval_output_loss"] == 2.125


def test_off_by_default_and_off_on_other_processes(tmp_path, monkeypatch):
  MetricsLogger(tmp_path / "a", total_steps=1, tensorboard=False, progress=False,
                sinks=(WandbConfig(),)).close()
  monkeypatch.setattr("jax.process_index", lambda: 1)
  MetricsLogger(tmp_path / "b", total_steps=1, tensorboard=False, progress=False,
                sinks=(WandbConfig("im-jax-test"),)).close()
  assert not list(tmp_path.rglob("wandb*"))


def test_a_run_w_and_b_refuses_is_one_line(tmp_path, monkeypatch):
  def refuse(**kwargs):
    del kwargs
    raise wandb.errors.UsageError("api_key not configured (no-tty).\ncall wandb.login(key=...)")

  monkeypatch.setattr(wandb, "init", refuse)
  with pytest.raises(WandbUnavailable) as info:
    MetricsLogger(tmp_path, total_steps=1, tensorboard=False, progress=False,
                  sinks=(WandbConfig("im-jax-test"),))
  assert str(info.value) == (
      "log.wandb_project=im-jax-test: W&B could not start the run: api_key not configured "
      "(no-tty). call wandb.login(key=...) (log in with `wandb login` or WANDB_API_KEY, or set "
      "WANDB_MODE=offline)")


def test_an_online_run_without_an_api_key_stops_before_any_work(tmp_path, monkeypatch):
  from im_jax.configs import base  # pylint: disable=g-import-not-at-top
  from im_jax.run import settings  # pylint: disable=g-import-not-at-top

  c = base.get_config()
  c.data.train, c.data.tokenizer, c.log.wandb_project = "synthetic:10", "synthetic", "im-jax"
  monkeypatch.setattr(type(wandb.api), "api_key", property(lambda self: None))  # logged out
  # WANDB_MODE=offline (the fixture): no key needed
  settings.check_inputs(settings.load(c), tmp_path / "run")
  monkeypatch.setenv("WANDB_MODE", "online")
  with pytest.raises(settings.ConfigError, match=r"^log\.wandb_project=im-jax: no W&B API key"):
    settings.check_inputs(settings.load(c), tmp_path / "run")
  assert not (tmp_path / "run").exists()
