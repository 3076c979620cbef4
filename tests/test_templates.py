"""Golden tests: exact tokens, kinds and weights for a small conversation, written by hand.

The tokenizer here is built by hand so its tokenization can be worked out on paper: a
byte-level BPE with no pre-tokenizer split and a handful of merges (role words, a few content
words, and "\\n\\n", which lets content whitespace merge with template whitespace).
"""

import copy

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing

from im_jax.data import encode as encode_lib
from im_jax.data import templates
from im_jax.data import weights as weights_lib
from im_jax.data.conversation import Conversation, Message
from im_jax.data.kinds import TokenKind, kind_name

_WORDS = ["ĊĊ", "<|", "|>", "system", "user", "assistant", "Be", "Ġbrief", "Hi", "ĠHi", "Ok",
          "Yes"]
_SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# ChatML that trims content and injects a default system prompt when there is none.
_HF_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] | trim) + '<|im_end|>\n' }}"
    "{% endfor %}")


def _merges_for(word: str) -> list[tuple[str, str]]:
  # left-to-right chain: "Yes" -> (Y, e), (Ye, s); "ĠHi" reuses "Hi": (Ġ, Hi)
  if word == "ĠHi":
    return [("Ġ", "Hi")]
  return [(word[:i], word[i]) for i in range(1, len(word))]


@pytest.fixture(scope="module")
def hand_tokenizer():
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {t: i for i, t in enumerate(_SPECIAL)}
  for ch in sorted(alphabet):
    vocab.setdefault(ch, len(vocab))
  merges = []
  for word in _WORDS:
    for left, right in _merges_for(word):
      if (left, right) not in merges:
        merges.append((left, right))
      vocab.setdefault(left + right, len(vocab))
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  fast.chat_template = _HF_TEMPLATE
  return fast


# User content begins with a space and ends with a newline; assistant content holds the
# tokenizer's EOS text, which must stay plain text; the last reply ends with a newline.
CONVERSATION = Conversation((
    Message("system", "Be brief."),
    Message("user", " Hi\n"),
    Message("assistant", "Ok </s>"),
    Message("user", "Hi"),
    Message("assistant", "Yes\n"),
))

B, T, S, U, A, E = "bos", "template", "system", "user", "assistant", "eos"
# tulu with a BOS forced in front (this tokenizer adds none) and content kept as given, so
# content whitespace merges with template whitespace; the default rendering (stripped) is
# `test_rendered_strings`, and im_release is tests/test_release.py's.
TULU_UNSTRIPPED = templates.TemplateConfig("tulu", add_bos=True, strip_content=False)
# (token, kind, weight under: it, im, im with instruction_weight 0.5)
TULU_GOLDEN = [
    ("<s>", B, 0, 0, 0),
    ("<|", T, 0, 0, 0), ("system", T, 0, 0, 0), ("|>", T, 0, 0, 0),
    ("Ċ", T, 0, 0, 0),
    ("Be", S, 0, 1, .5), ("Ġbrief", S, 0, 1, .5), (".", S, 0, 1, .5),
    ("Ċ", T, 0, 0, 0),
    ("<|", T, 0, 0, 0), ("user", T, 0, 0, 0), ("|>", T, 0, 0, 0), ("Ċ", T, 0, 0, 0),
    ("ĠHi", U, 0, 1, .5),
    ("ĊĊ", U, 0, 1, .5),  # content "\n" merged with the template's "\n"
    ("<|", T, 0, 0, 0), ("assistant", T, 0, 0, 0), ("|>", T, 0, 0, 0),
    ("Ċ", T, 0, 0, 0),
    ("Ok", A, 1, 1, 1), ("Ġ", A, 1, 1, 1), ("<", A, 1, 1, 1), ("/", A, 1, 1, 1),
    ("s", A, 1, 1, 1), (">", A, 1, 1, 1),
    ("</s>", E, 1, 1, 1),
    ("Ċ", T, 0, 0, 0),
    ("<|", T, 0, 0, 0), ("user", T, 0, 0, 0), ("|>", T, 0, 0, 0), ("Ċ", T, 0, 0, 0),
    ("Hi", U, 0, 1, .5),
    ("Ċ", T, 0, 0, 0),
    ("<|", T, 0, 0, 0), ("assistant", T, 0, 0, 0), ("|>", T, 0, 0, 0),
    ("Ċ", T, 0, 0, 0),
    ("Yes", A, 1, 1, 1), ("Ċ", A, 1, 1, 1),
    ("</s>", E, 1, 1, 1),  # the trailing "\n" is stripped
]
# hf: the template trims content, so " Hi\n" renders as "Hi" and "Yes\n" as "Yes".
HF_GOLDEN = [
    ("<|im_start|>", T, 0, 0, 0), ("system", T, 0, 0, 0), ("Ċ", T, 0, 0, 0),
    ("Be", S, 0, 1, .5), ("Ġbrief", S, 0, 1, .5), (".", S, 0, 1, .5),
    ("<|im_end|>", T, 0, 0, 0),  # closes a system turn: template, not eos
    ("Ċ", T, 0, 0, 0), ("<|im_start|>", T, 0, 0, 0), ("user", T, 0, 0, 0), ("Ċ", T, 0, 0, 0),
    ("Hi", U, 0, 1, .5),
    ("<|im_end|>", T, 0, 0, 0), ("Ċ", T, 0, 0, 0),
    ("<|im_start|>", T, 0, 0, 0), ("assistant", T, 0, 0, 0), ("Ċ", T, 0, 0, 0),
    ("Ok", A, 1, 1, 1), ("Ġ", A, 1, 1, 1), ("<", A, 1, 1, 1), ("/", A, 1, 1, 1),
    ("s", A, 1, 1, 1), (">", A, 1, 1, 1),
    ("<|im_end|>", E, 1, 1, 1),
    ("Ċ", T, 0, 0, 0), ("<|im_start|>", T, 0, 0, 0), ("user", T, 0, 0, 0), ("Ċ", T, 0, 0, 0),
    ("Hi", U, 0, 1, .5),
    ("<|im_end|>", T, 0, 0, 0), ("Ċ", T, 0, 0, 0),
    ("<|im_start|>", T, 0, 0, 0), ("assistant", T, 0, 0, 0), ("Ċ", T, 0, 0, 0),
    ("Yes", A, 1, 1, 1),
    ("<|im_end|>", E, 1, 1, 1),
    ("Ċ", T, 0, 0, 0),
]
MODES = {"it": weights_lib.LossMaskConfig("it"), "im": weights_lib.LossMaskConfig("im"),
         "im_half": weights_lib.LossMaskConfig("im", instruction_weight=0.5),
         "im_release": weights_lib.LossMaskConfig("im_release")}


def _encoded(tokenizer, template: str, loss: weights_lib.LossMaskConfig, max_seq_len=4096,
             **kwargs):
  template = TULU_UNSTRIPPED if template == "tulu" else templates.TemplateConfig(template)
  config = encode_lib.EncodeConfig(template, loss, max_seq_len, **kwargs)
  return encode_lib.Encoder(tokenizer, config).encode_full(CONVERSATION)


@pytest.mark.parametrize("template,golden,modes", [
    ("tulu", TULU_GOLDEN, ("it", "im", "im_half")),
    ("hf", HF_GOLDEN, ("it", "im", "im_half")),
])
def test_golden_tokens_kinds_and_weights(hand_tokenizer, template, golden, modes):
  for column, mode in enumerate(modes, start=2):
    encoded = _encoded(hand_tokenizer, template, MODES[mode])
    tok = encoded.tokenized
    got = [(t, kind_name(k)) for t, k in
           zip(hand_tokenizer.convert_ids_to_tokens(tok.ids.tolist()), tok.kinds)]
    assert got == [row[:2] for row in golden]
    np.testing.assert_array_equal(encoded.token_weights, [row[column] for row in golden],
                                  err_msg=mode)
    # the shifted example: weight of predicting targets[i] is token i+1's weight
    example = encoded.example
    np.testing.assert_array_equal(example["tokens"], tok.ids[:-1])
    np.testing.assert_array_equal(example["targets"], tok.ids[1:])
    np.testing.assert_array_equal(example["loss_weights"], [r[column] for r in golden[1:]])
    assert example["loss_weights"].dtype == np.float32
    assert example["target_kinds"].dtype == np.int8


def test_rendered_strings(hand_tokenizer):
  tulu = _encoded(hand_tokenizer, "tulu", MODES["it"]).tokenized.text
  assert tulu == ("<|system|>\nBe brief.\n<|user|>\n Hi\n\n<|assistant|>\nOk </s></s>\n"
                  "<|user|>\nHi\n<|assistant|>\nYes\n</s>")
  # the default, as the paper's release renders: content stripped, and no BOS, as this
  # tokenizer adds none to a text
  default = templates.ChatTemplate(hand_tokenizer, templates.TemplateConfig("tulu"))
  tok = default.tokenize(CONVERSATION)
  assert tok.text == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nOk </s></s>\n"
                      "<|user|>\nHi\n<|assistant|>\nYes</s>")
  assert tok.ids[0] != hand_tokenizer.bos_token_id and TokenKind.BOS not in tok.kinds
  assert [hand_tokenizer.decode(tok.ids[tok.message_index == i][tok.kinds[
      tok.message_index == i] != TokenKind.EOS]) for i in range(5)] == [
          "Be brief.", "Hi", "Ok </s>", "Hi", "Yes"]
  hf = _encoded(hand_tokenizer, "hf", MODES["it"]).tokenized.text
  assert hf == hand_tokenizer.apply_chat_template(
      [{"role": m.role, "content": m.content} for m in CONVERSATION.messages], tokenize=False)


def test_special_text_in_content_stays_text(hand_tokenizer):
  # A plain call would read the content's "</s>" as the EOS token: ours must not.
  tok = _encoded(hand_tokenizer, "tulu", MODES["it"]).tokenized
  eos = hand_tokenizer.eos_token_id
  assert np.flatnonzero(tok.ids == eos).tolist() == np.flatnonzero(tok.kinds == TokenKind.EOS)\
      .tolist()
  plain = hand_tokenizer(tok.text, add_special_tokens=False)["input_ids"]
  assert plain.count(eos) == 3 and tok.ids.tolist().count(eos) == 2


def test_ids_equal_one_tokenization_without_special_text(hand_tokenizer, smollm2_tokenizer_dir,
                                                         tiny_tokenizer_dir):
  conversation = Conversation((Message("system", " Be brief. "), Message("user", "\nHi  there\n"),
                               Message("assistant", " Ok, yes.\n\n"), Message("user", "Hi"),
                               Message("assistant", "")))
  for tokenizer in (hand_tokenizer,
                    transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir),
                    transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)):
    for name in templates.TEMPLATES:
      chat = templates.ChatTemplate(tokenizer, templates.TemplateConfig(name))
      tok = chat.tokenize(conversation)
      body = tok.ids[len(chat.prefix_ids):]  # what the tokenizer adds in front, if anything
      assert body.tolist() == tokenizer(tok.text, add_special_tokens=False)["input_ids"]
      # the piecewise path (used when content holds special text) agrees with one call
      placed = list(chat._special_re.finditer(tok.text))
      assert chat._encode_pieces(tok.text, placed)[0].tolist() == body.tolist()


def test_smollm2_hf_injected_system_prompt_is_template(smollm2_tokenizer_dir):
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
  encoder = encode_lib.Encoder(tokenizer, encode_lib.EncodeConfig(
      templates.TemplateConfig("hf"), weights_lib.LossMaskConfig("im")))
  encoded = encoder.encode_full(Conversation((Message("user", "Hi"), Message("assistant", "Hello"))))
  tok = encoded.tokenized
  assert "You are a helpful AI assistant named SmolLM" in tok.text
  # the GGUF BOS <|im_start|> recurs as a role header: template, not bos
  assert tok.ids[0] == tokenizer.bos_token_id and tok.kinds[0] == TokenKind.TEMPLATE
  kinds = [kind_name(k) for k in tok.kinds]
  words = tokenizer.convert_ids_to_tokens(tok.ids.tolist())
  weighted = [(w, k) for w, k, x in zip(words, kinds, encoded.token_weights) if x > 0]
  assert weighted == [("Hi", "user"), ("Hello", "assistant"), ("<|im_end|>", "eos")]


def test_tulu_bos_follows_the_tokenizer(smollm2_tokenizer_dir, hand_tokenizer):
  # SmolLM2 declares the BOS <|im_start|> but adds none to a text: neither does tulu
  smol = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
  assert smol.bos_token_id is not None and smol("hi")["input_ids"] == smol(
      "hi", add_special_tokens=False)["input_ids"]
  tok = templates.ChatTemplate(smol, templates.TemplateConfig("tulu")).tokenize(CONVERSATION)
  assert tok.ids[0] != smol.bos_token_id and TokenKind.BOS not in tok.kinds
  # a tokenizer that adds its BOS gets it in front, as `tokenizer(text)` does
  with_bos = copy.deepcopy(hand_tokenizer)
  with_bos.backend_tokenizer.post_processor = TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", hand_tokenizer.bos_token_id)])
  chat = templates.ChatTemplate(with_bos, templates.TemplateConfig("tulu"))
  tok = chat.tokenize(Conversation((Message("user", "Hi"), Message("assistant", "Ok"))))
  assert tok.ids.tolist() == with_bos(tok.text)["input_ids"] and tok.kinds[0] == TokenKind.BOS
  off = templates.ChatTemplate(with_bos, templates.TemplateConfig("tulu", add_bos=False))
  assert off.tokenize(CONVERSATION).kinds[0] == TokenKind.TEMPLATE
  # one that appends tokens after a text is refused, in one line
  appends = copy.deepcopy(hand_tokenizer)
  appends.backend_tokenizer.post_processor = TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", hand_tokenizer.eos_token_id)])
  with pytest.raises(ValueError, match="only in front"):
    templates.ChatTemplate(appends, templates.TemplateConfig("tulu"))


def test_im_with_zero_instruction_weight_is_it(hand_tokenizer):
  for template in templates.TEMPLATES:
    it = _encoded(hand_tokenizer, template, MODES["it"]).example["loss_weights"]
    im0 = _encoded(hand_tokenizer, template, weights_lib.LossMaskConfig(
        "im", instruction_weight=0.0)).example["loss_weights"]
    np.testing.assert_array_equal(it, im0)


def test_last_assistant_turn_only(hand_tokenizer):
  encoded = _encoded(hand_tokenizer, "tulu", weights_lib.LossMaskConfig("im",
                                                                        assistant_turns="last"))
  expected = [row[3] for row in TULU_GOLDEN]  # im ...
  for i in range(19, 26):  # ... minus the first reply "Ok </s>" and its EOS
    expected[i] = 0
  np.testing.assert_array_equal(encoded.token_weights, expected)


def test_empty_reply_trains_only_its_eos(hand_tokenizer):
  conversation = Conversation((Message("user", "Hi"), Message("assistant", "")))
  config = encode_lib.EncodeConfig(TULU_UNSTRIPPED, MODES["it"])
  encoded = encode_lib.Encoder(hand_tokenizer, config).encode_full(conversation)
  words = hand_tokenizer.convert_ids_to_tokens(encoded.tokenized.ids.tolist())
  assert [w for w, x in zip(words, encoded.token_weights) if x] == ["</s>"]
  assert encoded.example is not None


def test_truncation_and_drop_rules(hand_tokenizer):
  # 19 tokens keep the first assistant header but no reply token
  right = _encoded(hand_tokenizer, "tulu", MODES["im"], max_seq_len=19)
  assert right.example is None and right.drop_reason == "no_output"
  assert right.truncated_tokens == len(TULU_GOLDEN) - 19
  paper = _encoded(hand_tokenizer, "tulu", MODES["im"], max_seq_len=19, drop_rule="no_weight")
  assert len(paper.example["targets"]) == 18
  np.testing.assert_array_equal(paper.example["loss_weights"], [r[3] for r in TULU_GOLDEN[1:19]])
  it_paper = _encoded(hand_tokenizer, "tulu", MODES["it"], max_seq_len=19, drop_rule="no_weight")
  assert it_paper.drop_reason == "no_weight"
  kept = _encoded(hand_tokenizer, "tulu", MODES["it"], max_seq_len=20)
  assert kept.example["loss_weights"].tolist() == [0] * 18 + [1]  # predicts "Ok"
  dropped = _encoded(hand_tokenizer, "tulu", MODES["it"], max_seq_len=20, truncation="drop")
  assert dropped.drop_reason == "too_long"


def test_config_errors():
  with pytest.raises(ValueError, match="im loss mode only"):
    weights_lib.LossMaskConfig("it", instruction_weight=0.5)
  with pytest.raises(ValueError, match="tulu template"):
    encode_lib.EncodeConfig(templates.TemplateConfig("hf"), weights_lib.LossMaskConfig(
        "im_release"))
  with pytest.raises(ValueError):
    weights_lib.LossMaskConfig("im_release", assistant_turns="last")
  with pytest.raises(ValueError):
    templates.TemplateConfig("chatml")
