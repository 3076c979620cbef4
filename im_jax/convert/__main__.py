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
import pathlib
import sys

import jax
from safetensors import SafetensorError

from im_jax import output_guard
from im_jax.convert import ckpt, hf_export, load, peft_export
from im_jax.models import lora as lora_lib

EXIT_BAD_INPUT = 2


def _host(axes, shape) -> jax.sharding.Sharding:
  """Conversion works in host memory: an accelerator may not hold the whole model."""
  del axes, shape
  try:
    device = jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend
    device = jax.local_devices()[0]
  return jax.sharding.SingleDeviceSharding(device)


def _from_hf(args: argparse.Namespace) -> str:
  hf_dir = pathlib.Path(args.hf)
  output_guard.check_not_input(args.out, [hf_dir, args.tokenizer])
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"--hf {hf_dir}: no such folder")
  # Scanned: the stored CKPT layout, so nothing is stacked a second time.
  loaded = load.load_hf_folder(hf_dir, shardings=_host, scan_layers=True)
  out = ckpt.save_ckpt(args.out, loaded.model, loaded.config, args.tokenizer or hf_dir,
                       template=args.template, source=str(hf_dir.absolute()),
                       overwrite=args.overwrite)
  return f"wrote {out} ({loaded.config.model_type}, {loaded.config.num_layers} layers)"


def _to_hf(args: argparse.Namespace) -> str:
  source = pathlib.Path(args.ckpt)
  output_guard.check_not_input(args.out, [source, args.tokenizer])
  if not source.is_dir():
    raise FileNotFoundError(f"--ckpt {source}: no such folder")
  loaded = load.load_pretrained(source, shardings=_host, base=args.base)
  lora = loaded.config.lora
  if args.adapter:
    if not lora.enabled:
      raise ValueError(f"--adapter: {source} holds no LoRA adapters (model.lora.rank 0)")
    base = loaded.info[load.LORA_BASE]
    out = peft_export.save_peft_adapter(args.out, loaded.model, loaded.config,
                                        base.removeprefix(load.HF_PREFIX),
                                        overwrite=args.overwrite)
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
  out = hf_export.export_hf(args.out, model, config, tokenizer,
                            template=template, strip_content=strip, dtype=args.dtype,
                            max_shard_bytes=int(args.max_shard_gb * 2**30),
                            overwrite=args.overwrite, metadata=metadata)
  return f"wrote {out} ({args.dtype}, template {template}{merged})"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m im_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
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
  try:
    print(args.run(args))
  except (OSError, ValueError, KeyError, SafetensorError) as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
  return 0


if __name__ == "__main__":
  sys.exit(main())
