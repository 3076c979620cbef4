"""`python -m im_jax.plan --config FILE[:ARGS] [--config.KEY=VALUE ...] --topology T`.

Compiles the exact train step `python -m im_jax.train` would run with that config for the
topology (`v5e:8x8`, `v5litepod-64`, `v4-32`, `v5p-16`, `v6e-16`, `cpu:N`) and prints, per
device, parameter, optimizer, batch, temporary and code bytes against the chip's usable HBM,
FLOPs per step and the step time implied at 40% and 60% MFU, and whether it fits.
`--sweep remat` compiles once per remat policy; `--json` prints the same as JSON. Needs no
weights and reads no data. Bad settings are one line and exit status 2.
"""

import json
import os
import sys

from im_jax import cli
from im_jax.run import config_args

GiB = 2**30
REMAT_POLICIES = ("none", "minimal", "full")


def _parser() -> config_args.ConfigArgumentParser:
  parser = config_args.ConfigArgumentParser(prog="python -m im_jax.plan", description=__doc__)
  parser.add_argument("--topology", required=True,
                      help="v5e:8x8 | v5litepod-64 | v4-32 | v5p-16 | v6e-16 | cpu:N ...")
  parser.add_argument("--sweep", choices=("remat",),
                      help="compile once per value of this setting")
  parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
  return parser


def _gib(n: int | None) -> str:
  return "-" if n is None else f"{n / GiB:.3f}"


def _print_plan(p, label: str) -> None:
  print(f"plan: {label} on {p.topology} ({p.devices} x {p.device_kind}), mesh "
        + " ".join(f"{k}={v}" for k, v in p.mesh.items()))
  print(f"model {p.model}: {p.parameters:,} parameters; {p.rows_per_step} rows x {p.seq_len} "
        f"tokens per step in {p.grad_accum} micro-batch(es); remat {p.remat_policy}; "
        f"attention {p.attention_impl}")
  print("per device (GiB)")
  if p.memory is not None:
    m = p.memory
    for name, key in (("parameters", "params"), ("optimizer state", "optimizer"),
                      ("KL reference", "reference"),
                      ("batch", "batch"), ("temporaries", "temporaries"), ("code", "code"),
                      ("total", "total")):
      if key != "reference" or m[key]:  # only runs with loss.kl_to_base > 0 hold one
        print(f"  {name:<18}{_gib(m[key]):>9}")
  else:
    print(f"  the compiler refused the step: {p.out_of_memory}")
  if p.usable_hbm:
    print(f"  {'usable HBM':<18}{_gib(p.usable_hbm):>9}   (the TPU compiler's limit)")
  flops = ("-" if p.compiler_flops_per_device is None
           else f"{p.compiler_flops_per_device * p.devices:.3e}")
  reference = " + the KL reference's forward (x 8/6)" if p.kl_reference else ""
  print(f"FLOPs per step: 6*N*tokens + causal attention{reference} "
        f"{p.analytic_flops_per_step:.3e}; "
        f"compiler {flops} (all devices; XLA counts a loop body once, so scanned layers and "
        "accumulated micro-batches are counted once: --config.model.scan_layers=false "
        "--config.train.grad_accum=1 gives the full count; Pallas kernels are not counted)")
  for mfu in (0.4, 0.6):
    t = p.step_seconds(mfu)
    if t is not None:
      print(f"at {mfu:.0%} MFU: {t:.2f} s per step, "
            f"{p.tokens_per_second_per_chip(mfu):,.0f} tokens/s per chip")
  print(f"verdict: {p.verdict()}")


def _print_sweep(plans, label: str) -> None:
  p0 = plans[0]
  print(f"plan: {label} on {p0.topology} ({p0.devices} x {p0.device_kind}); GiB per device")
  print(f"{'remat':<9}{'temporaries':>12}{'total':>9}{'usable':>9}  verdict")
  for p in plans:
    temps = _gib(p.memory["temporaries"]) if p.memory else "-"
    print(f"{p.remat_policy:<9}{temps:>12}{_gib(p.needed):>9}{_gib(p.usable_hbm):>9}  "
          f"{p.verdict()}")


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from im_jax.plan import topology as topo_lib  # pylint: disable=g-import-not-at-top
  try:
    topology = topo_lib.parse(args.topology)
  except topo_lib.TopologyError as e:
    return cli.report(e)
  if topology.chip is None:  # cpu:N: N host devices, before JAX starts its CPU backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={topology.num_devices}")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")  # compile only: never probe or use an accelerator
  from im_jax.run import settings  # pylint: disable=g-import-not-at-top
  from im_jax.plan import analysis  # pylint: disable=g-import-not-at-top

  try:
    config = config_args.load(args)
  except settings.ConfigError as e:
    return cli.report(e)
  policies = REMAT_POLICIES if args.sweep == "remat" else (config.model.remat_policy,)
  plans = []
  try:
    for policy in policies:
      c = config.copy_and_resolve_references()
      c.model.remat_policy = policy
      plans.append(analysis.plan(settings.load(c), topology))
  except (settings.ConfigError, topo_lib.TopologyError) as e:
    return cli.report(e)
  label = args.config
  if args.json:
    out = [p.as_dict() for p in plans]
    print(json.dumps(out if args.sweep else out[0], indent=2))
  elif args.sweep:
    _print_sweep(plans, label)
  else:
    _print_plan(plans[0], label)
  return 0


if __name__ == "__main__":
  sys.exit(main())
