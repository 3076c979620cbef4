"""Train-step throughput: im_jax vs Hugging Face transformers + PyTorch, float32 on CPU.

In one run: (1) the machine's float32 matmul rate through XLA (at start and end); (2) the
im_jax train step (jax.jit, AdamW, token-normalised loss), once per attention implementation
asked for, and (3) transformers' LlamaForCausalLM with torch.optim.AdamW, on the same packed
batch (PyTorch gets the equivalent 4-D block-diagonal causal mask and the same initial
weights), same thread count. The first-step losses must agree. Steps are timed in pairs, an
im_jax step and a PyTorch step back to back in alternating order (each after one untimed step
of its own, so neither pays for the memory the other left), and `speedup` is the median of
the pairs' ratios, so one burst of outside load cannot decide it (min/min and median/median
are reported beside it). Each batch shape holds the same tokens: 4x512 and
1x2048 (longer segments, where attention's share grows). Prints tokens/s (non-padding
tokens) and each one's model FLOP rate as a fraction of (1): 6 * N * tokens plus attention
(6 * layers * heads * head_dim * sum of segment length^2: causal counted as half;
`im_jax.models.llama.training_flops`, the formula `python -m im_jax.plan` uses).

    python scripts/bench_train.py [--sizes tiny,smollm2_135m] [--batches 4x512,1x2048]
        [--impls xla,blocked] [--pieces] [--json]
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import time

import numpy as np

THREADS = len(os.sched_getaffinity(0))
# Pin both frameworks to the same thread count (XLA's CPU pool defaults to the core count).
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from im_jax import malloc_tuning  # noqa: E402
from im_jax.models.llama import Llama, LlamaConfig, num_params, training_flops  # noqa: E402
from im_jax.models.llama import params as llama_params  # noqa: E402
from im_jax.train import loss, optim, sharding, step  # noqa: E402

LR, BETAS, EPS = 1e-4, (0.9, 0.98), 1e-6
SIZES = {
    # ~7M parameters.
    "tiny": LlamaConfig.preset("tiny", vocab_size=8192, hidden_size=256,
                               intermediate_size=768, num_layers=4, num_heads=4,
                               num_kv_heads=2, head_dim=64),
    "smollm2_135m": LlamaConfig.preset("smollm2_135m"),
}


def matmul_rate(n: int = 2048, reps: int = 10) -> float:
  """Float32 FLOP/s of an n x n matmul through XLA (best of `reps`)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  return 2 * n**3 / min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(reps))


def torch_matmul_rate(n: int = 2048, reps: int = 10) -> float:
  """The same through PyTorch (its BLAS): with XLA's, it says how much of a step ratio is the
  two matmul libraries on this CPU rather than the two steps."""
  import torch
  torch.set_num_threads(THREADS)
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.matmul(a, b)
  return 2 * n**3 / min(_timed(lambda: torch.matmul(a, b)) for _ in range(reps))


def packed_batch(config: LlamaConfig, rows: int, length: int, seed: int = 0):
  """Random examples (32..length/2 tokens) packed first-fit into full rows; weight 1 on every
  real target. Returns (row dict, segment lengths)."""
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros((rows, length), np.int32) for k in
           ("tokens", "targets", "segment_ids", "positions")}
  batch["loss_weights"] = np.zeros((rows, length), np.float32)
  batch["target_kinds"] = np.zeros((rows, length), np.int8)
  lengths = []
  for r in range(rows):
    col, seg = 0, 0
    while col < length - 16:
      n = min(int(rng.integers(32, length // 2)), length - col)
      seq = rng.integers(3, config.vocab_size, n + 1)
      sl = slice(col, col + n)
      seg += 1
      batch["tokens"][r, sl], batch["targets"][r, sl] = seq[:-1], seq[1:]
      batch["segment_ids"][r, sl], batch["positions"][r, sl] = seg, np.arange(n)
      batch["loss_weights"][r, sl] = 1.0
      batch["target_kinds"][r, sl] = rng.choice([4, 5], n)  # user / assistant
      lengths.append(n)
      col += n
  return batch, lengths


class JaxRunner:
  """The im_jax train step on one device; `weights` are the initial parameters, HF-named."""

  def __init__(self, config: LlamaConfig, batch, chunk: int, total_steps: int):
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
    self.tx, _ = optim.make_optimizer(optim.OptimConfig(
        lr=LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=0.0,
        max_grad_norm=None, warmup_ratio=0.0, decay="constant"), total_steps)
    self.graphdef, self.state, shardings = step.create_train_state(
        lambda: Llama(config, rngs=nnx.Rngs(0)), self.tx, mesh)
    self.weights = (None if self.state.frozen is not None else llama_params.to_hf(  # LoRA: base
        nnx.merge(self.graphdef, self.state.params, self.state.rest), config))
    loss_fn = step.make_loss_fn(loss.LossConfig("token", chunk_size=chunk))
    self.train_step = step.make_train_step(self.graphdef, self.tx, shardings, mesh, loss_fn)
    self.batch = sharding.global_batch(batch, mesh, micro_batches=1)

  def step(self) -> float:
    """One step (blocking); returns its loss."""
    self.state, metrics = self.train_step(self.state, self.batch)
    return float(metrics["loss"])

  def pieces(self, batch, chunk: int, reps: int = 3) -> dict[str, float]:
    """Seconds (min of `reps`) of the step's pieces, each its own jit through the project's
    model and loss code: decoder layers forward, forward + backward, the chunked CE forward +
    backward, and the AdamW update."""
    graphdef, params, rest = nnx.split(nnx.merge(self.graphdef, self.state.params,
                                                 self.state.rest), nnx.Param, ...)
    b = {k: jnp.asarray(v) for k, v in batch.items()}

    def model(p):
      return nnx.merge(graphdef, p, rest)

    def layers(p, emb):
      return model(p).hidden_states(emb, b["positions"], b["segment_ids"])

    emb = jax.jit(lambda p: model(p).embed(b["tokens"]))(params)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), emb.shape, emb.dtype)
    forward = jax.jit(layers)
    backward = jax.jit(jax.grad(lambda p, e: jnp.vdot(layers(p, e), cotangent), argnums=(0, 1)))
    hidden = forward(params, emb)
    w = jax.jit(lambda p: model(p).output_embedding())(params)
    ce = jax.jit(jax.grad(lambda h, w: jnp.sum(loss.chunked_cross_entropy(
        h, w, b["targets"], chunk)), argnums=(0, 1)))
    grads = jax.tree.map(jnp.ones_like, params)
    opt_state = self.tx.init(params)
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, self.tx.update(g, s, p)[0]))
    out = {}
    for name, fn, args in (("layers_forward", forward, (params, emb)),
                           ("layers_forward_backward", backward, (params, emb)),
                           ("ce_forward_backward", ce, (hidden, w)),
                           ("adamw_update", update, (grads, opt_state, params))):
      jax.block_until_ready(fn(*args))
      out[name] = min(_timed(lambda: jax.block_until_ready(fn(*args))) for _ in range(reps))
    return out


class TorchRunner:
  """transformers' LlamaForCausalLM + torch AdamW from the same weights and batch."""

  def __init__(self, config: LlamaConfig, batch, weights: dict[str, np.ndarray]):
    import torch
    import transformers

    self.torch = torch
    torch.set_num_threads(THREADS)
    hf_config = transformers.LlamaConfig.from_dict(config.to_hf_dict())
    self.model = transformers.LlamaForCausalLM._from_config(
        hf_config, attn_implementation="sdpa", dtype=torch.float32)
    missing, unexpected = self.model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
      self.model.tie_weights()
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                 weight_decay=0.0)
    seg = torch.from_numpy(batch["segment_ids"]).long()
    self.positions = torch.from_numpy(batch["positions"]).long()
    pos = self.positions
    # True = may attend: same segment, not padding, causal by position. Padding attends to
    # itself only, so SDPA never sees an empty row (NaN); it carries no loss.
    mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
            & (pos[:, None, :] <= pos[:, :, None]))
    self.mask = (mask | torch.eye(seg.shape[1], dtype=torch.bool)[None])[:, None]
    self.tokens = torch.from_numpy(batch["tokens"]).long()
    self.labels = torch.from_numpy(
        np.where(batch["loss_weights"] > 0, batch["targets"], -100)).long()

  def step(self) -> float:
    logits = self.model(input_ids=self.tokens, attention_mask=self.mask,
                        position_ids=self.positions, use_cache=False).logits
    # Mean over weighted targets = im_jax's token normalisation with unit weights.
    value = self.torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), self.labels.reshape(-1),
        ignore_index=-100)
    value.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return value.item()


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _summary(times: list[float], tokens: int, flops: float, peak: float) -> dict:
  median = statistics.median(times)
  return {"step_s": median, "step_s_min": min(times), "tokens_per_s": tokens / median,
          "flops_fraction_of_matmul": flops / median / peak}


def run_batch(name: str, impls: list[str], steps: int, warmup: int, rows: int, length: int,
              chunk: int, peak: float, pieces: bool) -> dict:
  """Both frameworks on one packed batch: per im_jax attention implementation, `steps` timed
  pairs (an im_jax step and a PyTorch step back to back, their order alternating)."""
  batch, lengths = packed_batch(SIZES[name], rows, length)
  tokens = sum(lengths)
  jax_runners = {impl: JaxRunner(dataclasses.replace(SIZES[name], attention_impl=impl), batch,
                                 chunk, 2 * (steps + warmup) + 1) for impl in impls}
  torch_runner = TorchRunner(SIZES[name], batch, jax_runners[impls[0]].weights)
  first = {f"im_jax_{impl}": r.step() for impl, r in jax_runners.items()}  # compiles here
  first["torch"] = torch_runner.step()
  for key, value in first.items():
    assert abs(value - first["torch"]) <= 1e-4 * abs(first["torch"]), first
  jax_times = {impl: [] for impl in impls}
  torch_times = {impl: [] for impl in impls}
  faults = {"im_jax": [], "torch": []}  # minor page faults per step (malloc_tuning.py)
  for i in range(warmup + steps):
    for impl, runner in jax_runners.items():
      order = [("jax", runner.step), ("torch", torch_runner.step)]
      pair = {}
      for key, fn in (order if i % 2 == 0 else order[::-1]):
        # One untimed step of its own first: a step right after the other framework's pays
        # for the memory that one left (fresh pages to fault and zero; up to 1.7x here), a
        # cost a training process, which runs one framework, never has.
        fn()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        pair[key] = _timed(fn)
        if i >= warmup:
          faults["im_jax" if key == "jax" else "torch"].append(
              resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      if i >= warmup:
        jax_times[impl].append(pair["jax"])
        torch_times[impl].append(pair["torch"])
  flops = training_flops(SIZES[name], lengths)
  out = {"batch": f"{rows}x{length}", "tokens": tokens, "segments": len(lengths),
         "mean_segment_length": tokens / len(lengths), "steps": steps, "warmup": warmup,
         "first_loss": first, "model_flops_per_step": flops, "im_jax": {}, "torch": {},
         "page_faults_per_step_median": {k: statistics.median(v) for k, v in faults.items()},
         "speedup": {}}
  for impl in impls:
    jt, tt = jax_times[impl], torch_times[impl]
    out["im_jax"][impl] = _summary(jt, tokens, flops, peak)
    out["torch"][f"paired_with_{impl}"] = _summary(tt, tokens, flops, peak)
    ratios = [t / j for j, t in zip(jt, tt)]
    out["speedup"][impl] = {"median_of_pair_ratios": statistics.median(ratios),
                            "pair_ratios": ratios, "min_over_min": min(tt) / min(jt),
                            "median_over_median": statistics.median(tt) / statistics.median(jt)}
    if pieces:
      out["im_jax"][impl]["pieces_s"] = jax_runners[impl].pieces(batch, chunk)
  # PyTorch's attention on CPU is SDPA with the dense block-diagonal mask (flash-attention's
  # varlen kernels are CUDA-only), so its dense path is also its best.
  out["speedup_vs_torch"] = {  # dense: im_jax's xla path (None when not run)
      "dense_vs_dense": (out["speedup"]["xla"]["median_of_pair_ratios"] if "xla" in impls
                         else None),
      "best_vs_best": max(v["median_of_pair_ratios"] for v in out["speedup"].values()),
      "best_impl": max(impls, key=lambda k: out["speedup"][k]["median_of_pair_ratios"])}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny,smollm2_135m")
  parser.add_argument("--batches", default="4x512,1x2048",
                      help="ROWSxLENGTH packed batches (same tokens, longer segments)")
  parser.add_argument("--impls", default="xla",
                      help="im_jax attention implementations, e.g. xla,blocked")
  parser.add_argument("--steps", type=int, default=0, help="timed pairs (default per size)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--chunk", type=int, default=128,
                      help="im_jax loss chunk size (0: full logits; 128 was fastest here)")
  parser.add_argument("--pieces", action="store_true",
                      help="also time the step's pieces (layers fwd, fwd+bwd, CE, AdamW)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args()
  peak = matmul_rate()
  report = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"nproc": os.cpu_count(), "threads": THREADS, "cpu": _cpu_model(),
                  "cpu_flags": _cpu_flags(), "transparent_hugepages": _transparent_hugepages(),
                  "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "python": platform.python_version(), "jax": jax.__version__,
                  "load_avg_1m_at_start": os.getloadavg()[0], "malloc": malloc_tuning.status()},
      "xla_matmul_gflops": peak / 1e9, "torch_matmul_gflops": torch_matmul_rate() / 1e9,
      "sizes": {}}
  impls = args.impls.split(",")
  for name in args.sizes.split(","):
    steps = args.steps or (20 if name == "tiny" else 5)
    report["sizes"][name] = {"params": num_params(SIZES[name]), "batches": {}}
    for spec in args.batches.split(","):
      rows, length = (int(x) for x in spec.split("x"))
      result = run_batch(name, impls, steps, args.warmup, rows, length, args.chunk, peak,
                         args.pieces)
      report["sizes"][name]["batches"][spec] = result
      if not args.json:
        _print_batch(name, result)
  report["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
  report["machine"]["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  report["xla_matmul_gflops_at_end"] = matmul_rate() / 1e9
  report["torch_matmul_gflops_at_end"] = torch_matmul_rate() / 1e9
  if args.json:
    print(json.dumps(report, indent=2))
  else:
    print(f"XLA float32 matmul: {peak / 1e9:.1f} GFLOP/s at start, "
          f"{report['xla_matmul_gflops_at_end']:.1f} at end (PyTorch: "
          f"{report['torch_matmul_gflops']:.1f} / {report['torch_matmul_gflops_at_end']:.1f}), "
          f"on {THREADS} threads "
          f"({report['machine']['cpu']}); load {report['machine']['load_avg_1m_at_start']:.2f}"
          f" -> {report['machine']['load_avg_1m_at_end']:.2f}; {report['machine']['malloc']}")


def _print_batch(name: str, r: dict) -> None:
  print(f"{name} {r['batch']}: {r['tokens']} tokens in {r['segments']} segments "
        f"(mean {r['mean_segment_length']:.0f}); first losses {r['first_loss']}")
  for impl, x in r["im_jax"].items():
    t = r["torch"][f"paired_with_{impl}"]
    s = r["speedup"][impl]
    print(f"  im_jax[{impl}] {x['step_s']:.3f} s/step (min {x['step_s_min']:.3f}), "
          f"{x['tokens_per_s']:.0f} tokens/s, {100 * x['flops_fraction_of_matmul']:.1f}% of "
          f"matmul rate | torch {t['step_s']:.3f} (min {t['step_s_min']:.3f}) | speedup "
          f"{s['median_of_pair_ratios']:.2f}x median of pairs, {s['min_over_min']:.2f}x min/min")
    if "pieces_s" in x:
      print("    pieces: " + ", ".join(f"{k} {v:.3f} s" for k, v in x["pieces_s"].items()))
  v = r["speedup_vs_torch"]
  dense = "not run" if v["dense_vs_dense"] is None else f"{v['dense_vs_dense']:.2f}x"
  print(f"  speedup_vs_torch: dense vs dense {dense}, best vs best {v['best_vs_best']:.2f}x "
        f"({v['best_impl']})")


def _cpu_flags() -> str:
  """The vector-ISA flags XLA's and PyTorch's CPU code depend on."""
  wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          have = set(line.split(":", 1)[1].split())
          return " ".join(flag for flag in wanted if flag in have)
  except OSError:
    pass
  return ""


def _transparent_hugepages() -> str:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return f.read().strip()
  except OSError:
    return "unknown"


def _cpu_model() -> str:
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("cpu family", "model")):
          key, value = (x.strip() for x in line.split(":", 1))
          fields.setdefault(key, value)
  except OSError:
    pass
  # "AMD EPYC" alone does not tell one generation from another: family/model do.
  if "model name" in fields:
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')})")
  return platform.processor()


if __name__ == "__main__":
  malloc_tuning.reexec_with_tuned_malloc()
  main()
