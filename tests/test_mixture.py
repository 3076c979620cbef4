"""Weighted mixtures of sources (`data.train=a.jsonl@0.3,b.jsonl@0.7`).

Independent references: the weights (realised shares within sampling error, counted from the
rows' segments), the single-source run (a one-source mixture), `python -m im_jax.eval loss`'s
evaluator on each source's held-out examples alone (per-source metrics), an uninterrupted
iteration (a resume from a saved position into a pipeline rebuilt from scratch: the kill of
a training subprocess is tests/test_resume.py's, for the same iterator state).
"""

import collections
import json
import math
import pathlib

import jax
import numpy as np
import pytest

from im_jax.configs import base
from im_jax import report
from im_jax.run import dry_run, experiment, run_data, settings
from im_jax.checkpoint import store as store_lib
from im_jax.convert.__main__ import main as convert_main
from im_jax.convert.hf_export import EXPORT_METADATA
from im_jax.data import mixture
from im_jax.data import packing
from im_jax.data import pipeline as pipeline_lib
from im_jax.data import plan as plan_lib
from im_jax.data.stats import load_tokenizer
from im_jax.eval import loss_eval
from im_jax.run.settings import ConfigError, loss_config, validate
from im_jax.train import loop as loop_lib
from im_jax.train import loss as loss_lib
from im_jax.train import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = {"lima": 90, "dolly": 30}


def _write(path, n: int, tag: str, seed: int) -> None:
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "omega", "sum", "list", "word"]
  say = lambda k: " ".join(rng.choice(words, int(k)))  # noqa: E731
  path.write_text("".join(json.dumps({"instruction": f"{tag} {i}: {say(rng.integers(2, 15))}",
                                      "output": say(rng.integers(1, 40))}) + "\n"
                          for i in range(n)))


@pytest.fixture
def files(tmp_path):
  out = {}
  for seed, (name, n) in enumerate(SIZES.items()):
    out[name] = tmp_path / f"{name}.jsonl"
    _write(out[name], n, name, seed)
  return out


def _config(train: str, tokenizer, **data):
  c = base.get_config()
  c.data.train, c.data.tokenizer = train, str(tokenizer)
  c.data.max_seq_len, c.data.read_threads = 64, 0
  c.train.batch_size, c.train.epochs, c.train.grad_accum, c.eval.batch_size = 16, 2, 2, 8
  for key, value in data.items():
    c.data[key] = value
  return c


def _batches(data, start=0):
  it = iter(data.dataset())
  if start:
    it.set_state({**it.get_state(), "batches": start})
  return [dict(b) for b in it]


def _assert_same(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for f in a:
      np.testing.assert_array_equal(a[f], b[f], err_msg=f)


# ------------------------------------------------------------------------------ sampling

def _examples(n: int, rng) -> list[dict[str, np.ndarray]]:
  out = []
  for _ in range(n):
    length = int(rng.integers(4, 30))
    tokens = rng.integers(1, 500, length).astype(np.int32)
    out.append({"tokens": tokens, "targets": tokens, "target_kinds": np.full(length, 5, np.int8),
                "loss_weights": np.ones(length, np.float32)})
  return out


def test_realised_shares_follow_the_weights_and_sources_read_through_permutations():
  rng = np.random.default_rng(0)
  sizes, weights = [3000, 500, 1500], [0.2, 0.5, 0.3]
  examples = [e for n in sizes for e in _examples(n, rng)]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  entries = [mixture.Source(f"s{s}.jsonl", w, name=f"s{s}") for s, w in enumerate(weights)]
  mix = mixture.Mixture(entries, offsets, [np.arange(offsets[s], offsets[s + 1])
                                           for s in range(3)], seed=5)
  assert mix.total == 5000 and list(mix.quotas) == [1000, 2500, 1500]
  lengths = np.array([len(e["tokens"]) for e in examples], np.int32)
  cfg = pipeline_lib.PipelineConfig(batch_size=16, packing="first_fit", num_packing_bins=8,
                                    num_epochs=3, seed=5, read_threads=0)
  data = pipeline_lib.DataPipeline(examples.__getitem__, lengths, 64, cfg, 0, 1,
                                   epoch_examples=mix.epoch_examples,
                                   example_sources=(mix.source_of(np.arange(5000)) + 1))
  # What the rows hold, segment by segment: the example (by its tokens) and its source id.
  key_of = {examples[i]["tokens"].tobytes(): i for i in range(len(examples))}
  seen = []
  for batch in data:
    for r in range(16):
      row = {f: batch[f][r] for f in (*packing.ROW_FIELDS, packing.SOURCE_IDS)}
      for seg in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
        at = row["segment_ids"] == seg
        i = key_of[row["tokens"][at].tobytes()]
        assert set(row[packing.SOURCE_IDS][at]) == {mix.source_of(np.array([i]))[0] + 1}
        seen.append(i)
  assert len(seen) == 15000  # three epochs of N = 5000
  source = mix.source_of(np.array(seen))
  # Any stretch of the shuffled run holds each source within sampling error of its weight.
  for window in (slice(0, 2000), slice(4000, 14000)):
    n = window.stop - window.start
    for s, w in enumerate(weights):
      share = np.mean(source[window] == s)
      assert abs(share - w) < 4 * math.sqrt(w * (1 - w) / n), (window, s, share)
  for epoch in range(3):
    picks = np.array(seen[epoch * 5000:(epoch + 1) * 5000])
    counts = collections.Counter(mix.source_of(picks).tolist())
    assert [counts[s] for s in range(3)] == [1000, 2500, 1500]  # exact per epoch
    up = collections.Counter(picks[mix.source_of(picks) == 1].tolist())
    assert set(up.values()) == {5} and len(up) == 500  # upsampled: whole permutations
  down = np.array(seen)[source == 0]
  assert len(set(down.tolist())) == 3000  # downsampled: every example once before repeats


def test_a_one_source_mixture_is_the_single_source_run(files, tiny_tokenizer_dir, tmp_path):
  plain = _config(str(files["lima"]), tiny_tokenizer_dir, eval_fraction=0.1)
  plain.train.max_steps = 40  # past the 2 epochs: epochs are added as for one source
  one = _config(f"{files['lima']}@0.7@format=alpaca", tiny_tokenizer_dir, eval_fraction=0.1)
  one.train.max_steps = 40
  want = run_data.build_data(settings.load(plain), tmp_path / "a", None)
  got = run_data.build_data(settings.load(one), tmp_path / "b", None)
  assert got.mixture is not None and want.mixture is None
  assert got.total_steps == want.total_steps == 40 and got.updates == want.updates
  assert got.train.config.num_epochs == want.train.config.num_epochs > 2
  _assert_same(_batches(got.train), _batches(want.train))  # no source_ids: one source
  _assert_same(_batches(got.eval), _batches(want.eval))


# --------------------------------------------------------------------------- resume

def test_a_mixture_resumes_exactly_from_a_saved_position(files, tiny_tokenizer_dir, tmp_path):
  """The iterator state a checkpoint stores, restored into a pipeline rebuilt from scratch
  (from the cached plans), continues the uninterrupted run's batches bit for bit."""
  c = _config(f"{files['lima']}@1,{files['dolly']}@3@template=hf", tiny_tokenizer_dir,
              eval_fraction=0.1)
  c.train.epochs = 3
  cache = tmp_path / "run" / run_data.PLAN_DIR
  first = run_data.build_data(settings.load(c), tmp_path / "run", None, cache_dir=cache)
  uninterrupted = _batches(first.train)
  assert packing.SOURCE_IDS in uninterrupted[0]
  stop = first.train.steps_per_epoch + 3  # inside the second epoch
  it = iter(first.train.dataset())
  for _ in range(stop):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  rebuilt = run_data.build_data(settings.load(c), tmp_path / "run", None, cache_dir=cache)
  resumed = iter(rebuilt.train.dataset())
  resumed.set_state(state)
  _assert_same([dict(b) for b in resumed], uninterrupted[stop:])
  c.data.train = f"{files['lima']}@1,{files['dolly']}@2@template=hf"  # another weight
  other = run_data.build_data(settings.load(c), tmp_path / "run", None, cache_dir=cache)
  assert "training data" in other.train.state_problem(state)


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("spec, message", [
    ("{a}@0", "source {a}: weight '0' is not a positive number"),
    ("{a}@-1,{b}@1", "source {a}: weight '-1' is not a positive number"),
    ("{a}@x,{b}@1", "source {a}: weight 'x' is not a positive number"),
    ("{a}@1,{b}", "source {b} has no weight"),
    ("{a}@1,{a}@2", "source {a} is listed twice"),
    ("{a}@1,{b}@1@format=tulo", "source {b}: unknown format 'tulo'"),
    ("{a}@1,{b}@1@template=chatml", "source {b}: unknown template 'chatml'"),
    ("{a}@1,{b}@1@sep=x", "source {b}: unknown option 'sep=x'"),
    ("{a}@1,{b}@1@name=lima", "have the same name 'lima'"),
    ("{a}@1,{b}@1@loss=lm", "source {b}: unknown loss 'lm'"),
    ("{a}@1,{b}@1@example_weight=0", "source {b}: example_weight '0' is not a positive"),
    ("{a}@1@example_weight=0.5", "example_weight weighs a source against the others"),
    ("{a}@1,{b}@1@drop_rule=none", "source {b}: unknown drop_rule 'none'"),
    ("{a}@1,{b}@1@loss=im_release@template=hf",
     "mode im_release reproduces the authors' tulu code"),
])
def test_bad_mixtures_are_one_line_naming_the_source(files, tiny_tokenizer_dir, spec, message):
  a, b = files["lima"], files["dolly"]
  c = _config(spec.format(a=a, b=b), tiny_tokenizer_dir)
  with pytest.raises(ConfigError) as e:
    validate(c, 8, 1)
  assert message.format(a=a, b=b) in str(e.value) and "\n" not in str(e.value)


def test_a_source_may_train_under_its_own_loss_mode_and_drop_rule(tmp_path, tiny_tokenizer_dir):
  """IT beside instructions alone (the study's it_instr control): the instructions' tokens
  carry the weight `im` gives them, the IT source's only its outputs, as each alone would."""
  from im_jax.data.conversation import Conversation, Message  # pylint: disable=g-import-not-at-top
  from im_jax.data.encode import Encoder  # pylint: disable=g-import-not-at-top

  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"messages": [
      {"role": "user", "content": f"question {i} alpha beta"},
      {"role": "assistant", "content": f"answer {i} gamma"}]}) + "\n" for i in range(6)))
  alone = tmp_path / "alone.jsonl"
  alone.write_text("".join(json.dumps({"messages": [
      {"role": "user", "content": f"question {i} alpha beta"}]}) + "\n" for i in range(6)))
  config = _config(f"{pairs}@1,{alone}@1@loss=im@drop_rule=no_weight", tiny_tokenizer_dir,
                   eval_fraction=0.0)
  config.loss.mode = "it"
  c = settings.load(config)
  it_source, lm_source = settings.train_sources(c)
  tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
  question = Conversation((Message("user", "question 0 alpha beta"),))
  pair = Conversation(question.messages + (Message("assistant", "answer 0 gamma"),))
  lm = Encoder(tokenizer, settings.encode_config(c, lm_source)).encode_full(question)
  it = Encoder(tokenizer, settings.encode_config(c, it_source)).encode_full(pair)
  im = Encoder(tokenizer, settings.encode_config(c, lm_source)).encode_full(pair)
  assert lm.example is not None and it.example is not None
  # the lone instruction's weights are IM's on the same tokens; IT's source keeps outputs only
  n = len(lm.example["loss_weights"])
  np.testing.assert_array_equal(lm.example["loss_weights"], im.example["loss_weights"][:n])
  assert lm.example["loss_weights"].sum() > 0
  assert it.example["loss_weights"][:n].sum() == 0 and it.example["loss_weights"].sum() > 0
  # and the pipeline keeps every lone instruction (under no_output they would be dropped)
  data = run_data.build_data(c, tmp_path / "w", None)
  assert data.train.stats.kept == 12


def test_a_source_with_no_example_left_stops_before_training(files, tiny_tokenizer_dir,
                                                              tmp_path):
  long = tmp_path / "long.jsonl"
  long.write_text(json.dumps({"instruction": "word " * 300, "output": "ok"}) + "\n")
  c = _config(f"{files['lima']}@1,{long}@1", tiny_tokenizer_dir)
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError) as e:  # --dry-run's plan: the run's own checks, no writes
    dry_run.data_plan(settings.load(c), workdir)
  assert str(e.value) == (f"data.train: source long ({long}) has no training example left: 1 "
                          "after the held-out split and data.max_examples, dropped: 1 no_output")
  assert not workdir.exists()


def test_config_helper_writes_the_command_line_form(files):
  text = mixture.spec([dict(path=str(files["lima"]), weight=0.3),
                       dict(path=str(files["dolly"]), weight=0.7, format="alpaca",
                            template="hf", name="dolly15k")])
  assert text == f"{files['lima']}@0.3,{files['dolly']}@0.7@format=alpaca@template=hf@name=dolly15k"
  assert [(s.name, s.weight, s.format, s.template) for s in mixture.parse(text)] == [
      ("lima", 0.3, None, None), ("dolly15k", 0.7, "alpaca", "hf")]
  with pytest.raises(mixture.MixtureError, match="give path and weight"):
    mixture.spec([dict(path="x.jsonl")])
  assert mixture.parse(str(files["lima"])) == [mixture.Source(str(files["lima"]), name="lima")]
  assert mixture.default_name("hf:allenai/tulu-v2-sft-mixture:train") == "tulu-v2-sft-mixture"


# ------------------------------------------------------------- per-source metrics, export

@pytest.mark.usefixtures("compilation_cache")  # the two evaluations alone compile once
def test_per_source_metrics_equal_each_source_evaluated_alone(files, tiny_tokenizer_dir,
                                                              tmp_path):
  spec = f"{files['lima']}@1,{files['dolly']}@1@template=hf"
  c = _config(spec, tiny_tokenizer_dir, eval_fraction=0.3)
  c.model.preset, c.train.max_steps, c.mesh.fsdp = "tiny", 2, 8
  plan = dry_run.format_plan(dry_run.data_plan(settings.load(c), tmp_path / "run"))
  assert "source lima (" in plan and "source dolly (" in plan and "template hf" in plan
  assert "data mixture: an epoch is" in plan
  exp = experiment.build(settings.load(c), tmp_path / "run")
  mixed = loop_lib.evaluate(exp.state, exp.eval_step, iter(exp.eval_data.dataset()), exp.mesh,
                            loss_eval.finalize)
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.merge(exp.graphdef, exp.state.params, *exp.state.fixed())
  tokenizer = load_tokenizer(str(exp.tokenizer_dir))
  records = run_data.open_source_records
  for source in mixture.parse(spec):
    part = records(c, source)
    held = [part.read(i) for i in range(len(part))
            if plan_lib.split_value(part.read(i)) < c.data.eval_fraction * 2.0**64]
    alone = loss_eval.evaluate_loss(
        model, tokenizer, held, loss_eval.LossEvalConfig(
            template=source.template or "tulu", loss_mode=c.loss.mode, max_seq_len=64),
        mesh=exp.mesh)
    for group in ("output", "instruction"):
      assert mixed[f"eval_{group}_examples/{source.name}"] == alone[f"{group}_examples"] > 0
      np.testing.assert_allclose(mixed[f"eval_{group}_loss_per_example/{source.name}"],
                                 alone[f"{group}_loss_per_example"], rtol=2e-6)
  # Training reports them too: the train step's loss function (its sums are summed over
  # micro-batches and devices as the totals are); one batch's counts match its rows.
  batch = next(iter(exp.train_data.dataset()))
  sums = jax.jit(step_lib.make_loss_fn(loss_config(settings.load(c))))(model, batch, None)
  metrics = loss_lib.finalize(sums)
  for index, name in enumerate(("lima", "dolly"), start=1):
    has_output = [len(np.unique(batch["segment_ids"][r][(batch[packing.SOURCE_IDS][r] == index)
                                                        & (batch["target_kinds"][r] >= 5)]))
                  for r in range(len(batch["tokens"]))]
    assert float(metrics[f"output_examples/{name}"]) == sum(has_output) > 0
    assert np.isfinite(float(metrics[f"output_loss_per_example/{name}"]))
  # The export names the template it carries (the run's) and each source's override: from the
  # trainer, and from `python -m im_jax.convert to-hf` of a checkpoint.
  exp.export_hf(exp.state)
  store = store_lib.CheckpointStore(tmp_path / "run", store_lib.CheckpointConfig(
      async_save=False))
  store.save(1, step_lib.checkpointed(exp.state), None, exp.meta, force=True)
  store.close()
  assert convert_main(["to-hf", "--ckpt", str(tmp_path / "run"), "--out",
                       str(tmp_path / "converted")]) == 0
  for folder in (tmp_path / "run" / "hf", tmp_path / "converted"):
    meta = json.loads((folder / EXPORT_METADATA).read_text())
    assert meta["template"] == "tulu" and meta["data"] == spec
    assert [(s["name"], s["template"]) for s in meta["sources"]] == [("lima", "tulu"),
                                                                     ("dolly", "hf")]


def test_the_report_adds_a_per_source_table(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  records = [{"step": 1, "loss": 2.0, "output_loss_per_example/lima": 1.5,
              "output_examples/lima": 3, "instruction_loss_per_example/lima": 2.5,
              "instruction_examples/lima": 3, "output_loss_per_example/dolly": 0.0,
              "output_examples/dolly": 0, "instruction_loss_per_example/dolly": 0.0,
              "instruction_examples/dolly": 0},
             {"step": 1, "eval_output_loss_per_example/lima": 1.25,
              "eval_output_examples/lima": 4, "eval_output_loss_per_example/dolly": 1.75,
              "eval_output_examples/dolly": 2}]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  table = report.source_table([report.load_run(run, "mix")])
  assert "| mix | lima | 1.5000 | 2.5000 | 1.2500 | n/a |" in table
  assert "| mix | dolly | n/a | n/a | 1.7500 | n/a |" in table  # a batch without dolly: n/a
