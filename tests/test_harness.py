"""lm-evaluation-harness on the JAX model (im_jax.eval.harness_lm) against lm-eval's own `hf`
backend on the same SmolLM2 weights, request by request; packing, sharding and truncation;
the `eval harness` command's bad-input handling.

One SmolLM2 load (sharded over 8 simulated devices, data x fsdp x tensor = 2 x 2 x 2) and one
`hf` backend load are shared by the module; its exported folder is the session's.
"""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402

from im_jax.run import settings
from im_jax.eval import __main__ as eval_main  # noqa: E402
from im_jax.eval import harness, harness_lm  # noqa: E402
from im_jax.train import sharding  # noqa: E402
from tests import fixtures_lib  # noqa: E402

pytestmark = [pytest.mark.slow]  # the real SmolLM2 against lm-eval's hf backend, training runs

REL = 1e-4  # the tolerance, float32 against PyTorch

LL_REQUESTS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " London"),
    ("Question: What is the capital of France?\nAnswer: ", "Paris"),  # space moves over
    ("", "The quick brown fox jumps over the lazy dog."),  # empty context: the prefix token
    ("Q: What is the capital of France?\nA:", " The capital of France is Paris"),  # greedy
    ("Q: What is 2 + 2?\nA:", " 4"),
    ("Q: What is 2 + 2?\nA:", " The answer is 4, because two and two make four."),
    ("Instruction modelling applies the loss to the instructions as well as to the outputs, "
     "and it helps most when instructions are long and examples are few. In short,", " yes"),
]
ROLLING_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was not amused, and said so at length.",
    "Instruction tuning masks the prompt; instruction modelling does not. Which overfits less?",
]
GEN_REQUESTS = [  # one batch: the first stops on a string, the second runs to max_gen_toks
    ("Q: What is the capital of France?\nA:", {"until": ["\n", "."], "max_gen_toks": 8}),
    ("Q: Which animal barks?\nA:", {"until": ["\n", "."], "max_gen_toks": 8}),
]
SHORT = 24  # a context length that forces left truncation and several rolling windows


def _instances(kind, args):
  return [Instance(kind, {}, a if isinstance(a, tuple) else (a,), i) for i, a in enumerate(args)]


def _close(ours, theirs):
  np.testing.assert_allclose([v for v, _ in ours], [v for v, _ in theirs], rtol=REL)
  assert [g for _, g in ours] == [g for _, g in theirs]


MC_DOCS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "London", "Rome"],
     "answer": 0},
    {"question": "Which animal barks?", "choices": ["cat", "dog", "fish"], "answer": 1},
    {"question": "2 + 2 =", "choices": ["3", "4", "22"], "answer": 1},
    {"question": "Water freezes at", "choices": ["0 degrees Celsius", "100 degrees Celsius"],
     "answer": 0},
]


def write_mc_task(folder: pathlib.Path, name: str = "im_jax_mc") -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  data = folder / f"{name}.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
  (folder / f"{name}.yaml").write_text(
      f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
      "test_split: test\noutput_type: multiple_choice\n"
      'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
      'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
      "    aggregation: mean\n    higher_is_better: true\n")
  return folder


@pytest.fixture(scope="module")
def lmeval_hf_dir(smollm2_hf_dir, tmp_path_factory) -> pathlib.Path:
  """The exported folder as lm-eval's hf backend loads it: config.json without the GGUF
  `quantization_config` (which it refuses), the other files linked."""
  out = tmp_path_factory.mktemp("smollm2_for_lm_eval")
  for f in smollm2_hf_dir.iterdir():
    if f.name != "config.json":
      (out / f.name).symlink_to(f)
  config = json.loads((smollm2_hf_dir / "config.json").read_text())
  config.pop("quantization_config", None)
  (out / "config.json").write_text(json.dumps(config))
  return out


@pytest.fixture(scope="module")
def hf_lm(lmeval_hf_dir):
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top

  return HFLM(pretrained=str(lmeval_hf_dir), batch_size=4, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def smollm2(smollm2_hf_dir, compilation_cache):
  """SmolLM2 on one device (the parity tests: quick steps); the sharding test spreads it."""
  from im_jax.convert import load  # pylint: disable=g-import-not-at-top
  from im_jax.data.stats import load_tokenizer  # pylint: disable=g-import-not-at-top

  return load.load_pretrained(f"hf:{smollm2_hf_dir}").model, load_tokenizer(str(smollm2_hf_dir))


@pytest.fixture(scope="module")
def jax_lm(smollm2, smollm2_hf_dir):
  model, tokenizer = smollm2
  single = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  return harness_lm.HarnessLM(model, tokenizer, mesh=single, batch_size=4,
                              stop_ids=harness_lm.default_stop_ids(tokenizer, smollm2_hf_dir))


def test_loglikelihood_equals_hf_backend(jax_lm, hf_lm):
  requests = _instances("loglikelihood", LL_REQUESTS)
  theirs = hf_lm.loglikelihood(requests)
  _close(jax_lm.loglikelihood(requests), theirs)
  assert any(g for _, g in theirs) and not all(g for _, g in theirs)  # both flags exercised


def test_rolling_equals_hf_backend(jax_lm, hf_lm):
  requests = _instances("loglikelihood_rolling", ROLLING_TEXTS)
  np.testing.assert_allclose(jax_lm.loglikelihood_rolling(requests),
                             hf_lm.loglikelihood_rolling(requests), rtol=REL)


def test_left_truncation_equals_hf_backend(jax_lm, hf_lm, monkeypatch):
  """Context + continuation longer than the context length: both keep the last tokens
  (loglikelihood) and roll windows (loglikelihood_rolling) the same way."""
  monkeypatch.setattr(hf_lm, "_max_length", SHORT)
  monkeypatch.setattr(jax_lm, "_max_length", SHORT)
  requests = _instances("loglikelihood", LL_REQUESTS)
  assert max(len(c) + len(x) for _, c, x in _encoded(jax_lm, requests)) > SHORT + 1
  _close(jax_lm.loglikelihood(requests), hf_lm.loglikelihood(requests))
  rolling = _instances("loglikelihood_rolling", ROLLING_TEXTS)
  np.testing.assert_allclose(jax_lm.loglikelihood_rolling(rolling),
                             hf_lm.loglikelihood_rolling(rolling), rtol=REL)


def _encoded(lm, requests):
  captured = []
  original = lm._loglikelihood_tokens  # pylint: disable=protected-access
  lm._loglikelihood_tokens = lambda reqs, **kw: captured.extend(reqs) or [(0.0, False)] * len(reqs)
  try:
    lm.loglikelihood(requests)
  finally:
    lm._loglikelihood_tokens = original
  return captured


def test_generate_until_equals_hf_backend(jax_lm, hf_lm):
  requests = _instances("generate_until", GEN_REQUESTS)
  ours = jax_lm.generate_until(requests)
  assert ours == hf_lm.generate_until(requests)
  assert ours[0] == " The capital of France is Paris"  # stopped on "."
  assert len(jax_lm.tokenizer(ours[1])["input_ids"]) == 8  # ran to max_gen_toks


def test_packed_equals_one_at_a_time(jax_lm):
  encoded = _encoded(jax_lm, _instances("loglikelihood", LL_REQUESTS))
  sequences = [c + x for _, c, x in encoded]
  scored = [len(x) for _, _, x in encoded]
  batch = harness_lm.pack([len(s) - 1 for s in sequences], jax_lm.rows)
  assert any(len({r for _, r, _ in placed}) < len(placed) for _, placed in batch)  # packed
  together = jax_lm.score_sequences(sequences, scored)
  alone = [jax_lm.score_sequences([s], [k])[0] for s, k in zip(sequences, scored)]
  np.testing.assert_allclose([v for v, _ in together], [v for v, _ in alone], rtol=1e-5)
  assert [g for _, g in together] == [g for _, g in alone]


def test_sharded_equals_single_device(tiny_tokenizer_dir):
  """Rows over data x fsdp (8 simulated devices: 2 x 2 x 2), parameters in their FSDP and
  tensor layout, against the same weights on one device (a tiny random model: quick to
  compile, and the sharding is the same code for any size)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from im_jax.data.stats import load_tokenizer  # pylint: disable=g-import-not-at-top
  from im_jax.models.llama import Llama, LlamaConfig  # pylint: disable=g-import-not-at-top

  tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  config = LlamaConfig.preset("tiny", vocab_size=len(tokenizer))
  model = Llama(config, rngs=nnx.Rngs(3))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  placed = [jax.device_put(s, sharding.state_shardings(s, mesh)) for s in (params, rest)]
  assert max(len(x.sharding.device_set) for x in jax.tree.leaves(placed[0])) == 8
  spread = nnx.merge(graphdef, *placed)
  single = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  lms = [harness_lm.HarnessLM(m, tokenizer, mesh=x, batch_size=4)
         for m, x in ((spread, mesh), (model, single))]
  assert [lm.rows for lm in lms] == [4, 4]  # one row per (data, fsdp) shard
  requests = _instances("loglikelihood", LL_REQUESTS)
  sharded, alone = (lm.loglikelihood(requests) for lm in lms)
  np.testing.assert_allclose([v for v, _ in sharded], [v for v, _ in alone], rtol=1e-5)
  assert [g for _, g in sharded] == [g for _, g in alone]
  generate = _instances("generate_until", GEN_REQUESTS)
  assert lms[0].generate_until(generate) == lms[1].generate_until(generate)


def test_task_accuracy_equals_hf_backend(jax_lm, hf_lm, tmp_path):
  tasks = harness.prepare_tasks("im_jax_mc", include_path=str(write_mc_task(tmp_path)))
  ours = harness.flat_metrics(harness.run_tasks(jax_lm, tasks))
  theirs = harness.flat_metrics(harness.run_tasks(hf_lm, tasks))
  assert ours == pytest.approx(theirs) and set(ours) == {"harness/im_jax_mc/acc",
                                                          "harness/im_jax_mc/acc_stderr"}


# The command line: every bad input is one line, exit status 2, before the model loads.


def _bad(capsys, args, out=None):
  code = eval_main.main(["harness", *args] + (["--out", str(out)] if out else []))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
  assert out is None or not out.exists()
  return err[0]


@pytest.fixture
def model_dir(tiny_tokenizer_dir, tmp_path):
  """A tiny random model's Hugging Face folder: the bad inputs stop before its weights load
  (the checked loader reads its headers, so the folder must be whole)."""
  return f"hf:{fixtures_lib.tiny_hf_base(tiny_tokenizer_dir, tmp_path / 'model')}"


def test_bad_inputs_are_one_line(capsys, tmp_path, model_dir):
  tasks = write_mc_task(tmp_path / "tasks")
  out = tmp_path / "out" / "results.json"
  local = ["--include-path", str(tasks)]
  assert "unknown task im_jax_mcq (did you mean im_jax_mc" in _bad(
      capsys, ["--model", model_dir, "--tasks", "im_jax_mcq", *local], out)
  assert "--limit must be >= 1" in _bad(
      capsys, ["--model", model_dir, "--tasks", "im_jax_mc", "--limit", "0", *local], out)
  assert "--num-fewshot must be >= 0" in _bad(
      capsys, ["--model", model_dir, "--tasks", "im_jax_mc", "--num-fewshot", "-1", *local], out)
  assert str(tmp_path) in _bad(
      capsys, ["--model", str(tmp_path), "--tasks", "im_jax_mc", *local], out)
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "bad.yaml").write_text("task: x\n  dataset_path: [\n")
  assert "bad.yaml: does not parse" in _bad(
      capsys, ["--model", model_dir, "--tasks", "x", "--include-path", str(broken)], out)
  # Data not in the cache with the Hub offline: the task and the download to run.
  remote = tmp_path / "remote"
  remote.mkdir()
  (remote / "r.yaml").write_text("task: remote_mc\ndataset_path: im-jax-test/absent\n"
                                 "test_split: test\noutput_type: multiple_choice\n"
                                 'doc_to_text: "{{q}}"\ndoc_to_choice: "{{c}}"\n'
                                 'doc_to_target: "{{a}}"\n')
  line = _bad(capsys, ["--model", model_dir, "--tasks", "remote_mc", "--include-path",
                       str(remote)], out)
  assert "task remote_mc" in line and "hf download --repo-type dataset im-jax-test/absent" in line
  # --out inside an input
  assert "inside the input" in _bad(
      capsys, ["--model", model_dir, "--tasks", "im_jax_mc", *local,
               "--out", str(tasks / "results.json")])


# In training: eval.harness_* keys, a hook the top-level wiring hands to the loop.


def test_training_logs_harness_scores_of_the_trained_state(tmp_path, tiny_tokenizer_dir):
  from im_jax.configs import base  # pylint: disable=g-import-not-at-top
  from im_jax.run import experiment  # pylint: disable=g-import-not-at-top
  from im_jax.convert import load  # pylint: disable=g-import-not-at-top
  from im_jax.data.stats import load_tokenizer  # pylint: disable=g-import-not-at-top
  from im_jax.train.metrics_log import read_metrics  # pylint: disable=g-import-not-at-top

  c = base.get_config()
  c.data.train, c.data.tokenizer, c.data.max_seq_len = "synthetic:24", str(tiny_tokenizer_dir), 64
  c.train.batch_size, c.train.max_steps, c.optim.lr = 8, 2, 1e-2
  c.eval.harness_tasks = "im_jax_mc"
  c.eval.harness_include_path = str(write_mc_task(tmp_path / "tasks"))
  c.eval.harness_every_steps, c.eval.harness_limit = 1, 3
  result = experiment.build(settings.load(c), tmp_path / "run").run()
  assert result.step == 2
  logged = [r for r in read_metrics(tmp_path / "run") if "harness/im_jax_mc/acc" in r]
  assert [r["step"] for r in logged] == [1, 2]  # every step; the end is step 2
  assert "harness/im_jax_mc/acc_stderr" in logged[-1]
  # The logged score is the final model's: the same task on the saved checkpoint, one device.
  model = load.load_pretrained(tmp_path / "run").model
  single = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  lm = harness_lm.HarnessLM(model, load_tokenizer(str(tiny_tokenizer_dir)), mesh=single)
  tasks = harness.prepare_tasks("im_jax_mc", include_path=c.eval.harness_include_path, limit=3)
  direct = harness.flat_metrics(harness.run_tasks(lm, tasks))
  assert {k: logged[-1][k] for k in direct} == pytest.approx(direct)


def test_bad_harness_config_stops_before_any_work(tmp_path, tiny_tokenizer_dir):
  from im_jax.configs import base  # pylint: disable=g-import-not-at-top
  from im_jax.run import experiment  # pylint: disable=g-import-not-at-top

  c = base.get_config()
  c.data.train, c.data.tokenizer, c.train.max_steps = "synthetic:8", str(tiny_tokenizer_dir), 1
  c.eval.harness_tasks = "im_jax_mc"
  c.eval.harness_include_path = str(tmp_path / "no_tasks_here")
  with pytest.raises(experiment.ConfigError,
                     match="eval.harness_include_path=.*no_tasks_here: no such folder"):
    experiment.build(settings.load(c), tmp_path / "run")
  assert not (tmp_path / "run").exists()
  c.eval.harness_tasks, c.eval.harness_limit = "im_jax_mc", -1
  with pytest.raises(experiment.ConfigError, match="eval.harness_limit must be >= 0"):
    experiment.build(settings.load(c), tmp_path / "run")


def test_training_code_imports_no_evaluation():
  """train/ gets the harness as a hook; it never imports the evaluation code or lm-eval."""
  root = pathlib.Path(__file__).resolve().parents[1] / "im_jax" / "train"
  for path in root.glob("*.py"):
    text = path.read_text()
    assert "im_jax.eval" not in text and "lm_eval" not in text, path


def test_paper_group_resolves_in_lm_evals_registry():
  """Every name of `--tasks paper` is a task, group or tag lm-eval 0.4.13 knows (offline:
  the registry is its task files; no data is read)."""
  from im_jax.eval import harness_paper  # pylint: disable=g-import-not-at-top

  known = set(harness.task_manager(["mmlu"], None).all_tasks)
  assert [n for n in harness_paper.names() if n not in known] == []
  assert harness.split_names("paper,piqa") == harness_paper.names()  # expanded, deduplicated
  assert len(harness_paper.names()) == 16


def test_worked_example_commands_run(tiny_tokenizer_dir, tmp_path, monkeypatch,
                                    compilation_cache):
  """docs/harness.md's `eval harness` commands on its local tasks, for real (a tiny random
  model in place of the docs' model, 4 documents per task; `--tasks paper` needs the Hub's
  data; the generation task's command only parses, in test_docs_commands: generation has
  its own tests above)."""
  from tests.test_docs_commands import COMMANDS, ROOT, _clean  # pylint: disable=g-import-not-at-top

  model = fixtures_lib.tiny_hf_base(tiny_tokenizer_dir, tmp_path / "tiny_hf")
  shown = [c for doc, c in COMMANDS if doc == "harness.md" and "im_jax.eval harness --" in c
           and "--tasks paper" not in c and "_gen" not in c]
  assert len(shown) == 2
  monkeypatch.chdir(ROOT)  # the task files' data paths are relative to the repository root
  for command in shown:
    args = _clean(command.split())[3:]
    args[args.index("--model") + 1] = f"hf:{model}"
    args += [] if "--limit" in args else ["--limit", "4"]
    if "--out" in args:
      out = tmp_path / "results.json"
      args[args.index("--out") + 1] = str(out)
    assert eval_main.main(args) == 0, command
  assert set(json.loads(out.read_text())["results"]) == {"im_jax_example_qa"}


def test_bench_eval_script_runs(tiny_tokenizer_dir, tmp_path, compilation_cache):
  """scripts/bench_eval.py end to end on a tiny model (docs/benchmarks.md runs it on SmolLM2);
  it checks itself that both backends' loglikelihoods agree."""
  import sys  # pylint: disable=g-import-not-at-top


  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
  import bench_eval  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  model = fixtures_lib.tiny_hf_base(tiny_tokenizer_dir, tmp_path / "tiny_hf")
  results = bench_eval.main(["--model", f"hf:{model}", "--requests", "10", "--gen-requests",
                             "2", "--max-gen-toks", "4", "--json"])
  assert results["requests"] == 10 and results["im_jax_ll_s"] > 0 and results["hf_ll_s"] > 0
  assert results["im_jax_ll_compile_s"] > 0 and results["gen_new_tokens"] >= 0


@pytest.mark.parametrize("template", ["tulu", "tulu_bos", "hf"])
def test_chat_prompts_tokenize_as_in_training(tiny_tokenizer_dir, template):
  """--apply-chat-template: the prompt lm-eval gets back tokenizes (as the hf backend's
  tok_encode would) to the training tokens before a reply, content stripped as training did."""
  from im_jax.data.conversation import Message  # pylint: disable=g-import-not-at-top
  from im_jax.data.stats import load_tokenizer  # pylint: disable=g-import-not-at-top
  from im_jax.data.templates import ChatTemplate, TemplateConfig  # pylint: disable=g-import-not-at-top
  from im_jax.eval import generate  # pylint: disable=g-import-not-at-top

  tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
  adds_bos = template == "tulu_bos"
  if adds_bos:  # a tokenizer that adds its BOS to every text, as LLaMA-2's
    from tokenizers import processors  # pylint: disable=g-import-not-at-top

    template = "tulu"
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(  # pylint: disable=protected-access
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
  history = [{"role": "system", "content": " Be brief. "},
             {"role": "user", "content": "What is the capital of France?\n"}]
  text = harness_lm.render_chat(tokenizer, template, None, history)
  messages = [Message(m["role"], m["content"]) for m in history]
  want = generate.prompt_ids(tokenizer, template, messages,
                             ChatTemplate(tokenizer, TemplateConfig(template)))
  lm = harness_lm.HarnessLM.__new__(harness_lm.HarnessLM)  # tokenization needs no model
  lm.tokenizer = tokenizer
  assert lm.tok_encode(text) == want
  assert want.count(tokenizer.bos_token_id) == (1 if adds_bos else 0)  # one BOS, in front
  assert want[0] == tokenizer.bos_token_id or not adds_bos
  if template == "tulu":
    assert "<|user|>\nWhat is the capital of France?\n<|assistant|>\n" in text  # stripped
  continued = harness_lm.render_chat(tokenizer, template, None,
                                     history + [{"role": "assistant", "content": "Par"}], False)
  assert continued == text + "Par"
