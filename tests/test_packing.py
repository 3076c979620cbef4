"""Packing, batch counts, sharding and resume of the grain pipeline.

Checked against the independent reference: each example encoded on its own.
"""

import collections
import json

import numpy as np
import pytest
import transformers

from im_jax.data import encode as encode_lib
from im_jax.data import packing
from im_jax.data import pipeline as pipeline_lib
from im_jax.data import sources
from im_jax.data import templates
from im_jax.data import weights as weights_lib

ROW = 512


@pytest.fixture(scope="module")
def real_subset(shared_data_dir):
  # long multi-turn LIMA examples (many truncated at ROW) and short Dolly ones
  lima = sources.load_conversations(shared_data_dir / "lima.jsonl").conversations
  dolly = sources.load_conversations(shared_data_dir / "alpagasus_dolly_3k.jsonl").conversations
  return lima[:60] + lima[-30:] + dolly[:150]


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_dir):
  return transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def _signature(fields: dict[str, np.ndarray]) -> tuple:
  return tuple(np.asarray(fields[f]).tobytes() for f in encode_lib.FIELDS + ("positions",))


def _segments(batches) -> list[dict[str, np.ndarray]]:
  out = []
  for batch in batches:
    for r in range(len(batch["tokens"])):
      out += packing.split_row({f: batch[f][r] for f in packing.ROW_FIELDS})
  return out


def _check_batches(batches, rows: int, row_length: int):
  for batch in batches:
    assert set(batch) == set(packing.ROW_FIELDS)
    for f in packing.ROW_FIELDS:
      assert batch[f].shape == (rows, row_length) and batch[f].dtype == packing.ROW_DTYPES[f], f
    padding = batch["segment_ids"] == 0
    for f in packing.ROW_FIELDS:  # padding is all zeros: no weight, kind PAD
      assert not batch[f][padding].any(), f


@pytest.mark.parametrize("packing_mode", ["first_fit", "best_fit", "none"])
def test_unpacking_gives_back_the_encoded_examples(smollm2, real_subset, packing_mode):
  config = encode_lib.EncodeConfig(templates.TemplateConfig("tulu"),
                                   weights_lib.LossMaskConfig("im"), max_seq_len=ROW)
  encoder = encode_lib.Encoder(smollm2, config)
  expected = [e for e in map(encoder.encode, real_subset) if e is not None]
  for e in expected:
    e["positions"] = np.arange(len(e["tokens"]), dtype=np.int32)
  pipe = pipeline_lib.build_pipeline(
      real_subset, smollm2, config,
      pipeline_lib.PipelineConfig(batch_size=4, packing=packing_mode, num_packing_bins=8,
                                  max_segments_per_row=6, seed=3),
      shard_index=0, shard_count=1)
  batches = list(pipe)
  assert len(batches) == pipe.steps_per_epoch == pipe.total_steps
  _check_batches(batches, 4, ROW)
  segments = _segments(batches)
  assert collections.Counter(map(_signature, segments)) == collections.Counter(
      map(_signature, expected))
  # the weights survive packing (TRL #3728): the same total as the encoded examples
  total = sum(float(b["loss_weights"].sum()) for b in batches)
  assert total > 0
  assert total == pytest.approx(sum(float(e["loss_weights"].sum()) for e in expected))
  per_row = max(len(np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]))
                for b in batches for r in range(4))
  assert per_row <= (1 if packing_mode == "none" else 6)
  # truncation is counted: tokens beyond ROW, from the template's own token counts
  chat = templates.ChatTemplate(smollm2, config.template)
  lengths = np.array([len(chat.tokenize(c)) for c in real_subset])
  assert pipe.stats.truncated_tokens == np.maximum(lengths - ROW, 0).sum() > 0
  assert pipe.stats.truncated_examples == (lengths > ROW).sum()
  assert pipe.stats.examples == len(real_subset)
  assert pipe.stats.kept + sum(pipe.stats.dropped.values()) == len(real_subset)
  assert pipe.stats.kept == len(expected)
  if packing_mode != "none":
    fill = sum(int((b["segment_ids"] > 0).sum()) for b in batches) / (len(batches) * 4 * ROW)
    assert fill > 0.8


def _synthetic(n: int, seed: int = 0, max_len: int = 60) -> list[dict[str, np.ndarray]]:
  """Examples whose first token is their index + 1, so segments say where they came from."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(1, max_len))
    tokens = rng.integers(1, 1000, length).astype(np.int32)
    tokens[0] = i + 1
    out.append({"tokens": tokens, "targets": tokens + 1,
                "loss_weights": rng.random(length).astype(np.float32),
                "target_kinds": rng.integers(1, 7, length).astype(np.int8)})
  return out


def _source_ids(segments) -> list[int]:
  return [int(s["tokens"][0]) - 1 for s in segments]


@pytest.mark.parametrize("shard_count", [2, 4])
def test_sharding_is_disjoint_complete_and_equal(shard_count):
  examples = _synthetic(203)
  config = pipeline_lib.PipelineConfig(batch_size=3, num_packing_bins=4, num_epochs=2, seed=7)
  per_shard = []
  for shard in range(shard_count):
    pipe = pipeline_lib.from_examples(examples, 64, config, shard, shard_count)
    batches = list(pipe)
    _check_batches(batches, 3, 64)
    assert len(batches) == pipe.total_steps == 2 * pipe.steps_per_epoch
    per_shard.append((pipe.steps_per_epoch, batches))
  assert len({steps for steps, _ in per_shard}) == 1  # equal batch counts on every process
  steps = per_shard[0][0]
  for epoch in range(2):
    seen = [_source_ids(_segments(b[epoch * steps:(epoch + 1) * steps])) for _, b in per_shard]
    for a in range(shard_count):
      for b in range(a + 1, shard_count):
        assert not set(seen[a]) & set(seen[b])  # disjoint
    assert sorted(sum(seen, [])) == list(range(len(examples)))  # complete, each once per epoch


def test_epochs_reshuffle_and_none_packing_is_one_per_row():
  examples = _synthetic(40)
  pipe = pipeline_lib.from_examples(
      examples, 64, pipeline_lib.PipelineConfig(batch_size=8, packing="none", num_epochs=2),
      0, 1)
  batches = list(pipe)
  assert pipe.steps_per_epoch == 5 and len(batches) == 10
  first, second = _source_ids(_segments(batches[:5])), _source_ids(_segments(batches[5:]))
  assert sorted(first) == sorted(second) == list(range(40)) and first != second
  assert all(b["segment_ids"].max(axis=1).max() <= 1 for b in batches)


def test_steps_per_epoch_is_known_before_iterating_with_drops():
  examples = _synthetic(120, seed=1)
  examples[5] = examples[77] = None  # dropped by encoding
  config = pipeline_lib.PipelineConfig(batch_size=2, packing="best_fit", num_packing_bins=3,
                                       num_epochs=3, max_segments_per_row=3)
  pipes = [pipeline_lib.from_examples(examples, 80, config, shard, 3) for shard in range(3)]
  steps = pipes[0].total_steps  # before iterating
  assert pipes[0].epoch_rows.shape == (3,)
  empty_rows = 0
  for pipe in pipes:
    batches = list(pipe)
    assert len(batches) == steps == pipe.total_steps
    empty_rows += sum(int((b["segment_ids"] == 0).all(axis=1).sum()) for b in batches)
  # the all-padding rows, over all processes, are the ones planned to close each epoch
  planned = pipes[0].steps_per_epoch * pipes[0].global_batch_size * 3 - pipes[0].epoch_rows.sum()
  assert empty_rows == planned > 0


def test_resume_yields_identical_batches():
  examples = _synthetic(150, seed=2)
  config = pipeline_lib.PipelineConfig(batch_size=2, num_packing_bins=4, num_epochs=2, seed=11)
  pipe = pipeline_lib.from_examples(examples, 64, config, 1, 2)
  reference = list(pipe)
  # resume at several points, including right at and past the epoch boundary
  for stop in (0, 3, pipe.steps_per_epoch, pipe.steps_per_epoch + 2):
    it = iter(pipe.dataset())
    for _ in range(stop):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # it goes into checkpoints as JSON
    resumed = iter(pipe.dataset())
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - stop
    for got, want in zip(rest, reference[stop:]):
      for f in packing.ROW_FIELDS:
        np.testing.assert_array_equal(got[f], want[f])


def test_with_epochs_equals_a_pipeline_built_for_those_epochs():
  examples = _synthetic(90, seed=3)
  config = pipeline_lib.PipelineConfig(batch_size=4, num_packing_bins=4, num_epochs=1, seed=5)
  one = pipeline_lib.from_examples(examples, 64, config, 0, 2)
  three = one.with_epochs(3)
  direct = pipeline_lib.from_examples(
      examples, 64, pipeline_lib.PipelineConfig(batch_size=4, num_packing_bins=4, num_epochs=3,
                                                seed=5), 0, 2)
  assert three.total_steps == direct.total_steps and one.config.num_epochs == 1
  for a, b in zip(three, direct, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
