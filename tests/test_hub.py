"""`hf:ORG/NAME` models, tokenizers and datasets from a real Hugging Face cache layout.

No network: the cache (`models--ORG--NAME/{blobs,refs/main,snapshots/REV}`, `datasets--...`)
is built by hand in a temp dir from a tiny transformers Llama and tulu records, exactly as
huggingface_hub lays it out, and read with `HF_HUB_OFFLINE=1`. What the hub names give is
checked against the same files read from their plain folders.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import huggingface_hub
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from im_jax import hub
from im_jax.run import settings
from im_jax.data import sources
from im_jax.data.conversation import DataError
from im_jax.data.stats import load_tokenizer

# The training/eval commands this module starts share compiled steps (tests/conftest.py).
# slow: trains through a subprocess
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("subprocess_compilation_cache")]

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL, DATASET = "testorg/tiny-llama", "testorg/chat"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: pathlib.Path, kind: str, repo_id: str, files: dict[str, bytes]
                ) -> pathlib.Path:
  """huggingface_hub's layout: content-addressed blobs, a snapshot of symlinks, refs/main."""
  repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
  snapshot = repo / "snapshots" / REVISION
  for name, data in files.items():
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = snapshot / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  (repo / "refs").mkdir(parents=True, exist_ok=True)
  (repo / "refs" / "main").write_text(REVISION)
  return snapshot


def _records(n: int, start: int = 0) -> list[dict]:
  return [{"id": f"r{i}", "messages": [
      {"role": "user", "content": f"What is {i} plus {i}?"},
      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(start, n)]


def _parquet(records: list[dict]) -> bytes:
  sink = pa.BufferOutputStream()
  pq.write_table(pa.Table.from_pylist(records), sink)
  return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer_dir) -> pathlib.Path:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      bos_token_id=1, eos_token_id=2, pad_token_id=0)
  out = tmp_path_factory.mktemp("tiny_hf")
  model = transformers.LlamaForCausalLM(config)
  model.save_pretrained(out)
  (out / "num_params").write_text(str(sum(p.numel() for p in model.parameters())))
  transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(out)
  return out


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_hf_dir) -> pathlib.Path:
  home = tmp_path_factory.mktemp("hf_home")
  files = {p.name: p.read_bytes() for p in tiny_hf_dir.iterdir() if p.name != "num_params"}
  _cache_repo(home / "hub", "model", MODEL, files)
  bad = b'{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": 3}\n'
  _cache_repo(home / "hub", "dataset", DATASET, {
      "README.md": b"# chat\n", "dataset_info.json": b"{}",
      "data/train-00000-of-00002.parquet": _parquet(_records(40)),
      "data/train-00001-of-00002.jsonl": "".join(
          json.dumps(r) + "\n" for r in _records(60, start=40)).encode(),
      "data/test-00000-of-00001.jsonl": "".join(json.dumps(r) + "\n" for r in _records(5)).encode(),
      "data/broken-00000-of-00001.jsonl": bad})
  return home


@pytest.fixture
def cache(hf_home, monkeypatch) -> pathlib.Path:
  """This process reads hf_home's cache (huggingface_hub reads HF_HOME only at import)."""
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
  assert huggingface_hub.is_offline_mode()  # conftest sets HF_HUB_OFFLINE=1
  return hf_home / "hub"


def test_model_name_is_the_cached_snapshot_and_loads_the_same(cache, tiny_hf_dir):
  from im_jax.convert.load import load_pretrained  # pylint: disable=g-import-not-at-top
  from im_jax.convert.ckpt import param_dict  # pylint: disable=g-import-not-at-top

  folder = hub.folder(f"hf:{MODEL}")
  assert folder == cache / "models--testorg--tiny-llama" / "snapshots" / REVISION
  by_name, by_dir = load_pretrained(f"hf:{MODEL}"), load_pretrained(f"hf:{tiny_hf_dir}")
  assert by_name.tokenizer_dir == folder
  assert by_name.config == by_dir.config
  a, b = param_dict(by_name.model), param_dict(by_dir.model)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  tok = load_tokenizer(f"hf:{MODEL}")
  assert tok("What is 1 plus 1?")["input_ids"] == load_tokenizer(str(tiny_hf_dir))(
      "What is 1 plus 1?")["input_ids"]


def test_an_existing_local_path_wins(cache, tmp_path, monkeypatch):
  local = tmp_path / MODEL
  local.mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  assert hub.folder(f"hf:{MODEL}") == pathlib.Path(MODEL)
  (tmp_path / "data.jsonl").write_text(json.dumps(_records(1)[0]) + "\n")
  assert hub.dataset_files("hf:data.jsonl") == [pathlib.Path("data.jsonl")]


def test_dataset_splits_read_every_file_of_the_split(cache):
  train = sources.load_conversations(f"hf:{DATASET}")
  assert [c.id for c in train] == [f"r{i}" for i in range(60)]  # both shards, in order
  assert train.source == f"hf:{DATASET}"
  snapshot = cache / "datasets--testorg--chat" / "snapshots" / REVISION
  assert {c.source for c in train} == {
      str(snapshot / "data/train-00000-of-00002.parquet"),
      str(snapshot / "data/train-00001-of-00002.jsonl")}
  assert [c.id for c in sources.load_conversations(f"hf:{DATASET}:test")] == [
      f"r{i}" for i in range(5)]


def test_bad_records_name_the_cached_file_and_line(cache):
  with pytest.raises(DataError) as info:
    sources.load_conversations(f"hf:{DATASET}:broken")
  snapshot = cache / "datasets--testorg--chat" / "snapshots" / REVISION
  assert str(info.value).startswith(f"{snapshot}/data/broken-00000-of-00001.jsonl:2: ")


@pytest.mark.parametrize("spec, expected", [
    (f"hf:{DATASET}:validation", "no data file for split 'validation'"),
    ("hf:testorg/missing", "no such local path, and no dataset testorg/missing in the Hugging "
                           "Face cache"),
    ("hf:/no/such/dir", "no such local path, and not a Hub dataset name"),
])
def test_dataset_not_found_is_one_line(cache, spec, expected):
  with pytest.raises(DataError) as info:
    sources.load_conversations(spec)
  assert "\n" not in str(info.value) and expected in str(info.value), info.value
  if "missing" in spec:
    assert "HF_HUB_OFFLINE is set" in str(info.value) and str(cache) in str(info.value)


def test_model_not_found_is_one_line(cache):
  with pytest.raises(hub.HubError, match=r"^no such local path, and no model testorg/nope in "
                     r"the Hugging Face cache .*HF_HUB_OFFLINE is set; fetch it with "
                     r"`hf download testorg/nope`\)$"):
    hub.folder("hf:testorg/nope")


def test_a_run_reads_a_hub_tokenizer_and_a_hub_split(cache, tmp_path):
  from im_jax.configs import base  # pylint: disable=g-import-not-at-top
  from im_jax.run import dry_run  # pylint: disable=g-import-not-at-top

  c = base.get_config()
  c.data.train, c.data.tokenizer = f"hf:{DATASET}:test", f"hf:{MODEL}"
  c.data.max_seq_len, c.train.batch_size, c.eval.batch_size = 64, 8, 8
  plan = dry_run.data_plan(settings.load(c), tmp_path / "run")
  assert plan["tokenizer"] == str(hub.folder(f"hf:{MODEL}")) and plan["examples"] == 5
  assert not (tmp_path / "run").exists()


def _train(hf_home: pathlib.Path, workdir: pathlib.Path, *overrides: str):
  env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
  env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "im_jax.train", "--config", "configs/demo.py", "--workdir",
       str(workdir), "--config.data.tokenizer=", "--config.data.eval_fraction=0.1",
       *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_cli_print_config_and_dry_run_with_hub_names(hf_home, tiny_hf_dir, tmp_path):
  """Resolves, reads and plans; prints; writes nothing into an existing workdir (no lock)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  proc = _train(hf_home, workdir, "--print-config", "--dry-run",
                f"--config.model.init_from=hf:{MODEL}", f"--config.data.train=hf:{DATASET}")
  assert proc.returncode == 0, proc.stderr
  config_text, _, plan = proc.stdout.partition("\n}\n")
  config = json.loads(config_text + "}")
  assert config["model"]["init_from"] == f"hf:{MODEL}" and config["data"]["tokenizer"] == ""
  parameters = int((tiny_hf_dir / "num_params").read_text())  # counted by torch
  assert f"model: hf:{MODEL}, {parameters:,} parameters" in plan, plan
  snapshot = hf_home / "hub" / "models--testorg--tiny-llama" / "snapshots" / REVISION
  assert f"tokenizer {snapshot}" in plan, plan
  # 60 train-split records, 10% held out by hash; demo batches of 16 rows of 256 tokens.
  assert f"data: hf:{DATASET}: 60 examples" in plan and "(of 4,096 positions)" in plan, plan
  assert "python -m im_jax.plan" in plan
  assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]
