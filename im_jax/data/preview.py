"""`python -m im_jax.data preview`: every token with its kind and loss weight.

`weight` is the loss weight on *predicting* that token: token j's weight is the example's
`loss_weights[j - 1]` (targets are shifted), so the first token always shows 0. Tokens cut
by `--max-seq-len` are not shown; a dropped example shows its reason and weight 0 throughout.
"""

import argparse
import json
import sys
from typing import Any

import numpy as np

from im_jax.data import encode as encode_lib
from im_jax.data import sources
from im_jax.data import templates
from im_jax.data import weights as weights_lib
from im_jax.data.kinds import TokenKind, kind_name

_NO_LIMIT = 2**62
_COLOURS = {  # ANSI SGR codes; weighted tokens bold
    TokenKind.BOS: "35", TokenKind.TEMPLATE: "90", TokenKind.SYSTEM: "36",
    TokenKind.USER: "34", TokenKind.ASSISTANT: "32", TokenKind.EOS: "33",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sources.add_source_arguments(parser)
  parser.add_argument("--tokenizer", required=True, help="HF tokenizer folder or hf:ORG/NAME")
  parser.add_argument("--template", choices=templates.TEMPLATES, default="tulu")
  parser.add_argument("--loss-mode", choices=weights_lib.LOSS_MODES, default="it")
  parser.add_argument("--instruction-weight", type=float, default=1.0,
                      help="weight of system/user tokens (im only)")
  parser.add_argument("--assistant-turns", choices=weights_lib.ASSISTANT_TURNS, default="all")
  parser.add_argument("--index", type=int, default=0, help="first example (0-based)")
  parser.add_argument("--limit", type=int, default=1, help="number of examples")
  parser.add_argument("--max-seq-len", type=int, default=None,
                      help="truncate like training does (default: no truncation)")
  parser.add_argument("--json", action="store_true",
                      help="one JSON object per example: {index, tokens: [{id, text, kind, weight}]}")


def encode_config_from_args(args: argparse.Namespace) -> encode_lib.EncodeConfig:
  return encode_lib.EncodeConfig(
      template=templates.TemplateConfig(args.template),
      loss=weights_lib.LossMaskConfig(args.loss_mode, args.instruction_weight,
                                      args.assistant_turns),
      max_seq_len=args.max_seq_len or _NO_LIMIT)


def preview_record(encoder: encode_lib.Encoder, conversation, index: int) -> dict[str, Any]:
  """The JSON object `--json` prints for one example."""
  encoded = encoder.encode_full(conversation)
  tokenized = encoded.tokenized
  if encoded.example is None:
    shown = len(tokenized) - encoded.truncated_tokens
    weights = np.zeros(shown, np.float32)
  else:
    shown = len(encoded.example["targets"]) + 1
    weights = np.concatenate([[0.0], encoded.example["loss_weights"]]).astype(np.float32)
  tokenizer = encoder.template.tokenizer
  ids = tokenized.ids[:shown].tolist()
  texts = tokenizer.batch_decode([[i] for i in ids])  # one call: each token's own text
  record = {"index": index, "tokens": [
      {"id": i, "text": t, "kind": kind_name(k), "weight": float(w)}
      for i, t, k, w in zip(ids, texts, tokenized.kinds[:shown].tolist(), weights.tolist())]}
  if encoded.example is None:
    record["dropped"] = encoded.drop_reason
  if encoded.truncated_tokens:
    record["truncated_tokens"] = encoded.truncated_tokens
  return record


def format_record(record: dict[str, Any], colour: bool) -> str:
  """People's view: one line per token (id, kind, weight, text), coloured by kind on a tty."""
  head = f"# example {record['index']}"
  if "dropped" in record:
    head += f"  (dropped: {record['dropped']})"
  if "truncated_tokens" in record:
    head += f"  ({record['truncated_tokens']} tokens truncated)"
  lines = [head]
  for token in record["tokens"]:
    line = (f"{token['id']:>8}  {token['kind']:<9} {token['weight']:>5.2f}  "
            f"{json.dumps(token['text'], ensure_ascii=False)}")
    if colour:
      code = _COLOURS[TokenKind[token["kind"].upper()]]
      code += ";1" if token["weight"] > 0 else ""
      line = f"\x1b[{code}m{line}\x1b[0m"
    lines.append(line)
  weighted = sum(t["weight"] > 0 for t in record["tokens"])
  lines.append(f"# {len(record['tokens'])} tokens, {weighted} carry loss")
  return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
  from im_jax.data import stats as stats_lib  # pylint: disable=g-import-not-at-top

  config = encode_config_from_args(args)
  dataset = sources.load_from_args(args)
  if not 0 <= args.index < len(dataset):
    raise ValueError(f"--index {args.index} is outside 0..{len(dataset) - 1}")
  encoder = encode_lib.Encoder(stats_lib.load_tokenizer(args.tokenizer), config)
  colour = not args.json and sys.stdout.isatty()
  for index in range(args.index, min(len(dataset), args.index + max(args.limit, 0))):
    record = preview_record(encoder, dataset[index], index)
    print(json.dumps(record, ensure_ascii=False) if args.json else format_record(record, colour))
  return 0
