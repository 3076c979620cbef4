"""`python -m im_jax.eval harness`: lm-evaluation-harness tasks on the JAX model.

    python -m im_jax.eval harness --model WORKDIR|CKPT|hf:DIR|hf:ORG/NAME --tasks T1,T2|paper
        [--num-fewshot K] [--limit N] [--batch-size B] [--apply-chat-template]
        [--include-path DIR] [--out FILE] [--json]

Every input is checked before the model loads (ranges, --out, the model path, task files,
task names, each task's data): a bad one is one `error:` line and exit status 2, nothing
written. Rows are sharded over all devices (data x fsdp), parameters in their FSDP layout.
"""

import argparse
import json
from typing import Any, Callable

import jax

from im_jax import output_guard, paths

Loader = Callable[[argparse.Namespace, Any], tuple[Any, Any, str, bool | None]]


def add_parser(sub: Any, load: Loader) -> None:
  p = sub.add_parser("harness", help="lm-evaluation-harness tasks (accuracy and friends)")
  p.add_argument("--model", required=True,
                 help="hf:DIR, hf:ORG/NAME (Hub cache), a CKPT folder or a training workdir")
  p.add_argument("--tasks", required=True,
                 help="comma-separated lm-eval task/group names; `paper`: the paper's group")
  p.add_argument("--num-fewshot", type=int, default=None,
                 help="few-shot examples for every task (default: each task's own)")
  p.add_argument("--limit", type=int, default=None, help="only the first N documents per task")
  p.add_argument("--batch-size", type=int, default=8,
                 help="rows per call (rounded up to a multiple of the devices)")
  p.add_argument("--max-length", type=int, default=None,
                 help="context length (default: the model's max_position_embeddings)")
  p.add_argument("--apply-chat-template", action="store_true",
                 help="render prompts with the run's chat template (as in training)")
  p.add_argument("--template", choices=("tulu", "hf"), default=None,
                 help="chat template (default: recorded by the checkpoint, else hf when the "
                      "tokenizer has one, else tulu)")
  p.add_argument("--include-path", default=None, help="a folder of local lm-eval task YAMLs")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--out", default=None, help="write lm-eval's results as JSON here")
  p.add_argument("--json", action="store_true", help="one JSON object on stdout")
  p.set_defaults(run=lambda args: run(args, load))


def _check_args(args: argparse.Namespace) -> None:
  from im_jax.convert import load  # pylint: disable=g-import-not-at-top

  if args.batch_size < 1:
    raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.max_length is not None and args.max_length < 2:
    raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
  if args.out:
    output_guard.check_not_input(args.out, [output_guard.local_path(args.model),
                                            args.include_path])
    if paths.is_remote(args.out):
      paths.check_ready(args.out, what="--out", write=True)
    else:
      output_guard.check_writable_file(args.out)
  args.model = paths.fetch(args.model, what="--model")  # a gs:// model: a local copy, cached
  # Reads configs only: a path that is no model fails here, before tasks and weights.
  config, tokenizer_dir = load.read_pretrained(args.model)
  if tokenizer_dir is None:
    raise ValueError(f"{args.model} does not record a tokenizer folder")
  del config


def run(args: argparse.Namespace, load: Loader) -> int:
  from im_jax.eval import harness  # pylint: disable=g-import-not-at-top  (imports lm_eval)
  from im_jax.eval import harness_lm  # pylint: disable=g-import-not-at-top
  from im_jax.train import sharding  # pylint: disable=g-import-not-at-top

  _check_args(args)
  tasks = harness.prepare_tasks(args.tasks, include_path=args.include_path,
                                num_fewshot=args.num_fewshot, limit=args.limit)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=1))
  model, tokenizer, template, strip = load(args, mesh)
  model_dir = output_guard.local_path(args.model)
  lm = harness_lm.HarnessLM(model, tokenizer, mesh=mesh, batch_size=args.batch_size,
                            max_length=args.max_length, template=template,
                            strip_content=strip,
                            stop_ids=harness_lm.default_stop_ids(tokenizer, model_dir))
  results = harness.run_tasks(lm, tasks, apply_chat_template=args.apply_chat_template)
  if jax.process_index() != 0:  # every process computed; one reports
    return 0
  metrics = harness.flat_metrics(results)
  given = getattr(args, "given", (args.model,))[0]  # the --model given, not its local copy
  if args.out:
    out = paths.path(args.out)
    if not paths.is_remote(out):
      out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": given, "template": template if args.apply_chat_template else None,
              **{k: results.get(k) for k in ("results", "groups", "n-shot", "versions",
                                             "higher_is_better", "n-samples")}}
    # whole or not at all (a full disk leaves no half-written file)
    paths.write_text(out, json.dumps(record, indent=2, default=str) + "\n")
  if args.json:
    print(json.dumps({"model": given, "tasks": tasks.names, "metrics": metrics}))
  else:
    from lm_eval.utils import make_table  # pylint: disable=g-import-not-at-top

    print(make_table(results))
    if results.get("groups"):
      print(make_table(results, "groups"))
  return 0
