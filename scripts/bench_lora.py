"""LoRA vs full fine-tuning: train-step speed and peak memory of im_jax on this machine.

Each mode runs in a process of its own, so its peak resident memory is its own: the im_jax
train step (AdamW, token-normalised loss, float32) on one packed batch, with every weight
trained (`full`) or only LoRA adapters on the attention and MLP projections (`lora`, the base
frozen and without optimizer moments). Modes alternate for `--rounds` rounds so outside load
hits both alike. Reports per mode: median step time and tokens/s, the peak resident set size
(ru_maxrss) and the compiled step's own accounting (arguments, outputs, temporaries).

    python scripts/bench_lora.py [--size smollm2_135m] [--rank 16] [--rounds 2] [--json]
"""

import argparse
import dataclasses
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys



def run_mode(mode: str, size: str, rank: int, rows: int, length: int, steps: int) -> dict:
  """One mode, in this process: compiled memory, step times, peak RSS."""
  import bench_train  # pylint: disable=g-import-not-at-top  (sets threads, imports jax)
  import jax  # pylint: disable=g-import-not-at-top
  from im_jax.models.lora import LoraConfig  # pylint: disable=g-import-not-at-top

  config = bench_train.SIZES[size]
  if mode == "lora":
    config = dataclasses.replace(config, lora=LoraConfig(rank=rank, alpha=2.0 * rank))
  batch, lengths = bench_train.packed_batch(config, rows, length)
  runner = bench_train.JaxRunner(config, batch, 128, steps + 2)
  compiled = runner.train_step.jitted.lower(runner.state, runner.batch).compile()
  memory = compiled.memory_analysis()
  trained = sum(x.size for x in jax.tree.leaves(runner.state.params))
  first = runner.step()
  times = [bench_train._timed(runner.step) for _ in range(steps)]  # pylint: disable=protected-access
  median = statistics.median(times)
  return {"mode": mode, "trained_parameters": int(trained), "first_loss": first,
          "step_s": median, "step_s_min": min(times), "tokens_per_s": sum(lengths) / median,
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          "compiled_gib": {"arguments": memory.argument_size_in_bytes / 2**30,
                           "outputs": memory.output_size_in_bytes / 2**30,
                           "aliased": memory.alias_size_in_bytes / 2**30,
                           "temporaries": memory.temp_size_in_bytes / 2**30}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="smollm2_135m")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--rows", type=int, default=4)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  if args.mode:  # a child: one mode, one JSON line
    print(json.dumps(run_mode(args.mode, args.size, args.rank, args.rows, args.length,
                              args.steps)))
    return
  load_start = os.getloadavg()[0]
  runs = []
  for _ in range(args.rounds):
    for mode in ("full", "lora"):
      argv = [sys.executable, __file__, "--mode", mode, "--size", args.size, "--rank",
              str(args.rank), "--rows", str(args.rows), "--length", str(args.length),
              "--steps", str(args.steps)]
      proc = subprocess.run(argv, capture_output=True, text=True, check=True)
      runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  by_mode = {m: [r for r in runs if r["mode"] == m] for m in ("full", "lora")}
  summary = {m: {"step_s_median_of_rounds": statistics.median(r["step_s"] for r in rs),
                 "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                 "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                 "trained_parameters": rs[0]["trained_parameters"],
                 "compiled_gib": rs[0]["compiled_gib"]} for m, rs in by_mode.items()}
  report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "size": args.size, "batch": f"{args.rows}x{args.length}", "rank": args.rank,
            "load_avg_1m": [load_start, os.getloadavg()[0]], "nproc": os.cpu_count(),
            "runs": runs, "summary": summary,
            "lora_speedup": (summary["full"]["step_s_median_of_rounds"]
                             / summary["lora"]["step_s_median_of_rounds"])}
  if args.json:
    print(json.dumps(report, indent=2))
    return
  for m, s in summary.items():
    c = s["compiled_gib"]
    print(f"{m}: {s['step_s_median_of_rounds']:.2f} s/step, {s['tokens_per_s']:.0f} tokens/s, "
          f"peak RSS {s['peak_rss_gib']:.2f} GiB, trained {s['trained_parameters'] / 1e6:.2f}M; "
          f"compiled: arguments {c['arguments']:.2f} GiB, temporaries {c['temporaries']:.2f} GiB")
  print(f"LoRA step speed-up {report['lora_speedup']:.2f}x; load {load_start:.2f} -> "
        f"{report['load_avg_1m'][1]:.2f}")


if __name__ == "__main__":
  from im_jax import malloc_tuning  # pylint: disable=g-import-not-at-top
  malloc_tuning.reexec_with_tuned_malloc()
  main()
