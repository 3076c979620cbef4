"""lm-evaluation-harness throughput: im_jax's HarnessLM vs lm-eval's own `hf` backend.

    python scripts/bench_eval.py --model hf:DIR [--requests 240] [--gen-requests 16]
        [--max-gen-toks 32] [--batch-size 8] [--json]

On one model folder (SmolLM2-135M-Instruct in docs/benchmarks.md), the same requests through
both backends' lm-eval interface, same batch size: a multiple-choice task's `loglikelihood`
requests (questions made up here, 4 choices each) and greedy `generate_until` requests (stop
at a newline, at most --max-gen-toks tokens). Reports requests/s and tokens/s (context plus
continuation tokens; for generation the new tokens); for im_jax the first pass (compilation
included), its compile time (JAX's own compile-duration events) and a second, compiled pass.
The hf backend runs each workload once (no compilation), before im_jax; its folder is a linked copy of
--model without a GGUF `quantization_config`, which that backend refuses. The answers are
checked to agree (loglikelihoods to relative 1e-4, generations exactly).
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere

import numpy as np  # noqa: E402

SUBJECTS = ("the river", "a small cat", "the old library", "my neighbour", "the red train",
            "a quiet village", "the winter sky", "an orange kite")
VERBS = ("watched", "found", "painted", "followed", "remembered", "described")
OBJECTS = ("the lighthouse", "a paper boat", "three green apples", "the morning bus",
           "a broken clock", "the tall tree")


def mc_requests(count: int) -> list[tuple[str, str]]:
  """`count` (context, continuation) pairs, 4 continuations per made-up question."""
  out = []
  for i in range((count + 3) // 4):
    subject, verb = SUBJECTS[i % len(SUBJECTS)], VERBS[(i // len(SUBJECTS)) % len(VERBS)]
    context = f"Question {i}: What was it that {subject} {verb} yesterday?\nAnswer:"
    out += [(context, " " + OBJECTS[(i + k) % len(OBJECTS)]) for k in range(4)]
  return out[:count]


def gen_requests(count: int, max_gen_toks: int) -> list[tuple[str, dict]]:
  return [(f"Question: What happened when {SUBJECTS[i % len(SUBJECTS)]} "
           f"{VERBS[i % len(VERBS)]} {OBJECTS[i % len(OBJECTS)]}?\nAnswer:",
           {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False})
          for i in range(count)]


def lmeval_folder(model_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  for f in model_dir.iterdir():
    if f.name != "config.json":
      (out / f.name).symlink_to(f.absolute())
  config = json.loads((model_dir / "config.json").read_text())
  config.pop("quantization_config", None)
  (out / "config.json").write_text(json.dumps(config))
  return out


_COMPILE_EVENTS = "/jax/core/compile/"  # tracing, lowering and XLA compilation
_compile_seconds = [0.0]


def _on_duration(event: str, seconds: float, **kwargs) -> None:
  del kwargs
  if event.startswith(_COMPILE_EVENTS):
    _compile_seconds[0] += seconds


def _timed(fn, *args):
  """(result, wall seconds, of which compiling)."""
  compiled_before, start = _compile_seconds[0], time.perf_counter()
  result = fn(*args)
  return result, time.perf_counter() - start, _compile_seconds[0] - compiled_before


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="hf:DIR, a Hugging Face folder")
  p.add_argument("--requests", type=int, default=240, help="loglikelihood requests")
  p.add_argument("--gen-requests", type=int, default=16)
  p.add_argument("--max-gen-toks", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top

  from im_jax.convert import load  # pylint: disable=g-import-not-at-top
  from im_jax.data.stats import load_tokenizer  # pylint: disable=g-import-not-at-top
  from im_jax.eval import harness_lm  # pylint: disable=g-import-not-at-top
  from im_jax.train import sharding  # pylint: disable=g-import-not-at-top

  model_dir = pathlib.Path(args.model.removeprefix("hf:"))
  ll = [Instance("loglikelihood", {}, a, i) for i, a in enumerate(mc_requests(args.requests))]
  gen = [Instance("generate_until", {}, a, i)
         for i, a in enumerate(gen_requests(args.gen_requests, args.max_gen_toks))]
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=1))
  loaded = load.load_pretrained(args.model, shardings=sharding.sharding_fn(mesh))
  tokenizer = load_tokenizer(str(model_dir))
  ours = harness_lm.HarnessLM(loaded.model, tokenizer, mesh=mesh, batch_size=args.batch_size,
                              stop_ids=harness_lm.default_stop_ids(tokenizer, model_dir))
  ll_tokens = sum(len(tokenizer(c + x)["input_ids"]) for c, x in (r.args for r in ll))
  results = {"requests": len(ll), "gen_requests": len(gen), "batch_size": args.batch_size,
             "devices": len(jax.devices()), "loglikelihood_tokens": ll_tokens}

  # The hf backend first: after JAX has run, XLA's idle CPU threads slowed PyTorch here
  # (78 s alone, 130 s after, for the default loglikelihood workload).
  with tempfile.TemporaryDirectory() as tmp:
    hf = HFLM(pretrained=str(lmeval_folder(model_dir, pathlib.Path(tmp))),
              batch_size=args.batch_size, dtype="float32", device="cpu")
    hf_ll, hf_time, _ = _timed(hf.loglikelihood, ll)
    hf_gen, hf_gen_time, _ = _timed(hf.generate_until, gen)
    del hf
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  ours_ll, first, ll_compile = _timed(ours.loglikelihood, ll)
  _, second, _ = _timed(ours.loglikelihood, ll)
  ours_gen, gen_first, gen_compile = _timed(ours.generate_until, gen)
  _, gen_second, _ = _timed(ours.generate_until, gen)
  np.testing.assert_allclose([v for v, _ in ours_ll], [v for v, _ in hf_ll], rtol=1e-4)
  gen_agree = sum(a == b for a, b in zip(ours_gen, hf_gen))
  new_tokens = sum(len(tokenizer(t)["input_ids"]) for t in hf_gen)
  results.update(
      im_jax_ll_first_s=first, im_jax_ll_compile_s=ll_compile, im_jax_ll_s=second,
      hf_ll_s=hf_time, im_jax_gen_first_s=gen_first, im_jax_gen_compile_s=gen_compile,
      im_jax_gen_s=gen_second, hf_gen_s=hf_gen_time, gen_new_tokens=new_tokens,
      generations_identical=f"{gen_agree}/{len(gen)}")
  for name in ("im_jax_ll_first", "im_jax_ll", "hf_ll"):
    results[name + "_requests_per_s"] = len(ll) / results[name + "_s"]
    results[name + "_tokens_per_s"] = ll_tokens / results[name + "_s"]
  for name in ("im_jax_gen_first", "im_jax_gen", "hf_gen"):
    results[name + "_requests_per_s"] = len(gen) / results[name + "_s"]
    results[name + "_new_tokens_per_s"] = new_tokens / results[name + "_s"]
  results["ll_speedup_with_compile"] = hf_time / first
  results["ll_speedup_compiled"] = hf_time / second
  results["gen_speedup_with_compile"] = hf_gen_time / gen_first
  results["gen_speedup_compiled"] = hf_gen_time / gen_second
  if args.json:
    print(json.dumps(results))
  else:
    for key, value in results.items():
      print(f"{key:>34}: {value:.3f}" if isinstance(value, float) else f"{key:>34}: {value}")
  return results


if __name__ == "__main__":
  main()
