"""`im_release` is the authors' released algorithm; `it` differs from their IT where documented.

The reference is `tests/release_reference.py`, an independent re-implementation of the
release's `encode_with_messages_format`. Two tokenizer kinds: SmolLM2's as is (declares the BOS
`<|im_start|>` but adds none) and the same with that BOS added to every text, standing in for
LLaMA-2's (the paper's), which adds `<s>`.
"""

import copy

import pytest
import transformers
from tokenizers.processors import TemplateProcessing

from im_jax.configs import paper
from im_jax.run import experiment, settings
from im_jax.data import encode as encode_lib
from im_jax.data import preview
from im_jax.data import sources
from im_jax.data import templates
from im_jax.data import weights as weights_lib
from im_jax.data.conversation import Conversation, Message
from tests import release_reference as ref
from tests.conftest import REAL_FILES

MAX_LEN = 2048  # the paper's and the release's max_seq_length
FIRST = 300


@pytest.fixture(scope="module")
def tokenizers_by_kind(smollm2_tokenizer_dir):
  plain = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
  with_bos = copy.deepcopy(plain)
  bos = plain.bos_token
  with_bos.backend_tokenizer.post_processor = TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, plain.bos_token_id)])
  assert plain("hi")["input_ids"] == [6004] and with_bos("hi")["input_ids"] == [1, 6004]
  return {"smollm2": plain, "smollm2_bos": with_bos}


def _encoder(tokenizer, mode, max_seq_len=MAX_LEN, **kwargs):
  config = encode_lib.EncodeConfig(loss=weights_lib.LossMaskConfig(mode),
                                   max_seq_len=max_seq_len, **kwargs)
  return encode_lib.Encoder(tokenizer, config)


def _messages(conversation):
  return [{"role": m.role, "content": m.content} for m in conversation.messages]


def _release_trains(labels) -> list[bool]:
  """Which tokens the release trains on: a label that is not ignored, past position 0 (the
  causal shift never predicts the first token)."""
  return [False] + [label != ref.IGNORE for label in labels[1:]]


@pytest.fixture(scope="module")
def real_sample(shared_data_dir):
  """The first 300 examples of each file, plus each file's 5 longest (truncated at 2048)."""
  sample = {}
  for name in REAL_FILES:
    conversations = sources.load_conversations(shared_data_dir / name).conversations
    longest = sorted(range(len(conversations)), key=lambda i: -sum(
        len(m.content) for m in conversations[i].messages))[:5]
    sample[name] = [(i, conversations[i]) for i in sorted({*range(FIRST), *longest})]
  return sample


@pytest.mark.parametrize("kind", ["smollm2", "smollm2_bos"])
def test_preview_im_release_equals_the_release(tokenizers_by_kind, real_sample, kind):
  tokenizer = tokenizers_by_kind[kind]
  encoder = _encoder(tokenizer, "im_release")
  it_encoder = _encoder(tokenizer, "it", drop_rule="no_output")
  truncated = release_keeps_without_output = 0
  for name, sample in real_sample.items():
    for index, conversation in sample:
      where = f"{name}:{index}"
      ids, labels = ref.encode_with_messages_format(_messages(conversation), tokenizer,
                                                    MAX_LEN, use_lm_loss=True)
      record = preview.preview_record(encoder, conversation, index)
      assert [t["id"] for t in record["tokens"]] == ids, where
      assert ("dropped" not in record) == ref.kept(labels), where
      if "dropped" not in record:
        assert [t["weight"] > 0 for t in record["tokens"]] == _release_trains(labels), where
      truncated += "truncated_tokens" in record
      if "truncated_tokens" in record:  # only a cut example can lose its every output token
        no_output = it_encoder.encode(conversation) is None
        release_keeps_without_output += no_output and "dropped" not in record
  assert truncated >= 10  # the truncation boundary is exercised on real data
  # Dolly has examples whose prompt fills 2048 tokens: the release (and im_release) keep them
  assert release_keeps_without_output >= 2


# A multi-turn conversation with an empty first message and content whitespace to strip.
CONVERSATION = Conversation((Message("system", ""), Message("user", " Hi there \n"),
                             Message("assistant", "\nHello."), Message("user", "Why?"),
                             Message("assistant", "Because.")))
# SmolLM2's tokens of the rendered text, after the BOS when one is added:
# <|system|>\n\n<|user|>\nHi there\n<|assistant|>\nHello.<|im_end|>\n<|user|>\nWhy?\n
# <|assistant|>\nBecause.<|im_end|>
SYS = ["<", "|", "system", "|", ">", "Ċ"]
USR = ["<", "|", "user", "|", ">", "Ċ"]
AST = ["<", "|", "ass", "istant", "|", ">", "Ċ"]
TOKENS = (SYS + ["Ċ"] + USR + ["Hi", "Ġthere", "Ċ"] + AST + ["Hello", ".", "<|im_end|>", "Ċ"]
          + USR + ["Why", "?", "Ċ"] + AST + ["Because", ".", "<|im_end|>"])


def _golden(kind: str, mode: str) -> list[int]:
  """Weights worked out by hand from the rules (not by running either implementation)."""
  def where(tokens, texts):
    return [int(t in texts) for t in tokens]
  if mode == "it":
    w = where(SYS + ["Ċ"] + USR + ["Hi", "Ġthere", "Ċ"] + AST, ()) + [1, 1, 1, 0]
    w += where(USR + ["Why", "?", "Ċ"] + AST, ()) + [1, 1, 1]
  elif mode == "im":
    w = [0] * 13 + [1, 1, 0] + [0] * 7 + [1, 1, 1, 0] + [0] * 6 + [1, 1, 0] + [0] * 7 + [1, 1, 1]
  else:  # im_release
    if kind == "smollm2":  # every system and user header masked: "wa\n" never occurs
      w = [0] * 6 + [1] + [0] * 6 + [1] * 14 + [0] * 6 + [1] * 13
    else:  # BOS + the first header only: the empty system's "\n" and "<|user|>\n" train
      w = [0] * 6 + [1] * (len(TOKENS) - 6)
  prefix = [0] if kind == "smollm2_bos" else []
  return prefix + w


@pytest.mark.parametrize("mode", ["it", "im", "im_release"])
@pytest.mark.parametrize("kind", ["smollm2", "smollm2_bos"])
def test_golden_multi_turn_with_empty_first_message(tokenizers_by_kind, kind, mode):
  tokenizer = tokenizers_by_kind[kind]
  encoded = _encoder(tokenizer, mode).encode_full(CONVERSATION)
  tokens = tokenizer.convert_ids_to_tokens(encoded.tokenized.ids.tolist())
  assert tokens == (["<|im_start|>"] if kind == "smollm2_bos" else []) + TOKENS
  assert encoded.token_weights.astype(int).tolist() == _golden(kind, mode)
  if mode == "im_release":
    ids, labels = ref.encode_with_messages_format(_messages(CONVERSATION), tokenizer, MAX_LEN,
                                                  use_lm_loss=True)
    assert ids == encoded.tokenized.ids.tolist()
    assert _release_trains(labels)[1:] == (encoded.token_weights[1:] > 0).tolist()


@pytest.mark.parametrize("kind", ["smollm2", "smollm2_bos"])
def test_golden_truncation_cuts_the_second_user_header(tokenizers_by_kind, kind):
  # Cut after "<", "|", "user" of the second user header: the release matches its patterns on
  # the truncated ids (BOS included in max_seq_length), so the half header keeps its loss.
  tokenizer = tokenizers_by_kind[kind]
  bos = int(kind == "smollm2_bos")
  keep = bos + 30
  encoded = _encoder(tokenizer, "im_release", max_seq_len=keep).encode_full(CONVERSATION)
  example = encoded.example
  assert len(example["tokens"]) + 1 == keep and encoded.truncated_tokens == len(TOKENS) + bos - keep
  kept_tokens = tokenizer.convert_ids_to_tokens(list(example["tokens"]) + [example["targets"][-1]])
  assert kept_tokens[-3:] == ["<", "|", "user"]
  expected = _golden(kind, "im_release")[:keep]
  expected[-3:] = [1, 1, 1]  # the full sequence masks them; the cut one does not
  assert example["loss_weights"].astype(int).tolist() == expected[1:]
  ids, labels = ref.encode_with_messages_format(_messages(CONVERSATION), tokenizer, keep,
                                                use_lm_loss=True)
  assert len(ids) == keep and _release_trains(labels)[1:] == expected[1:]


@pytest.mark.parametrize("kind", ["smollm2", "smollm2_bos"])
def test_it_differs_from_the_release_only_by_newlines_after_non_final_eos(
    tokenizers_by_kind, shared_data_dir, kind):
  """The release's IT masks each user turn from after the previous reply's `EOS \\n`, so it
  trains that newline; `it` (the paper's definition) does not. Nothing else differs."""
  tokenizer = tokenizers_by_kind[kind]
  lima = sources.load_conversations(shared_data_dir / "lima.jsonl").conversations
  multi = [c for c in lima if sum(m.role == "assistant" for m in c.messages) > 1]
  assert len(multi) >= 20
  encoder = _encoder(tokenizer, "it")
  newline = tokenizer.convert_tokens_to_ids("Ċ")
  extra = 0
  for conversation in [CONVERSATION] + multi:
    encoded = encoder.encode_full(conversation)
    ids, labels = ref.encode_with_messages_format(_messages(conversation), tokenizer, MAX_LEN,
                                                  use_lm_loss=False)
    n = len(ids)
    assert encoded.tokenized.ids[:n].tolist() == ids
    ours = (encoded.token_weights[:n] > 0).tolist()
    theirs = _release_trains(labels)
    differ = [j for j in range(n) if ours[j] != theirs[j]]
    after_eos = [j for j in range(1, n - 1) if ids[j - 1] == tokenizer.eos_token_id
                 and ids[j] == newline]
    assert differ == after_eos and not any(ours[j] for j in differ), conversation.where
    extra += len(differ)
  assert extra >= len(multi)  # each has a reply before its last


def test_drop_rule_follows_the_loss_mode():
  assert encode_lib.EncodeConfig(loss=weights_lib.LossMaskConfig("im_release")).drop_rule == \
      "no_weight"
  for mode in ("it", "im"):
    assert encode_lib.EncodeConfig(loss=weights_lib.LossMaskConfig(mode)).drop_rule == \
        "no_output"
  for method in paper.METHODS:
    c = paper.get_config(f"lima,{method},tiny")
    rule = settings.encode_config(settings.load(c)).drop_rule
    assert rule == ("no_weight" if method == "im_release" else "no_output"), method


def test_im_release_needs_stripped_tulu():
  with pytest.raises(ValueError, match="strip"):
    encode_lib.EncodeConfig(templates.TemplateConfig("tulu", strip_content=False),
                            weights_lib.LossMaskConfig("im_release"))
  with pytest.raises(ValueError, match="tulu"):
    templates.TemplateConfig("hf", strip_content=True)


def test_truncation_left_in_the_tokenizer_does_not_reach_training(tokenizers_by_kind):
  tokenizer = copy.deepcopy(tokenizers_by_kind["smollm2"])
  tokenizer("a b c", max_length=3, truncation=True)  # transformers keeps this in the backend
  encoded = _encoder(tokenizer, "it").encode_full(CONVERSATION)
  assert len(encoded.tokenized.ids) == len(TOKENS)


def test_rendering_settings_are_checked_up_front_and_enter_the_resume_key():
  for overrides, match in (({"template": "hf", "strip_content": True}, "strip_content"),
                           ({"strip_content": False, "mode": "im_release"}, "strip")):
    c = paper.get_config("lima,im,tiny")
    for key, value in overrides.items():
      (c.loss if key == "mode" else c.data)[key] = value
    with pytest.raises(experiment.ConfigError, match=match):
      settings.validate(c, num_devices=8, process_count=1)
  c = paper.get_config("lima,im,tiny")
  before = experiment.resume_key(settings.load(c))
  assert before["data"]["strip_content"] is None  # unset: the template's default (tulu strips)
  c.data.strip_content = False
  assert experiment.resume_key(settings.load(c))["data"] != before["data"]


@pytest.mark.parametrize("kind", ["smollm2", "smollm2_bos"])
def test_generate_prompts_are_rendered_as_the_release_renders(tokenizers_by_kind, kind):
  from im_jax.eval import generate  # pylint: disable=import-outside-toplevel

  tokenizer = tokenizers_by_kind[kind]
  messages = [Message("system", "  Be brief.\n"), Message("user", "\n Hi there \n\n")]
  prompt = generate.prompt_ids(tokenizer, "tulu", messages)
  text = ref.concat_messages(_messages(Conversation(tuple(messages))), tokenizer.eos_token)
  assert prompt == tokenizer(text + "<|assistant|>\n")["input_ids"]


def test_preview_command_prints_the_release_labels(tokenizers_by_kind, shared_data_dir, tmp_path):
  """The command itself, on a tokenizer folder that adds a BOS (as LLaMA-2's does)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel

  from im_jax.data import __main__ as cli  # pylint: disable=import-outside-toplevel

  tokenizer = tokenizers_by_kind["smollm2_bos"]
  tokenizer.save_pretrained(tmp_path / "tok")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(["preview", "--data", str(shared_data_dir / "lima.jsonl"), "--tokenizer",
                     str(tmp_path / "tok"), "--loss-mode", "im_release", "--max-seq-len",
                     str(MAX_LEN), "--limit", "3", "--json"]) == 0
  lima = sources.load_conversations(shared_data_dir / "lima.jsonl").conversations
  records = [json.loads(line) for line in out.getvalue().splitlines()]
  assert len(records) == 3
  for record in records:
    ids, labels = ref.encode_with_messages_format(_messages(lima[record["index"]]), tokenizer,
                                                  MAX_LEN, use_lm_loss=True)
    assert [t["id"] for t in record["tokens"]] == ids and ids[0] == tokenizer.bos_token_id
    assert [t["weight"] > 0 for t in record["tokens"]] == _release_trains(labels)
