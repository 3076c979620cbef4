"""Data pipeline benchmark: encode+mask+pack throughput and padding, on the real files; or,
with `--scale`, a training start's data cost against the number of examples.

    python scripts/bench_data.py --tokenizer DIR [--data-dir ../shared/data] [--max-seq-len 2048]
    python scripts/bench_data.py --scale --tokenizer DIR [--sizes 5000,50000,500000] [--repo DIR]
        [--container jsonl|json|parquet]

Prints, per file: the fraction of non-padding tokens for (a) im_jax packing (first and best
fit), (b) dynamic padding to the longest example in batches of 8 (in the same shuffled order),
(c) one example per row padded to max_seq_len (the paper's layout); then tokens/s of the
pipeline over all files together: the plan pass (encode every example once, count rows) and
the iteration (encode + mask + pack + batch).
"""

import argparse
import pathlib
import time

import numpy as np

from im_jax.data import encode as encode_lib
from im_jax.data import pipeline as pipeline_lib
from im_jax.data import sources
from im_jax.data import stats as stats_lib
from im_jax.data import templates
from im_jax.data import weights as weights_lib

FILES = ("lima.jsonl", "alpagasus_dolly_3k.jsonl", "alpagasus_alpaca_5k.jsonl")
DYNAMIC_BATCH = 8


def _fill_packed(pipe: pipeline_lib.DataPipeline, whole_batches: bool) -> float:
  """Non-padding fraction of the packed rows, or of whole batches (rows rounded up)."""
  rows = pipe.total_steps * pipe.config.batch_size if whole_batches else int(pipe.epoch_rows.sum())
  return pipe.stats.kept_tokens / (rows * pipe.row_length)


def _fill_dynamic(lengths: np.ndarray) -> float:
  batches = [lengths[i:i + DYNAMIC_BATCH] for i in range(0, len(lengths), DYNAMIC_BATCH)]
  return lengths.sum() / sum(len(b) * b.max() for b in batches)


def _pipeline(conversations, tokenizer, args, packing: str) -> pipeline_lib.DataPipeline:
  encode_config = encode_lib.EncodeConfig(
      templates.TemplateConfig(args.template), weights_lib.LossMaskConfig(args.loss_mode),
      max_seq_len=args.max_seq_len)
  config = pipeline_lib.PipelineConfig(
      batch_size=args.batch_size, packing=packing, num_packing_bins=args.packing_bins,
      max_segments_per_row=args.max_segments, seed=0, read_threads=args.read_threads)
  return pipeline_lib.build_pipeline(conversations, tokenizer, encode_config, config, 0, 1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokenizer", required=True)
  parser.add_argument("--data-dir", default=str(pathlib.Path(__file__).resolve().parents[2] /
                                                "shared" / "data"))
  parser.add_argument("--max-seq-len", type=int, default=2048)
  parser.add_argument("--batch-size", type=int, default=8, help="rows per batch")
  parser.add_argument("--packing-bins", type=int, default=256)
  parser.add_argument("--max-segments", type=int, default=64)
  parser.add_argument("--template", default="tulu")
  parser.add_argument("--loss-mode", default="im")
  parser.add_argument("--read-threads", type=int, default=2)
  parser.add_argument("--scale", action="store_true", help="the start-up cost against N")
  parser.add_argument("--sizes", default="5000,50000,500000", help="--scale: example counts")
  parser.add_argument("--processes", default="1,2", help="--scale: process counts")
  parser.add_argument("--container", default="jsonl", choices=("jsonl", "json", "parquet"),
                      help="--scale: the data file's container")
  parser.add_argument("--row-group-rows", type=int, default=1024,
                      help="--scale --container parquet: rows per row group")
  parser.add_argument("--repo", default=str(pathlib.Path(__file__).resolve().parents[1]),
                      help="--scale: the checkout whose code runs (default: this one)")
  parser.add_argument("--scratch", default=None, help="--scale: folder for data and workdirs "
                      "(default: a temporary one, removed)")
  args = parser.parse_args()
  if args.scale:
    import bench_data_scale  # pylint: disable=g-import-not-at-top  (beside this file)

    bench_data_scale.main(args)
    return
  tokenizer = stats_lib.load_tokenizer(args.tokenizer)
  data = {f: sources.load_conversations(pathlib.Path(args.data_dir) / f).conversations
          for f in FILES}

  print(f"max_seq_len {args.max_seq_len}, template {args.template}, loss {args.loss_mode}, "
        f"{args.packing_bins} packing bins, <= {args.max_segments} segments per row")
  print("non-padding token fraction; packed rows, and [in whole batches of "
        f"{args.batch_size} rows]")
  print(f"{'file':<27}{'kept':>5}{'tokens':>10}{'first_fit':>18}{'best_fit':>18}"
        f"{'dynamic8':>9}{'one/row':>8}{'rows ff/bf/1':>16}")
  for name, conversations in data.items():
    first = _pipeline(conversations, tokenizer, args, "first_fit")
    best = _pipeline(conversations, tokenizer, args, "best_fit")
    # the shuffled order of epoch 0 for dynamic padding
    order = np.concatenate([first.row_examples(0, r) for r in range(first.epoch_rows[0])])
    lengths = first.example_lengths[order]
    one_per_row = lengths.sum() / (len(lengths) * args.max_seq_len)
    packed = [f"{_fill_packed(p, False):>8.2%} [{_fill_packed(p, True):.2%}]" for p in (first, best)]
    print(f"{name:<27}{first.stats.kept:>5}{first.stats.kept_tokens:>10,}{packed[0]:>18}"
          f"{packed[1]:>18}{_fill_dynamic(lengths):>9.2%}{one_per_row:>8.2%}"
          f"{int(first.epoch_rows.sum()):>8}/{int(best.epoch_rows.sum())}/{len(lengths)}")

  everything = [c for conversations in data.values() for c in conversations]
  start = time.perf_counter()
  pipe = _pipeline(everything, tokenizer, args, "best_fit")
  plan_s = time.perf_counter() - start
  start = time.perf_counter()
  it = iter(pipe.dataset())
  rows = real = 0
  for batch in it:
    rows += len(batch["tokens"])
    real += int((batch["segment_ids"] > 0).sum())
  iterate_s = time.perf_counter() - start
  it.close()
  assert real == pipe.stats.kept_tokens
  print(f"all files: {pipe.stats.examples} examples, {real:,} tokens in {rows} rows "
        f"({real / (rows * args.max_seq_len):.2%} non-padding); dropped {dict(pipe.stats.dropped)}, "
        f"truncated {pipe.stats.truncated_tokens:,} tokens in {pipe.stats.truncated_examples} "
        f"examples")
  print(f"plan (encode all once + count rows): {plan_s:.2f} s = {real / plan_s:,.0f} tokens/s")
  print(f"iterate (encode+mask+pack+batch):    {iterate_s:.2f} s = {real / iterate_s:,.0f} tokens/s")
  print(f"end to end:                          {plan_s + iterate_s:.2f} s = "
        f"{real / (plan_s + iterate_s):,.0f} tokens/s")


if __name__ == "__main__":
  main()
