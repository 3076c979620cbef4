"""`--dry-run`'s data plan: counts known from how the data was made, a busy workdir untouched."""

import json
import subprocess
import sys

import pytest

from im_jax.configs import base
from im_jax.run import dry_run, settings
from im_jax.models.llama import LlamaConfig
from im_jax.models.llama.config import num_params
from im_jax.train import workdir_lock

SHORT, LONG, NO_OUTPUT = 10, 3, 2  # examples of each kind in the data file


@pytest.fixture
def config(tmp_path, tiny_tokenizer_dir):
  records = ([{"messages": [{"role": "user", "content": f"Add {i} and {i}."},
                            {"role": "assistant", "content": f"It is {2 * i}."}]}
              for i in range(SHORT)]
             # hundreds of words: far past max_seq_len whatever the tokenization
             + [{"messages": [{"role": "user", "content": "Summarise this."},
                              {"role": "assistant", "content": " ".join(["word"] * 400)}]}
                for _ in range(LONG)]
             # the instruction alone fills the row: no output token is left to train on
             + [{"messages": [{"role": "user", "content": " ".join(["word"] * 400)},
                              {"role": "assistant", "content": "Done."}]}
                for _ in range(NO_OUTPUT)])
  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  c = base.get_config()
  c.data.train, c.data.tokenizer = str(data), str(tiny_tokenizer_dir)
  c.data.max_seq_len, c.data.packing = 64, "none"  # one example per row
  c.train.batch_size, c.train.epochs, c.eval.batch_size = 8, 3, 8
  return c


def test_plan_counts_and_leaves_a_busy_workdir_alone(config, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  # A run is going on here (another process holds the lock): a dry run neither takes the
  # lock (which would fail) nor writes anything.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | "
       "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
       "sys.stdin.read()", str(workdir / workdir_lock.LOCK_FILE)],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()}
    plan = dry_run.data_plan(settings.load(config), workdir)
    assert {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()} == before
  finally:
    holder.communicate("", timeout=30)
  kept = SHORT + LONG
  assert (plan["examples"], plan["kept"], plan["truncated"]) == (kept + NO_OUTPUT, kept,
                                                                 LONG + NO_OUTPUT)
  assert sum(plan["dropped"].values()) == NO_OUTPUT
  assert plan["rows_per_epoch"] == 16 and plan["steps_per_epoch"] == 2  # 13 rows, 2 batches
  assert plan["total_steps"] == 6 and plan["token_positions_per_step"] == 8 * 64
  # The long examples fill their rows; 3 of 16 rows are padding and short ones are short.
  assert 3 * 63 / (16 * 64) < plan["non_padding_fraction"] < 13 / 16
  tiny = LlamaConfig.preset("tiny")
  assert plan["parameters"] == num_params(tiny.replace(vocab_size=max(tiny.vocab_size, 512)))
  assert plan["outputs"]["checkpoints"] == str(workdir / "checkpoints")
  text = dry_run.format_plan(plan)
  assert "python -m im_jax.plan" in text and "\n" in text


def test_bad_settings_stop_before_reading(config, tmp_path):
  config.data.train = str(tmp_path / "missing.jsonl")
  with pytest.raises(settings.ConfigError, match="data.train=.*missing.jsonl: no such file"):
    dry_run.data_plan(settings.load(config), tmp_path / "run")
  assert not (tmp_path / "run").exists()
