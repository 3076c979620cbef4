"""Command line for the data pipeline.

    python -m im_jax.data stats --data PATH [--format F] [--tokenizer DIR] [--json]
    python -m im_jax.data preview --data PATH --tokenizer DIR ...   (see im_jax.data.preview)

Bad data prints one `file:record: reason` line to stderr and exits with status 2.
"""

import argparse
import importlib
import json
import os
import sys
from types import ModuleType

from im_jax import cli
from im_jax.data import sources
from im_jax.data import stats as stats_lib
from im_jax.data.conversation import DataError


def _run_stats(args: argparse.Namespace) -> int:
  dataset = sources.load_from_args(args)
  tokenizer = stats_lib.load_tokenizer(args.tokenizer) if args.tokenizer else None
  result = stats_lib.compute_stats(dataset.conversations, tokenizer)
  report = {"data": dataset.source, "format": dataset.format, "container": dataset.container,
            **result.to_dict(), "skipped": len(dataset.skipped),
            "skipped_records": [{"where": w, "reason": r} for w, r in dataset.skipped]}
  if args.json:
    print(json.dumps(report))
  else:
    print(_format_report(report))
  return 0


def _format_report(r: dict) -> str:
  def num(x):
    return "n/a" if x is None else f"{x:,.2f}"

  lines = [
      f"data                     {r['data']} ({r['format']}, {r['container']})",
      f"examples                 {r['examples']:,}",
      f"messages                 {r['messages']:,} "
      f"({num(r['messages'] / r['examples'])} per example)",
      f"assistant turns          {r['assistant_turns']:,} "
      f"({r['multi_turn_examples']:,} examples with more than one)",
      f"mean instruction words   {num(r['mean_instruction_words'])}",
      f"mean output words        {num(r['mean_output_words'])}",
      f"length ratio             {num(r['length_ratio'])}",
  ]
  if r["mean_instruction_tokens"] is not None:
    lines += [f"mean instruction tokens  {num(r['mean_instruction_tokens'])}",
              f"mean output tokens       {num(r['mean_output_tokens'])}"]
  lines.append(f"recommendation           {r['recommendation'].upper()}: {r['reason']}")
  if r["skipped"]:
    lines.append(f"skipped bad records      {r['skipped']:,}")
    lines += [f"  {s['where']}: {s['reason']}" for s in r["skipped_records"][:10]]
    if r["skipped"] > 10:
      lines.append(f"  ... and {r['skipped'] - 10:,} more (--json lists all)")
  return "\n".join(lines)


def build_parser(preview: ModuleType | None = None) -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m im_jax.data", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  stats = commands.add_parser("stats", help="dataset statistics and an IT/IM recommendation")
  sources.add_source_arguments(stats)
  stats.add_argument("--tokenizer", default=None,
                     help="HF tokenizer folder or hf:ORG/NAME: also report mean instruction/output "
                     "tokens")
  stats.add_argument("--json", action="store_true", help="print one JSON object")
  stats.set_defaults(run=_run_stats)
  show = commands.add_parser("preview", help="each token with its kind and loss weight")
  if preview is not None:
    preview.add_arguments(show)
    show.set_defaults(run=preview.run)
  return parser


def _parser() -> argparse.ArgumentParser:
  """The parser with every command's arguments (what the docs test checks)."""
  return build_parser(importlib.import_module("im_jax.data.preview"))


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  # preview pulls in templates and encoding: import it only when it is the command.
  preview = importlib.import_module("im_jax.data.preview") if argv[:1] == ["preview"] else None
  args = build_parser(preview).parse_args(argv)
  try:
    return args.run(args)
  except BrokenPipeError:  # `... | head`: the reader left; not an error worth a traceback
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet the exit flush
    return 0
  except (DataError, ValueError, OSError) as e:  # a bad file or option: one line, no traceback
    return cli.report(e)


if __name__ == "__main__":
  sys.exit(main())
