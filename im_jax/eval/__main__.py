"""Command line: held-out loss and AlpacaEval-format generations.

    python -m im_jax.eval loss --model CKPT|WORKDIR|hf:DIR --data PATH [--template tulu|hf]
        [--loss-mode it|im|im_release] [--max-seq-len L] [--limit N] [--json]
    python -m im_jax.eval generate --model ... --data PATH --out FILE.json
        [--max-new-tokens N] [--temperature T] [--template tulu|hf] [--generator NAME]
    python -m im_jax.eval harness --model ... --tasks T1,T2|paper [--include-path DIR] ...
        (lm-evaluation-harness tasks: see im_jax/eval/harness_cli.py)

The template defaults to the one the checkpoint records, else `hf` when the tokenizer has a
chat template, else `tulu`. Bad data, a bad model path or an --out that is not writable (or
is, holds or lies inside an input) prints one line on stderr and exits with status 2, before
any model is loaded; a write that fails for lack of space or permission is one line and
status 1, with nothing half-written.
"""

import argparse
import json
import pathlib
import sys
from typing import Any

from safetensors import SafetensorError

from im_jax import cli, output_guard, paths, write_faults
from im_jax.data import sources
from im_jax.data.conversation import DataError
from im_jax.data.stats import load_tokenizer
from im_jax.eval import harness_cli

_DTYPES = ("float32", "bfloat16")


def _load(args: argparse.Namespace, mesh=None) -> tuple[Any, Any, str, bool | None]:
  """(model, tokenizer, template, strip_content) for `--model`, placed by the eval mesh's
  shardings; strip_content is the training run's when the template is the one it recorded."""
  from im_jax.convert import load  # pylint: disable=g-import-not-at-top  (jax/orbax: slow)
  from im_jax.train import sharding  # pylint: disable=g-import-not-at-top

  overrides = {"param_dtype": args.dtype, "compute_dtype": args.dtype}
  shardings = None if mesh is None else sharding.sharding_fn(mesh)
  loaded = load.load_pretrained(args.model, shardings=shardings, **overrides)
  if loaded.tokenizer_dir is None:
    raise ValueError(f"{args.model} does not record a tokenizer folder")
  tokenizer = load_tokenizer(str(loaded.tokenizer_dir))
  template = (args.template or loaded.info.get("template")
              or ("hf" if getattr(tokenizer, "chat_template", None) else "tulu"))
  strip = (loaded.info.get("strip_content") if template == loaded.info.get("template")
           else None)
  return loaded.model, tokenizer, template, strip


def _localize(args: argparse.Namespace) -> None:
  """gs:// inputs are read from local copies (made once, kept in a cache: `paths.fetch`)."""
  args.model = paths.fetch(args.model, what="--model")
  args.data = paths.fetch(args.data, what="--data")


def _conversations(args: argparse.Namespace):
  _localize(args)
  conversations = sources.load_from_args(args).conversations
  return conversations[:args.limit] if args.limit else conversations


def _loss(args: argparse.Namespace) -> int:
  from im_jax.eval import loss_eval  # pylint: disable=g-import-not-at-top
  from im_jax.train import sharding  # pylint: disable=g-import-not-at-top

  conversations = _conversations(args)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=1))
  model, tokenizer, template, strip = _load(args, mesh)
  config = loss_eval.LossEvalConfig(
      template=template, strip_content=strip, loss_mode=args.loss_mode,
      max_seq_len=args.max_seq_len, batch_size=args.batch_size, chunk_size=args.chunk_size)
  metrics = loss_eval.evaluate_loss(model, tokenizer, conversations, config, mesh)
  report = {"model": args.given[0], "data": args.given[1], "template": template,
            "loss_mode": args.loss_mode,
            **{k: int(v) if _is_count(k) else v for k, v in metrics.items()}}
  if args.json:
    print(json.dumps(report))
  else:
    print("\n".join(f"{k:>20}: {v:.6f}" if isinstance(v, float) else f"{k:>20}: {v}"
                    for k, v in report.items()))
  return 0


def _is_count(key: str) -> bool:
  return key.startswith(("tokens_", "examples")) or key.endswith("_tokens")


def _generator_name(model: str) -> str:
  """The model folder's name; for WORKDIR/checkpoints[/STEP], the workdir's (and step)."""
  path = pathlib.Path(model.removeprefix("hf:")).absolute()
  step = path.name if path.name.isdigit() else None
  if step is not None:
    path = path.parent
  if path.name == "checkpoints":
    path = path.parent
  return path.name + (f"-step{step}" if step else "")


def _generate(args: argparse.Namespace) -> int:
  from im_jax.eval import generate  # pylint: disable=g-import-not-at-top

  # Before any work: generating takes minutes, and the output must not replace an input.
  output_guard.check_not_input(
      args.out, [output_guard.local_path(s) for s in (*args.given, args.model, args.data)])
  if paths.is_remote(args.out):
    paths.check_ready(args.out, what="--out", write=True)
  else:
    output_guard.check_writable_file(args.out)
  conversations = _conversations(args)
  model, tokenizer, template, strip = _load(args)
  config = generate.GenerateConfig(
      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
      batch_size=args.batch_size, seed=args.seed)
  name = args.generator or _generator_name(args.model)
  model_dir = args.model.removeprefix("hf:")
  records = generate.generate_records(conversations, model, tokenizer, template, config, name,
                                      model_dir=model_dir, strip_content=strip)
  out = paths.path(args.out)
  if not paths.is_remote(out):
    out.parent.mkdir(parents=True, exist_ok=True)
  # whole or not at all (a full disk leaves no half-written file)
  paths.write_text(out, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
  print(f"wrote {len(records)} generations to {out} (generator {name}, template {template})")
  return 0


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True,
                 help="hf:DIR (a Hugging Face folder), a CKPT folder or a training workdir")
  sources.add_source_arguments(p)
  p.add_argument("--template", choices=("tulu", "hf"), default=None,
                 help="chat template (default: recorded by the checkpoint, else hf when the "
                      "tokenizer has one, else tulu)")
  p.add_argument("--limit", type=int, default=0, help="only the first N examples")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--dtype", choices=_DTYPES, default="float32",
                 help="parameter and compute dtype")


def _parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m im_jax.eval", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("loss", help="held-out loss on output tokens (and per token kind)")
  _common(p)
  p.add_argument("--loss-mode", choices=("it", "im", "im_release"), default="it",
                 help="which tokens loss_token_mean / loss_sequence_mean weigh (it: outputs)")
  p.add_argument("--max-seq-len", type=int, default=2048)
  p.add_argument("--chunk-size", type=int, default=512,
                 help="positions per cross-entropy chunk, bounding the [rows, chunk, vocab] "
                      "logits held at once (0: all at once)")
  p.add_argument("--json", action="store_true", help="one JSON object on stdout")
  p.set_defaults(run=_loss)
  p = sub.add_parser("generate", help="generations in AlpacaEval's JSON format")
  _common(p)
  p.add_argument("--out", required=True, help="JSON file to write")
  p.add_argument("--max-new-tokens", type=int, default=512)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--generator", default=None,
                 help="the `generator` field (default: the model folder's name)")
  p.set_defaults(run=_generate)
  harness_cli.add_parser(sub, _load)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    # what reports name; gs:// ones become local copies (harness has no --data)
    args.given = (args.model, getattr(args, "data", None))
    return args.run(args)
  except OSError as e:  # a full disk: one line, exit 1 (write_faults); other OSErrors: below
    if failed := write_faults.failed_write(e, path=getattr(args, "out", None),
                                           safe="nothing was written", rerun="the same command"):
      return cli.report(failed, cli.EXIT_FAILED)
    return cli.report(e)
  except (DataError, ValueError, KeyError, SafetensorError) as e:
    return cli.report(e)


if __name__ == "__main__":
  from im_jax import malloc_tuning  # pylint: disable=g-import-not-at-top
  malloc_tuning.reexec_with_tuned_malloc()
  sys.exit(main())
