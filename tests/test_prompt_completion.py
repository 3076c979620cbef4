"""TRL's prompt/completion records: read from a file, then golden tokens, kinds and weights.

Golden rows are written by hand with the hand-made tokenizer of test_templates (whose
tokenization can be worked out on paper): the prompt trains under `im` only, the completion
and its EOS under both.
"""

import json

import pytest

from im_jax.data import encode as encode_lib
from im_jax.data import sources, templates
from im_jax.data import weights as weights_lib
from im_jax.data.conversation import DataError
from im_jax.data.kinds import kind_name
from tests.test_templates import hand_tokenizer  # noqa: F401  (the fixture)

T, S, U, A, E = "template", "system", "user", "assistant", "eos"
# (token, kind, weight under it, weight under im)
_USER_REPLY = [
    ("<|", T, 0, 0), ("user", T, 0, 0), ("|>", T, 0, 0), ("Ċ", T, 0, 0),
    ("Hi", U, 0, 1),
    ("Ċ", T, 0, 0),
    ("<|", T, 0, 0), ("assistant", T, 0, 0), ("|>", T, 0, 0), ("Ċ", T, 0, 0),
    ("Yes", A, 1, 1),
    ("</s>", E, 1, 1),
]
# No BOS: tulu follows the tokenizer's own BOS behaviour, and this one adds none.
STRING_GOLDEN = [*_USER_REPLY]
MESSAGES_GOLDEN = [
    ("<|", T, 0, 0), ("system", T, 0, 0), ("|>", T, 0, 0), ("Ċ", T, 0, 0),
    ("Be", S, 0, 1), ("Ġbrief", S, 0, 1), (".", S, 0, 1),
    ("Ċ", T, 0, 0),
    *_USER_REPLY,
]
RECORDS = [
    {"prompt": "Hi", "completion": "Yes"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "completion": [{"role": "assistant", "content": "Yes"}]},
]


def _write(tmp_path, records) -> str:
  path = tmp_path / "pc.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.mark.parametrize("record, golden", [(RECORDS[0], STRING_GOLDEN),
                                            (RECORDS[1], MESSAGES_GOLDEN)],
                         ids=["strings", "messages"])
def test_golden_weights_under_it_and_im(tmp_path, hand_tokenizer, record, golden):  # noqa: F811
  loaded = sources.load_conversations(_write(tmp_path, [record]))
  assert loaded.format == "prompt_completion"
  for column, mode in ((2, "it"), (3, "im")):
    config = encode_lib.EncodeConfig(templates.TemplateConfig("tulu"),
                                     weights_lib.LossMaskConfig(mode), 4096)
    encoded = encode_lib.Encoder(hand_tokenizer, config).encode_full(loaded[0])
    tokens = hand_tokenizer.convert_ids_to_tokens(encoded.tokenized.ids.tolist())
    rows = zip(tokens, map(kind_name, encoded.tokenized.kinds), encoded.token_weights.tolist())
    assert list(rows) == [(row[0], row[1], row[column]) for row in golden], mode


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "Hi", "completion": [{"role": "user", "content": "Yes"}]},
     "field 'completion' must hold assistant messages only"),
    ({"prompt": 3, "completion": "Yes"},
     "field 'prompt' must be a string or an array of messages, got a number"),
    ({"prompt": [{"role": "robot", "content": "Hi"}], "completion": "Yes"},
     "prompt[0]: unknown role 'robot'"),
    ({"prompt": "Hi"}, "missing field 'completion'"),
])
def test_bad_records_name_file_line_and_reason(tmp_path, record, reason):
  path = _write(tmp_path, [RECORDS[0], record])
  with pytest.raises(DataError) as info:
    sources.load_conversations(path)  # the first record says which format
  assert str(info.value).startswith(f"{path}:2: {reason}"), info.value
