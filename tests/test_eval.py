"""Evaluation: held-out loss against an independent PyTorch computation, KV-cache decoding,
greedy generation against transformers, and the command line."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from im_jax.data.conversation import Conversation, Message
from im_jax.data.kinds import TokenKind, kind_name
from im_jax.data.templates import ChatTemplate, TemplateConfig
from im_jax.eval import generate, loss_eval
from im_jax.models.llama import Llama, LlamaConfig
from im_jax.models.llama import params

# The training/eval commands this module starts share compiled steps (tests/conftest.py).
# slow: the real SmolLM2, command subprocesses
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("subprocess_compilation_cache")]

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_LEN = 96


def _conv(*turns: tuple[str, str]) -> Conversation:
  return Conversation(tuple(Message(r, c) for r, c in turns))


CONVERSATIONS = [
    _conv(("user", "What is the capital of France?"),
          ("assistant", "The capital of France is Paris.")),
    _conv(("system", "You are a careful assistant."),
          ("user", "Sort the following numbers: 5 3 9 1."), ("assistant", "1 3 5 9")),
    _conv(("user", "Write a short poem about the sea."), ("assistant", "The sea is wide."),
          ("user", "Summarise the following text in one sentence."),
          ("assistant", "The quick brown fox jumps over the lazy dog.")),
    # Longer than MAX_LEN: right-truncated inside the reply.
    _conv(("user", "Numbers: 0 1 2 3"), ("assistant", " ".join(["sea and river"] * 40))),
    _conv(("user", "Hi"), ("assistant", "")),  # an empty reply still trains its EOS
]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, tiny_tokenizer_dir):
  """A random tiny Llama saved by transformers with the tiny tokenizer: (dir, torch model)."""
  out = tmp_path_factory.mktemp("tiny_llama")
  tok = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
  config = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).float().eval()
  with torch.no_grad():  # larger than HF's init so logits are far from ties
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.02 if "norm" in name else 0.15)
              + (1.0 if "norm" in name else 0.0))
  model.save_pretrained(out)
  tok.save_pretrained(out)
  return out, model, tok


def _reference_losses(torch_model, tokenizer, conversations, template, mode):
  """Per-token CE from PyTorch over the same tokens, reduced here without im_jax.train."""
  chat = ChatTemplate(tokenizer, TemplateConfig(template))
  weighted = {"it": (TokenKind.ASSISTANT, TokenKind.EOS),
              "im": (TokenKind.ASSISTANT, TokenKind.EOS, TokenKind.SYSTEM, TokenKind.USER)}[mode]
  num = den = 0.0
  per_example = []
  kind_ce, kind_n = np.zeros(len(TokenKind)), np.zeros(len(TokenKind))
  for conv in conversations:
    tokenized = chat.tokenize(conv)
    ids, kinds = tokenized.ids[:MAX_LEN], tokenized.kinds[:MAX_LEN]
    with torch.no_grad():
      logits = torch_model(torch.tensor(ids[None], dtype=torch.long)).logits[0, :-1]
    ce = torch.nn.functional.cross_entropy(
        logits.double(), torch.tensor(ids[1:], dtype=torch.long), reduction="none").numpy()
    target_kinds = kinds[1:]
    w = np.isin(target_kinds, weighted).astype(np.float64)
    num, den = num + (w * ce).sum(), den + w.sum()
    per_example.append((w * ce).sum() / w.sum())
    np.add.at(kind_ce, target_kinds, ce)
    np.add.at(kind_n, target_kinds, 1)
  return num / den, float(np.mean(per_example)), kind_ce, kind_n


@pytest.mark.parametrize("mode", ["it", "im"])
def test_loss_equals_pytorch_cross_entropy(tiny_hf, mode):
  hf_dir, torch_model, tok = tiny_hf
  model = params.load_hf(hf_dir, LlamaConfig.from_hf(hf_dir))
  config = loss_eval.LossEvalConfig(template="tulu", loss_mode=mode, max_seq_len=MAX_LEN,
                                    batch_size=8)
  got = loss_eval.evaluate_loss(model, tok, CONVERSATIONS, config)
  token_mean, sequence_mean, kind_ce, kind_n = _reference_losses(
      torch_model, tok, CONVERSATIONS, "tulu", mode)
  assert abs(got["loss_token_mean"] - token_mean) < 1e-4, (got, token_mean)
  assert abs(got["loss_sequence_mean"] - sequence_mean) < 1e-4, (got, sequence_mean)
  assert got["examples"] == got["examples_with_loss"] == len(CONVERSATIONS)
  assert got["examples_truncated"] == 1 and got["examples_dropped"] == 0
  for kind in TokenKind:
    name = kind_name(kind)
    if kind == TokenKind.PAD or kind_n[kind] == 0:
      assert f"loss_{name}" not in got
      continue
    assert got[f"tokens_{name}"] == kind_n[kind]
    assert abs(got[f"loss_{name}"] - kind_ce[kind] / kind_n[kind]) < 1e-4, name
  if mode == "it":  # the paper's measure: output tokens only
    assert got["loss_weight_sum"] == kind_n[TokenKind.ASSISTANT] + kind_n[TokenKind.EOS]
    assert abs(got["loss_token_mean"] - got["output_loss"]) < 1e-5
  # the per-example output loss is the paper's per-example mean over output tokens, any mode
  output = (TokenKind.ASSISTANT, TokenKind.EOS)
  _, output_sequence_mean, _, _ = _reference_losses(torch_model, tok, CONVERSATIONS, "tulu", "it")
  assert abs(got["output_loss_per_example"] - output_sequence_mean) < 1e-4
  assert got["output_examples"] == len(CONVERSATIONS)
  assert abs(got["output_loss"] - kind_ce[list(output)].sum() / kind_n[list(output)].sum()) < 1e-4


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_with_cache_equals_full_forward(scan_layers):
  config = LlamaConfig.preset("tiny", scan_layers=scan_layers)
  model = Llama(config, rngs=nnx.Rngs(0))
  full = np.random.RandomState(0).randint(0, config.vocab_size, (2, 12))
  lengths, width, steps = np.array([7, 4]), 7, 4
  tokens, positions, segments = (np.zeros((2, width), np.int32) for _ in range(3))
  for r, n in enumerate(lengths):  # left padding
    tokens[r, width - n:], positions[r, width - n:], segments[r, width - n:] = (
        full[r, :n], np.arange(n), 1)
  decode = nnx.jit(lambda m, *a: m.decode(*a))
  ref = nnx.jit(lambda m, t: m(t))(model, full)  # causal: prefix logits are the references
  logits, cache = decode(model, tokens, positions, segments, model.init_cache(2, width + steps))
  for r, n in enumerate(lengths):
    np.testing.assert_allclose(logits[r, width - n:], ref[r, :n], atol=1e-5)
  for t in range(steps):
    step = np.array([[full[r, n + t]] for r, n in enumerate(lengths)])
    logits, cache = decode(model, step, (lengths + t)[:, None], np.ones((2, 1), np.int32),
                           cache)
    for r, n in enumerate(lengths):
      np.testing.assert_allclose(logits[r, 0], ref[r, n + t], atol=1e-5)


def _hf_greedy(torch_model, prompt, stop_ids, pad_id, new_tokens):
  with torch.no_grad():
    out = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                               max_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=stop_ids, pad_token_id=pad_id)
  ids = out[0, len(prompt):].tolist()
  return next((ids[:i] for i, t in enumerate(ids) if t in stop_ids), ids)


def _check_greedy(model, torch_model, tok, template, conversations, new_tokens=20):
  prompts = [generate.prompt_ids(tok, template, generate.split_prompt(c)[0])
             for c in conversations]
  assert len({len(p) for p in prompts}) == len(prompts)  # different lengths in one batch
  stop_ids = generate.stop_token_ids(tok, template)
  gen = generate.Generator(model, stop_ids, generate.GenerateConfig(
      max_new_tokens=new_tokens, batch_size=4, prompt_bucket=16))
  got = gen.generate_ids(prompts)
  pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
  want = [_hf_greedy(torch_model, p, stop_ids, pad, new_tokens) for p in prompts]
  assert got == want
  return got


def test_greedy_generation_equals_transformers_tiny(tiny_hf):
  hf_dir, torch_model, tok = tiny_hf
  model = params.load_hf(hf_dir, LlamaConfig.from_hf(hf_dir))
  got = _check_greedy(model, torch_model, tok, "tulu", CONVERSATIONS[:3])
  assert max(len(g) for g in got) == 20  # a random model rarely stops: the full length
  # Sampling: reproducible for a seed, different from greedy.
  prompts = [generate.prompt_ids(tok, "tulu", c.messages[:1]) for c in CONVERSATIONS[:3]]
  config = generate.GenerateConfig(max_new_tokens=20, temperature=1.0, batch_size=4, seed=3)
  sampled = [generate.Generator(model, [tok.eos_token_id], config).generate_ids(prompts)
             for _ in range(2)]
  assert sampled[0] == sampled[1] and sampled[0] != got


def test_greedy_generation_equals_transformers_smollm2(smollm2_hf_dir):
  tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_hf_dir, torch_dtype=torch.float32).eval()
  model = params.load_hf(smollm2_hf_dir, LlamaConfig.from_hf(smollm2_hf_dir, scan_layers=True))
  got = _check_greedy(model, torch_model, tok, "hf", [
      _conv(("user", "What is the capital of France?")),
      _conv(("user", "Write one sentence about the sea and the rivers that run into it.")),
  ])
  assert all(got)


def test_split_prompt_ends_before_last_assistant_turn():
  conv = CONVERSATIONS[2]
  messages, instruction = generate.split_prompt(conv)
  assert [m.role for m in messages] == ["user", "assistant", "user"]
  assert instruction == "Summarise the following text in one sentence."


def _cli(*args, check=True):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-m", "im_jax.eval", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  if check:
    assert proc.returncode == 0, proc.stderr[-2000:]
  return proc


def test_cli_generate_writes_alpaca_eval_json_and_loss_json(tiny_hf, tmp_path):
  hf_dir, _, _ = tiny_hf
  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps({"messages": [{"role": m.role, "content": m.content}
                                                   for m in c.messages]}) + "\n"
                          for c in CONVERSATIONS))
  out = tmp_path / "gen" / "out.json"
  _cli("generate", "--model", f"hf:{hf_dir}", "--data", data, "--out", out, "--template", "tulu",
       "--max-new-tokens", 5, "--limit", 3)
  records = json.loads(out.read_text())
  assert isinstance(records, list) and len(records) == 3
  for record, conv in zip(records, CONVERSATIONS):
    assert set(record) == {"instruction", "output", "generator"}
    assert isinstance(record["output"], str) and record["generator"] == hf_dir.name
    assert record["instruction"] == generate.split_prompt(conv)[1]

  proc = _cli("loss", "--model", f"hf:{hf_dir}", "--data", data, "--template", "tulu",
              "--max-seq-len", MAX_LEN, "--json")
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["examples"] == len(CONVERSATIONS) and report["loss_token_mean"] > 0

  bad = _cli("loss", "--model", tmp_path / "missing", "--data", data, check=False)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error: ")


def test_tulu_prompt_is_the_training_prefix_of_the_reply(tiny_tokenizer_dir):
  # Multi-turn, with special-token text inside a message: the prompt must be exactly the
  # training tokens before the last reply's content (earlier replies keep their EOS).
  tok = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
  conv = Conversation((Message("user", "Say </s> twice"), Message("assistant", "</s> </s>"),
                       Message("user", "Again"), Message("assistant", "Fine")))
  trained = ChatTemplate(tok, TemplateConfig("tulu")).tokenize(conv)
  last = np.flatnonzero((trained.kinds == TokenKind.ASSISTANT) & (trained.message_index == 3))[0]
  prompt = generate.prompt_ids(tok, "tulu", generate.split_prompt(conv)[0])
  assert prompt == [int(i) for i in trained.ids[:last]]
