"""Train-step throughput: im_jax vs Hugging Face transformers + PyTorch, float32 on CPU.

In one run: (1) the machine's float32 matmul rate through XLA; (2) the im_jax train step
(jax.jit, AdamW, token-normalised loss) and (3) transformers' LlamaForCausalLM with
torch.optim.AdamW, both on the same packed batch (PyTorch gets the equivalent 4-D
block-diagonal causal mask and the same initial weights), same thread count, timed after
warm-up. The first-step losses must agree. Prints tokens/s (non-padding tokens), their ratio
and each one's model FLOP rate as a fraction of (1): 6 * N * tokens plus attention
(6 * layers * heads * head_dim * sum of segment length^2: causal counted as half).

    python scripts/bench_train.py [--sizes tiny,smollm2_135m] [--json]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

THREADS = len(os.sched_getaffinity(0))
# Pin both frameworks to the same thread count (XLA's CPU pool defaults to the core count).
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from im_jax import host_memory  # noqa: E402
from im_jax.models.llama import Llama, LlamaConfig, num_params  # noqa: E402
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
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / min(times)


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
    tx, _ = optim.make_optimizer(optim.OptimConfig(
        learning_rate=LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=0.0,
        max_grad_norm=None, warmup_ratio=0.0, decay="constant"), total_steps)
    graphdef, self.state, shardings = step.create_train_state(
        lambda: Llama(config, rngs=nnx.Rngs(0)), tx, mesh)
    self.weights = llama_params.to_hf(nnx.merge(graphdef, self.state.params, self.state.rest),
                                      config)
    loss_fn = step.make_loss_fn(loss.LossConfig("token", chunk_size=chunk))
    self.train_step = step.make_train_step(graphdef, tx, shardings, mesh, loss_fn)
    self.batch = sharding.global_batch(batch, mesh, micro_batches=1)

  def step(self) -> float:
    """One step (blocking); returns its loss."""
    self.state, metrics = self.train_step(self.state, self.batch)
    return float(metrics["loss"])


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


def model_flops(config: LlamaConfig, lengths: list[int]) -> float:
  """Training FLOPs of one step: 6 N per token (N = matmul parameters: all but the input
  embedding lookup, the output projection counted once) + causal attention."""
  n = num_params(config) - (0 if config.tie_word_embeddings else
                            config.vocab_size * config.hidden_size)
  tokens = sum(lengths)
  attn = 6 * config.num_layers * config.num_heads * config.head_dim * sum(x * x for x in lengths)
  return 6 * n * tokens + attn


def run_size(name: str, steps: int, warmup: int, rows: int, length: int, chunk: int,
             peak: float) -> dict:
  config = SIZES[name]
  batch, lengths = packed_batch(config, rows, length)
  tokens = sum(lengths)
  runners = {"im_jax": JaxRunner(config, batch, chunk, steps + warmup + 1)}
  runners["torch"] = TorchRunner(config, batch, runners["im_jax"].weights)
  first = {key: r.step() for key, r in runners.items()}  # im_jax compiles here
  assert abs(first["im_jax"] - first["torch"]) <= 1e-4 * abs(first["torch"]), first
  # Alternate the two step by step, so load from other processes hits both alike.
  times = {key: [] for key in runners}
  for i in range(warmup + steps):
    for key, r in runners.items():
      t = _timed(r.step)
      if i >= warmup:
        times[key].append(t)
  flops = model_flops(config, lengths)
  out = {"params": num_params(config), "batch": f"{rows}x{length}", "tokens": tokens,
         "segments": len(lengths), "steps": steps, "warmup": warmup, "first_loss": first,
         "model_flops_per_step": flops}
  for key, t in times.items():
    median = statistics.median(t)
    out[key] = {"step_s": median, "step_s_min": min(t), "tokens_per_s": tokens / median,
                "flops_fraction_of_matmul": flops / median / peak}
  out["speedup_vs_torch"] = out["torch"]["step_s"] / out["im_jax"]["step_s"]
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny,smollm2_135m")
  parser.add_argument("--steps", type=int, default=0, help="timed steps (default per size)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--rows", type=int, default=4)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--chunk", type=int, default=128,
                      help="im_jax loss chunk size (0: full logits; 128 was fastest here)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args()
  peak = matmul_rate()
  report = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"nproc": os.cpu_count(), "threads": THREADS, "cpu": _cpu_model(),
                  "python": platform.python_version(), "jax": jax.__version__,
                  "load_avg_1m_at_start": os.getloadavg()[0], "malloc": host_memory.status()},
      "xla_matmul_gflops": peak / 1e9, "sizes": {}}
  for name in args.sizes.split(","):
    steps = args.steps or (20 if name == "tiny" else 5)
    report["sizes"][name] = run_size(name, steps, args.warmup, args.rows, args.length,
                                     args.chunk, peak)
    if not args.json:
      _print_size(name, report["sizes"][name])
  report["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
  if args.json:
    print(json.dumps(report, indent=2))
  else:
    print(f"XLA float32 matmul: {peak / 1e9:.1f} GFLOP/s on {THREADS} threads "
          f"({report['machine']['cpu']})")


def _print_size(name: str, r: dict) -> None:
  print(f"{name}: {r['params'] / 1e6:.1f}M params, {r['batch']} rows, {r['tokens']} tokens "
        f"in {r['segments']} segments; first loss im_jax {r['first_loss']['im_jax']:.5f} "
        f"torch {r['first_loss']['torch']:.5f}")
  for key in ("im_jax", "torch"):
    x = r[key]
    print(f"  {key:7s} {x['step_s']:.3f} s/step  {x['tokens_per_s']:.0f} tokens/s  "
          f"{100 * x['flops_fraction_of_matmul']:.1f}% of XLA matmul rate")
  print(f"  speedup_vs_torch {r['speedup_vs_torch']:.2f}x")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


if __name__ == "__main__":
  host_memory.reexec_with_tuned_malloc()
  main()
