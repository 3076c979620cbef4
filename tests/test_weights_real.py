"""IT/IM weights on the three real training files with the real SmolLM2 tokenizer."""

import io
import contextlib
import json

import numpy as np
import pytest
import transformers

from im_jax.data import __main__ as cli
from im_jax.data import encode as encode_lib
from im_jax.data import packing
from im_jax.data import pipeline as pipeline_lib
from im_jax.data import preview
from im_jax.data import sources
from im_jax.data import templates
from im_jax.data import weights as weights_lib
from im_jax.data.kinds import TokenKind
from tests.conftest import REAL_FILES

IT = weights_lib.LossMaskConfig("it")
IM = weights_lib.LossMaskConfig("im")


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_dir):
  return transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def real_conversations(shared_data_dir):
  return {name: sources.load_conversations(shared_data_dir / name).conversations
          for name in REAL_FILES}


def _covered(n_chars: int, offsets: np.ndarray, selected: np.ndarray) -> np.ndarray:
  """Characters covered by the selected tokens' offsets (difference array, no token loop)."""
  marks = np.zeros(n_chars + 1, np.int64)
  np.add.at(marks, offsets[selected, 0], 1)
  np.add.at(marks, offsets[selected, 1], -1)
  return np.cumsum(marks)[:n_chars] > 0


@pytest.mark.parametrize("template", templates.TEMPLATES)
def test_every_assistant_character_is_weighted(smollm2, real_conversations, template):
  chat = templates.ChatTemplate(smollm2, templates.TemplateConfig(template))
  checked = 0
  for name, conversations in real_conversations.items():
    for conversation in conversations:
      tok = chat.tokenize(conversation)
      it = weights_lib.token_weights(tok.kinds, tok.message_index, IT)
      im = weights_lib.token_weights(tok.kinds, tok.message_index, IM)
      where = f"{name}:{conversation.record}"
      # no template or BOS token carries weight under im; im covers it
      assert not im[(tok.kinds == TokenKind.TEMPLATE) | (tok.kinds == TokenKind.BOS)].any(), where
      assert (im[it > 0] > 0).all(), where
      # the assistant-closing EOS is the tokenizer's end-of-turn token, and it carries weight
      eos = tok.kinds == TokenKind.EOS
      assert (tok.ids[eos] == smollm2.eos_token_id).all() and (it[eos] == 1).all(), where
      n_assistant = sum(m.role == "assistant" for m in conversation.messages)
      assert eos.sum() == n_assistant, where
      covered_it = _covered(len(tok.text), tok.offsets, it > 0)
      covered_im = _covered(len(tok.text), tok.offsets, im > 0)
      for start, end, i in tok.content_spans:
        role = conversation.messages[i].role
        if role == "assistant":
          assert covered_it[start:end].all() and covered_im[start:end].all(), where
          # independent of offsets: the assistant tokens decode to text containing the reply
          ids = tok.ids[(tok.message_index == i) & (tok.kinds == TokenKind.ASSISTANT)]
          assert conversation.messages[i].content.strip() in smollm2.decode(ids), where
        else:
          assert covered_im[start:end].all() and not covered_it[start:end].any(), where
      checked += 1
  assert checked == sum(len(c) for c in real_conversations.values())


def test_empty_replies_keep_their_eos(smollm2, real_conversations):
  encoder = encode_lib.Encoder(smollm2, encode_lib.EncodeConfig(loss=IT))
  alpaca = real_conversations["alpagasus_alpaca_5k.jsonl"]
  empty = [c for c in alpaca if any(m.role == "assistant" and not m.content
                                    for m in c.messages)]
  assert [c.record for c in empty] == [2591, 3261, 4653, 4725]
  for conversation in empty:
    example = encoder.encode(conversation)
    weighted = example["target_kinds"][example["loss_weights"] > 0]
    assert weighted.tolist() == [TokenKind.EOS]


@pytest.mark.parametrize("mode", ["it", "im", "im_release"])
def test_preview_matches_the_rows(smollm2, real_conversations, mode):
  """preview's tokens[j].weight == loss_weights[i] where targets[i] is token j, checked
  against the packed rows training receives (sampled), not against the encoder's output."""
  config = encode_lib.EncodeConfig(loss=weights_lib.LossMaskConfig(mode), max_seq_len=2048)
  encoder = encode_lib.Encoder(smollm2, config)
  for conversations in real_conversations.values():
    # a sample: the longest (truncated) example and every 150th
    longest = max(range(len(conversations)), key=lambda i: sum(
        len(m.content) for m in conversations[i].messages))
    sample = [conversations[i] for i in sorted({longest, *range(0, len(conversations), 150)})]
    pipe = pipeline_lib.build_pipeline(
        sample, smollm2, config,
        pipeline_lib.PipelineConfig(batch_size=4, shuffle=False, read_threads=0), 0, 1)
    trained = {}  # input tokens -> the packed segment training sees
    for batch in pipe:
      for r in range(batch["tokens"].shape[0]):
        for segment in packing.split_row({k: v[r] for k, v in batch.items()}):
          trained[tuple(segment["tokens"].tolist())] = segment
    seen = 0
    for index, conversation in enumerate(sample):
      record = preview.preview_record(encoder, conversation, index)
      ids = [t["id"] for t in record["tokens"]]
      weights = [t["weight"] for t in record["tokens"]]
      segment = trained.get(tuple(ids[:-1]))
      if segment is None:  # dropped (a prompt filling max_seq_len): nothing is trained on
        assert record.get("dropped") and not any(weights)
        continue
      seen += 1
      assert ids[1:] == segment["targets"].tolist() and weights[0] == 0.0
      np.testing.assert_array_equal(np.float32(weights[1:]), segment["loss_weights"])
      kinds = [TokenKind[t["kind"].upper()] for t in record["tokens"]]
      assert kinds[1:] == segment["target_kinds"].tolist()
      assert segment["positions"].tolist() == list(range(len(ids) - 1))
    assert seen == len(trained) > 5


def test_preview_command_json(shared_data_dir, smollm2_tokenizer_dir):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.main(["preview", "--data", str(shared_data_dir / "lima.jsonl"), "--tokenizer",
                     str(smollm2_tokenizer_dir), "--template", "hf", "--loss-mode", "im",
                     "--instruction-weight", "0.5", "--index", "3", "--limit", "2",
                     "--max-seq-len", "512", "--json"])
  assert code == 0
  records = [json.loads(line) for line in out.getvalue().splitlines()]
  assert [r["index"] for r in records] == [3, 4]
  for record in records:
    assert len(record["tokens"]) <= 512 and "dropped" not in record
    assert set(record["tokens"][0]) == {"id", "text", "kind", "weight"}
    by_kind = {}
    for token in record["tokens"][1:]:
      by_kind.setdefault(token["kind"], set()).add(token["weight"])
    assert by_kind["user"] == {0.5} and by_kind["template"] == {0.0}
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    assert cli.main(["preview", "--data", str(shared_data_dir / "lima.jsonl"), "--tokenizer",
                     str(smollm2_tokenizer_dir), "--max-seq-len", "16"]) == 0
  assert "\x1b[" not in text.getvalue() and "# 16 tokens" in text.getvalue()
