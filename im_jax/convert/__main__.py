"""Command line: HF folder -> CKPT, and CKPT (or a training checkpoint) -> HF folder.

    python -m im_jax.convert from-hf --hf DIR --out CKPT [--template tulu|hf] [--tokenizer DIR]
    python -m im_jax.convert to-hf --ckpt CKPT|WORKDIR --out DIR [--dtype float32|bfloat16]
        [--template tulu|hf] [--max-shard-gb 5] [--adapter] [--base DIR]

A LoRA run's checkpoint holds only the adapters: to-hf reads the base weights from the run's
model.init_from (or --base) and writes the merged model (W + alpha/r * B A), or with
--adapter a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) for
`peft.PeftModel.from_pretrained(base, DIR)`.

Bad input (missing folder, unsupported architecture, missing/unknown tensor, an existing
output) prints one line on stderr and exits with status 2. --out may not be, lie inside or
contain an input, and --overwrite never replaces a training workdir or a CKPT folder.
"""

import argparse
import contextlib
import pathlib
import sys
import tempfile

import jax
from safetensors import SafetensorError

from im_jax import cli, output_guard, paths, write_faults
from im_jax.convert import ckpt, hf_export, load, peft_export
from im_jax.models import lora as lora_lib



def _host(axes, shape) -> jax.sharding.Sharding:
  """Conversion works in host memory: an accelerator may not hold the whole model."""
  del axes, shape
  try:
    device = jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend
    device = jax.local_devices()[0]
  return jax.sharding.SingleDeviceSharding(device)


def _check_remote_out(args: argparse.Namespace) -> None:
  """Before any work, a gs:// --out: writable, absent (or --overwrite), and no workdir/CKPT."""
  if not paths.is_remote(args.out):
    return
  paths.check_ready(args.out, what="--out", write=True)
  out = paths.path(args.out)
  if out.exists():
    if not args.overwrite:
      raise FileExistsError(f"{args.out} already exists (use --overwrite to replace it)")
    for marker in ("checkpoints", "metrics.jsonl", "im_jax.json"):
      if (out / marker).exists():
        raise output_guard.UnsafeOutput(f"--out {args.out} holds {marker}; it is never "
                                        "replaced, even with --overwrite")


@contextlib.contextmanager
def _writable_out(args: argparse.Namespace, last: str):
  """Where to write --out: itself, or for gs:// a local folder uploaded when complete
  (`last`, the file loaders check, goes up after all others)."""
  if not paths.is_remote(args.out):
    yield args.out
    return
  out = paths.path(args.out)
  with tempfile.TemporaryDirectory() as tmp:
    local = pathlib.Path(tmp) / out.name
    yield local
    paths.remove_tree(out)
    paths.upload_tree(local, out, last=last)


def _inputs(args: argparse.Namespace, *names: str) -> None:
  """gs:// inputs become local copies (`paths.fetch`); the guard saw the given paths."""
  for name in names:
    if getattr(args, name):
      setattr(args, name, paths.fetch(getattr(args, name), what=f"--{name}"))


def _from_hf(args: argparse.Namespace) -> str:
  output_guard.check_not_input(args.out, [args.hf, args.tokenizer])
  _check_remote_out(args)
  _inputs(args, "hf", "tokenizer")
  hf_dir = pathlib.Path(args.hf)
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"--hf {hf_dir}: no such folder")
  # Scanned: the stored CKPT layout, so nothing is stacked a second time.
  loaded = load.load_hf_folder(hf_dir, shardings=_host, scan_layers=True,
                               tokenizer=not args.tokenizer)  # else the folder needs its own
  with _writable_out(args, ckpt.INFO_FILE) as local:
    out = ckpt.save_ckpt(local, loaded.model, loaded.config, args.tokenizer or hf_dir,
                         template=args.template, source=str(hf_dir.absolute()),
                         overwrite=args.overwrite)
  out = args.out if paths.is_remote(args.out) else out
  return f"wrote {out} ({loaded.config.model_type}, {loaded.config.num_layers} layers)"


def _to_hf(args: argparse.Namespace) -> str:
  output_guard.check_not_input(args.out, [args.ckpt, args.tokenizer, args.base])
  _check_remote_out(args)
  _inputs(args, "ckpt", "tokenizer", "base")
  source = pathlib.Path(args.ckpt)
  if not source.is_dir():
    raise FileNotFoundError(f"--ckpt {source}: no such folder")
  loaded = load.load_pretrained(source, shardings=_host, base=args.base)
  lora = loaded.config.lora
  if args.adapter:
    if not lora.enabled:
      raise ValueError(f"--adapter: {source} holds no LoRA adapters (model.lora.rank 0)")
    base = loaded.info[load.LORA_BASE]
    with _writable_out(args, "adapter_config.json") as local:
      out = peft_export.save_peft_adapter(local, loaded.model, loaded.config,
                                          base.removeprefix(load.HF_PREFIX),
                                          overwrite=args.overwrite)
    out = args.out if paths.is_remote(args.out) else out
    return f"wrote {out} (PEFT LoRA adapter, rank {lora.rank}, base {base})"
  model, config, merged = loaded.model, loaded.config, ""
  if lora.enabled:
    model = lora_lib.merged_state(loaded.model, lora.scale)
    config = config.replace(lora=lora_lib.LoraConfig())
    merged = f", LoRA merged into base {loaded.info[load.LORA_BASE]}"
  template = args.template or loaded.info.get("template")
  if template is None:
    raise ValueError(f"{source} does not record its chat template; pass --template tulu|hf")
  tokenizer = args.tokenizer or loaded.tokenizer_dir
  if tokenizer is None:
    raise ValueError(f"{source} does not record a tokenizer; pass --tokenizer DIR")
  output_guard.check_not_input(args.out, [tokenizer])  # the recorded one may live elsewhere
  # a training workdir records its run's content rendering; it holds for its own template
  strip = loaded.info.get("strip_content") if template == loaded.info.get("template") else None
  metadata = loaded.info.get("export_metadata")  # a training run's: its data and template
  if metadata is not None:
    metadata = {**metadata, "template": template, "strip_content": strip}
  with _writable_out(args, "config.json") as local:
    out = hf_export.export_hf(local, model, config, tokenizer,
                              template=template, strip_content=strip, dtype=args.dtype,
                              max_shard_bytes=int(args.max_shard_gb * 2**30),
                              overwrite=args.overwrite, metadata=metadata)
  out = args.out if paths.is_remote(args.out) else out
  return f"wrote {out} ({args.dtype}, template {template}{merged})"


def _parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m im_jax.convert", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("from-hf", help="Hugging Face folder -> CKPT folder")
  p.add_argument("--hf", required=True, help="HF model folder (config.json, safetensors)")
  p.add_argument("--out", required=True, help="CKPT folder to create")
  p.add_argument("--template", choices=("tulu", "hf"), default="tulu",
                 help="chat template the model will be trained with (recorded)")
  p.add_argument("--tokenizer", help="tokenizer folder (default: the HF folder)")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(run=_from_hf)
  p = sub.add_parser("to-hf", help="CKPT folder or training workdir -> Hugging Face folder")
  p.add_argument("--ckpt", required=True,
                 help="CKPT folder, training workdir, or WORKDIR/checkpoints/<step>")
  p.add_argument("--out", required=True, help="HF folder to create")
  p.add_argument("--dtype", choices=hf_export.DTYPES, default="float32")
  p.add_argument("--template", choices=("tulu", "hf"),
                 help="override the recorded chat template")
  p.add_argument("--tokenizer", help="override the recorded tokenizer folder")
  p.add_argument("--max-shard-gb", type=float, default=5.0,
                 help="split safetensors into shards with an index above this size")
  p.add_argument("--adapter", action="store_true",
                 help="LoRA run: write a PEFT adapter folder instead of the merged model")
  p.add_argument("--base", help="LoRA run: the base model (default: its model.init_from)")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(run=_to_hf)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  # A full disk: library tracebacks go to a temporary log the one line names (the output
  # folder is removed on failure: files.atomic_dir).
  with write_faults.TracebackLog(None) as tracebacks:
    try:
      print(args.run(args))
    except Exception as e:  # noqa: BLE001 - a write failure, whatever raised it, is one line
      failed = write_faults.failed_write(
          e, path=args.out, safe="the inputs are untouched and no half-written output is left",
          rerun="the same command")
      if failed is not None:
        # the disk, not the input: rerun once it has room
        return cli.report(f"{failed}{tracebacks.note(e)}", cli.EXIT_FAILED)
      if not isinstance(e, (OSError, ValueError, KeyError, SafetensorError)):
        raise
      return cli.report(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
