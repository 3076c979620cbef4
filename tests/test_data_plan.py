"""The data plan at scale: one plan shared by any number of processes, cached, checked.

Independent references: `sources` reading a whole file (for the byte-offset JSONL reader), a
one-process plan (for a plan split over processes), one process's batches (for 2 and 4
processes), an uninterrupted iteration (for a resume from the cached plan).
"""

import collections
import json
import os

import numpy as np
import pytest

from im_jax.configs import base
from im_jax.run import run_data, settings
from im_jax.checkpoint import store as store_lib
from im_jax.data import encode as encode_lib
from im_jax.data import offsets
from im_jax.data import packing
from im_jax.data import pipeline as pipeline_lib
from im_jax.data import plan as plan_lib
from im_jax.data import records as records_lib
from im_jax.data import sources
from im_jax.data.conversation import Conversation, DataError
from im_jax.data.stats import load_tokenizer
from im_jax.run.settings import ConfigError, encode_config


def _alpaca_like(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "omega", "sum", "list", "word"]
  out = []
  for i in range(n):
    say = lambda k: " ".join(rng.choice(words, int(k)))  # noqa: E731
    out.append({"instruction": f"Task {i}: {say(rng.integers(2, 20))}",
                "input": say(rng.integers(0, 8)), "output": say(rng.integers(1, 60))})
  return out


def _write_jsonl(path, records) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def config(tmp_path, tiny_tokenizer_dir):
  data = tmp_path / "data.jsonl"
  _write_jsonl(data, _alpaca_like(120))
  c = base.get_config()
  c.data.train, c.data.tokenizer = str(data), str(tiny_tokenizer_dir)
  c.data.max_seq_len, c.data.read_threads, c.data.eval_fraction = 64, 0, 0.1
  c.train.batch_size, c.train.epochs, c.train.grad_accum = 4, 2, 2
  return c


@pytest.mark.parametrize("chunk", [5, 7, 1 << 24], ids=["chunk5", "chunk7", "whole"])
def test_jsonl_index_reads_what_the_whole_file_reader_reads(tmp_path, monkeypatch, chunk):
  monkeypatch.setattr(offsets, "CHUNK", chunk)  # lines across the reads' boundaries
  good = [{"messages": [{"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
  lines = ["\ufeff" + json.dumps(good[0]), "", "   ", " " + json.dumps(good[1]),
           json.dumps(good[2]) + "\r", "{not json", json.dumps({"messages": 3}),
           json.dumps(good[3]), "\t", json.dumps(good[4])[:-3]]  # cut short, no final newline
  path = tmp_path / "mixed.jsonl"
  path.write_bytes("\n".join(lines).encode())
  skipped = []
  want = list(sources.iter_conversations(path, on_bad_record="skip", skipped=skipped))
  records = records_lib.open_records(str(path), on_bad_record="skip")
  assert isinstance(records, records_lib.JsonlRecords)
  got = [records.read(i) for i in range(len(records))]
  assert [r for r in got if isinstance(r, Conversation)] == want
  assert [(r.where, r.reason) for r in got if isinstance(r, records_lib.BadRecord)] == skipped
  assert len(skipped) == 3 and "looks truncated" in skipped[-1][1]
  assert records.digests() == [records_lib.file_digest(path)]


@pytest.mark.parametrize("container", ["json", "parquet"])
def test_json_array_and_parquet_records_read_what_the_whole_file_reader_reads(
    tmp_path, monkeypatch, container):
  monkeypatch.setattr(offsets, "_ARRAY_CHUNK", 7)  # elements across the reads' boundaries
  monkeypatch.setattr(records_lib.ParquetRecords, "CACHED_GROUPS", 2)
  good = [{"instruction": f'q{i} "quoted" \\ [x], {{y}}', "input": "", "output": f"a{i} é"}
          for i in range(11)]
  good[4]["output"] = None  # a bad record
  path = tmp_path / f"data.{container}"
  if container == "json":
    path.write_bytes(b"\xef\xbb\xbf " + json.dumps(good, indent=1).encode() + b"\n")
  else:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pq.write_table(pa.Table.from_pylist(good), path, row_group_size=3)
  skipped = []
  want = list(sources.iter_conversations(path, on_bad_record="skip", skipped=skipped))
  records = records_lib.open_records(str(path), on_bad_record="skip")
  assert len(records) == 11 and records.digests() == [records_lib.file_digest(path)]
  order = [3, 10, 0, 7, 4, 1, 9, 2, 8, 5, 6]  # shuffled: row groups leave the cache
  got = {i: records.read(i) for i in order}
  assert [got[i] for i in range(11) if isinstance(got[i], Conversation)] == want
  assert [(r.where, r.reason) for r in got.values()
          if isinstance(r, records_lib.BadRecord)] == skipped == [
              (f"{path}:record 4", "field 'output' must be a string, got null")]


@pytest.mark.parametrize("text", ['[{"instruction": "a", "output": "b"}, {"x": tru}]',
                                  '[{"instruction": "a", "output": "b"}', ' [ ] '])
def test_a_json_array_that_does_not_parse_is_named_as_the_whole_file_reader_names_it(
    tmp_path, text):
  path = tmp_path / "bad.json"
  path.write_text(text)
  with pytest.raises(DataError) as want:
    sources.load_conversations(path, on_bad_record="skip")
  with pytest.raises(DataError) as got:
    records_lib.open_records(str(path), on_bad_record="skip")
  assert str(got.value) == str(want.value)


def _make_plan_split(records, encoder, processes: int) -> plan_lib.ExamplePlan:
  """make_plan as `processes` processes run it, the collective played by this test."""
  parts = []
  for p in range(processes):  # each process's contribution, as it would send it
    parts.append(None)

    def capture(x, p=p):
      parts[p] = x
      return np.stack([x] * processes)
    plan_lib.make_plan(records, encoder, on_bad_record="skip", process_index=p,
                       process_count=processes, gather=capture)
  return plan_lib.make_plan(records, encoder, on_bad_record="skip", process_index=0,
                            process_count=processes, gather=lambda x: np.stack(parts))


def test_a_plan_split_over_processes_is_the_one_process_plan(config, tmp_path):
  records_in = _alpaca_like(37, seed=1)
  records_in[4] = records_in[30] = {"instruction": 3}  # bad: seen by process 0 and process 2
  records_in[7]["output"] += " </s> <|im_end|>"  # special-token text read as text
  path = tmp_path / "bad.jsonl"
  _write_jsonl(path, records_in)
  records = records_lib.open_records(str(path), on_bad_record="skip")
  config.data.max_seq_len = 200  # some examples truncated
  encoder = encode_lib.Encoder(load_tokenizer(config.data.tokenizer),
                               encode_config(settings.load(config)))
  one = plan_lib.make_plan(records, encoder, on_bad_record="skip")
  assert one.bad_count == 2 and one.first_bad[0] == f"{path}:5"
  assert (one.cut > 0).any() and (one.lengths > 0).sum() > 20
  for i in range(len(records)):  # batched tokenizer calls: each record as encoded alone
    record = records.read(i)
    if isinstance(record, Conversation):
      alone = encoder.encode_full(record)
      assert (one.lengths[i], one.cut[i]) == (
          0 if alone.example is None else len(alone.example["tokens"]), alone.truncated_tokens)
  for processes in (2, 3):
    split = _make_plan_split(records, encoder, processes)
    for field in ("lengths", "reasons", "cut", "split"):
      np.testing.assert_array_equal(getattr(split, field), getattr(one, field), err_msg=field)
    assert (split.bad_count, split.first_bad) == (one.bad_count, one.first_bad)
  # the held-out split's hash is the example's own (as plan.split_value computes it)
  conv = records.read(0)
  assert one.split[0] == plan_lib.split_value(conv)


def _synthetic_examples(n: int) -> list[dict[str, np.ndarray] | None]:
  rng = np.random.default_rng(4)
  out = []
  for i in range(n):
    length = int(rng.integers(1, 60))
    tokens = rng.integers(1, 1000, length).astype(np.int32)
    tokens[0] = i + 1  # says which example a segment came from
    out.append({"tokens": tokens, "targets": tokens + 1,
                "loss_weights": rng.random(length).astype(np.float32),
                "target_kinds": rng.integers(1, 7, length).astype(np.int8)})
  out[7] = None  # dropped
  return out


@pytest.mark.parametrize("packing_mode", ["best_fit", "first_fit", "none"])
def test_global_batches_do_not_depend_on_the_process_count(packing_mode):
  examples = _synthetic_examples(157)
  global_rows, k = 8, 2  # rows per step, micro-batches (gradient accumulation)

  def global_batches(processes):
    cfg = pipeline_lib.PipelineConfig(batch_size=global_rows // processes, packing=packing_mode,
                                      num_packing_bins=4, num_epochs=2, seed=3, micro_batches=k)
    per_process = [list(pipeline_lib.from_examples(examples, 64, cfg, p, processes))
                   for p in range(processes)]
    # as sharding.global_batch assembles them: [k, rows / k] per process, side by side
    return [{f: np.concatenate([b[step][f].reshape(k, -1, 64) for b in per_process], axis=1)
             .reshape(global_rows, 64) for f in packing.ROW_FIELDS}
            for step in range(len(per_process[0]))]

  one = global_batches(1)
  for processes in (2, 4):
    other = global_batches(processes)
    assert len(other) == len(one)
    for a, b in zip(one, other):
      for f in packing.ROW_FIELDS:
        np.testing.assert_array_equal(a[f], b[f], err_msg=f)
  # each epoch holds every kept example exactly once (the multiset of the epoch's examples)
  steps = len(one) // 2
  for epoch in range(2):
    seen = collections.Counter()
    for batch in one[epoch * steps:(epoch + 1) * steps]:
      for r in range(global_rows):
        for segment in packing.split_row({f: batch[f][r] for f in packing.ROW_FIELDS}):
          seen[int(segment["tokens"][0]) - 1] += 1
    assert seen == collections.Counter(i for i, e in enumerate(examples) if e is not None)


def _all_batches(iterator):
  return [dict(b) for b in iterator]


def test_a_cached_plan_resumes_with_the_uninterrupted_batches(config, tmp_path, monkeypatch):
  monkeypatch.setattr(offsets, "RACY_SECONDS", 0)  # the data file was written just now
  cache = tmp_path / "run" / run_data.PLAN_DIR
  first = run_data.build_data(settings.load(config), tmp_path / "run", None, cache_dir=cache)
  uninterrupted = _all_batches(iter(first.train.dataset()))
  assert len(uninterrupted) == first.total_steps >= 4 and first.eval is not None
  # the file's index, the plan, the rows of 2 training epochs and of the held-out epoch
  assert sorted(p.suffix for p in cache.iterdir()) == [".npz"] * 5
  assert len(list(cache.glob("index-*.npz"))) == 1

  def no(*args, **kwargs):
    raise AssertionError("planned again instead of reading the cache")

  monkeypatch.setattr(plan_lib, "make_plan", no)
  monkeypatch.setattr(packing, "plan_rows", no)
  monkeypatch.setattr(offsets, "jsonl_lines", no)  # nor is the data file read again
  again = run_data.build_data(settings.load(config), tmp_path / "run", None, cache_dir=cache)
  assert again.train.stats.as_dict() == first.train.stats.as_dict()
  it = iter(first.train.dataset())
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  resumed = iter(again.train.dataset())
  resumed.set_state(state)
  rest = _all_batches(resumed)
  assert len(rest) == len(uninterrupted) - 3
  for got, want in zip(rest, uninterrupted[3:]):
    for f in packing.ROW_FIELDS:  # tokens, weights, segment ids, ...: exactly equal
      np.testing.assert_array_equal(got[f], want[f], err_msg=f)


def _fake_checkpoint(workdir, step: int, states: list) -> None:
  """A step folder as far as the data checks read it: meta and one data file per process."""
  folder = workdir / "checkpoints" / str(step)
  (folder / "meta").mkdir(parents=True)
  (folder / "meta" / "metadata").write_text("{}")
  (folder / "data").mkdir()
  for i, state in enumerate(states):
    (folder / "data" / f"process_{i}-of-{len(states)}.json").write_text(json.dumps(state))


@pytest.mark.parametrize("index_cached", [False, True], ids=["hashed", "index_cached"])
def test_a_data_file_changed_in_place_is_detected(config, tmp_path, monkeypatch, index_cached):
  if index_cached:  # the first start caches its index of the file, and the hash with it
    monkeypatch.setattr(offsets, "RACY_SECONDS", 0)
  workdir = tmp_path / "run"
  cache = workdir / run_data.PLAN_DIR
  first = run_data.build_data(settings.load(config), workdir, None, cache_dir=cache)
  it = iter(first.train.dataset())
  next(it)
  _fake_checkpoint(workdir, 1, [it.get_state()])
  run_data.check_data_position(workdir, first.train)  # the same data: resumable
  data = config.data.train
  stat = os.stat(data)
  text = open(data, encoding="utf-8").read()
  changed = text.replace("alpha", "gamma", 1)  # same size, same length in tokens
  assert changed != text and len(changed) == len(text)
  with open(data, "r+", encoding="utf-8") as f:  # in place: same inode, size and mtime
    f.write(changed)
  os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert os.stat(data).st_size == stat.st_size
  assert len(list(cache.glob("index-*.npz"))) == index_cached
  plans = len(list(cache.glob("*.npz")))
  second = run_data.build_data(settings.load(config), workdir, None, cache_dir=cache)
  assert len(list(cache.glob("[0-9a-f]*.npz"))) == 2, "the changed file was not planned again"
  assert len(list(cache.glob("*.npz"))) > plans
  with pytest.raises(ConfigError) as e:
    run_data.check_data_position(workdir, second.train)
  message = str(e.value)
  assert "\n" not in message and "checkpoint 1" in message and "training data" in message


def test_a_refused_start_caches_no_index(config, tmp_path, monkeypatch):
  monkeypatch.setattr(offsets, "RACY_SECONDS", 0)
  records_in = _alpaca_like(20)
  records_in[9] = {"instruction": 3}
  _write_jsonl(tmp_path / "data.jsonl", records_in)
  cache = tmp_path / "run" / run_data.PLAN_DIR
  with pytest.raises(DataError, match=r"data.jsonl:10: "):
    run_data.build_data(settings.load(config), tmp_path / "run", None, cache_dir=cache)
  assert not cache.exists() or not list(cache.iterdir())


def test_a_position_tied_to_another_process_count_is_refused_in_one_line(config, tmp_path):
  workdir = tmp_path / "run"
  data = run_data.build_data(settings.load(config), workdir, None,
                               cache_dir=workdir / run_data.PLAN_DIR)
  old = {"next_index": 5}  # grain's per-process iterator state, before the global plan
  _fake_checkpoint(workdir, 20, [old, old])
  with pytest.raises(ConfigError) as e:
    run_data.check_data_position(workdir, data.train)
  message = str(e.value)
  assert "\n" not in message
  assert "checkpoint 20" in message and "written by 2 process(es) and this run has 1" in message
  assert "rerun with 2 processes" in message and "new workdir" in message
  assert (workdir / "checkpoints" / "20" / "data").is_dir()  # nothing moved


class _Iterator:
  """A data iterator for the store, elastic (process-count independent) or not."""

  def __init__(self, elastic: bool):
    self.elastic, self.state = elastic, {"batches": 0}

  def get_state(self):
    return self.state

  def set_state(self, state):
    self.state = state


def test_store_restores_another_process_count_only_for_an_elastic_iterator(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from im_jax.train.loop import abstract_like  # pylint: disable=g-import-not-at-top

  state = {"w": jnp.arange(4.0)}
  store = store_lib.CheckpointStore(tmp_path, store_lib.CheckpointConfig(every_steps=1,
                                                                         async_save=False))
  store.save(3, state, {"batches": 3}, {"m": 1}, force=True)
  store.close()
  data = tmp_path / "checkpoints" / "3" / "data"
  (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")  # as 2 processes write
  (data / "process_1-of-2.json").write_text(json.dumps({"batches": 3}))
  store = store_lib.CheckpointStore(tmp_path, store_lib.CheckpointConfig(async_save=False))
  with pytest.raises(store_lib.ProcessCountChanged, match="written by 2 process.* this run has 1"):
    store.restore_latest(abstract_like(state), data_iterator=_Iterator(elastic=False))
  assert data.is_dir() and not (tmp_path / store_lib.DAMAGED_DIR).exists()  # healthy: kept
  elastic = _Iterator(elastic=True)
  restored = store.restore_latest(abstract_like(state), data_iterator=elastic)
  store.close()
  assert restored.step == 3 and elastic.state == {"batches": 3}
  np.testing.assert_array_equal(restored.state["w"], state["w"])
