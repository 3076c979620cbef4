"""Where the im_jax train step spends its time on this CPU: a per-op-category table.

Runs the step of `scripts/bench_train.py` (same model, batch and optimizer) with an XLA dump
of the optimized HLO and a `jax.profiler` trace of one step, then attributes every executed
HLO op (the CPU runtime's per-thunk trace events) to a category by the source line that
produced it (the dump's stack frames): each projection's matmuls by name, attention, norms,
RoPE, MLP elementwise, cross-entropy, optimizer, step glue, and compiler-made copies. Matmuls
also get their FLOP rate, which shows the ones XLA runs as slow loops.

    python scripts/profile_step.py [--size smollm2_135m] [--rows 4] [--length 512]
        [--impl xla|blocked] [--json]

Also reported: each untraced step's kernel (system) time and minor page faults, the cost
that im_jax/malloc_tuning.py removes (compare with IM_JAX_MALLOC=system).

Thunks may overlap on the CPU runtime's thread pool, so the ops' sum can exceed the step's
wall time; the table prints both.
"""

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import resource
import tempfile
import time


def _shape(type_text: str) -> tuple[int, ...]:
  m = re.match(r"\w+\[([\d,]*)\]", type_text)
  return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+?)(?:\{[\d,]*\})? ([\w\-]+)\((.*)$")


class HloModule:
  """The optimized HLO text: instructions per computation and the stack-frame tables."""

  def __init__(self, text: str):
    self.computations: dict[str, list[dict]] = {}
    self.files, self.functions, self.locations, self.frames = {}, {}, {}, {}
    section, current = None, None
    for line in text.splitlines():
      if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        section = line
        continue
      if section and re.match(r"^\d+ ", line):
        key, value = line.split(" ", 1)
        if section == "FileNames":
          self.files[int(key)] = value.strip('"')
        elif section == "FunctionNames":
          self.functions[int(key)] = value.strip('"')
        elif section == "FileLocations":
          fields = dict(re.findall(r"(\w+)=(\d+)", value))
          self.locations[int(key)] = (int(fields["file_name_id"]),
                                      int(fields["function_name_id"]), int(fields["line"]))
        else:
          fields = dict(re.findall(r"(\w+)=(\d+)", value))
          self.frames[int(key)] = (int(fields["file_location_id"]),
                                   int(fields["parent_frame_id"]))
        continue
      section = None
      head = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$", line)
      if head:
        current = self.computations.setdefault(head.group(1), [])
        continue
      m = _INSTR.match(line)
      if m and current is not None:
        name, type_text, opcode, rest = m.groups()
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        current.append({"name": name, "shape": _shape(type_text), "opcode": opcode,
                        "rest": rest, "calls": calls.group(1) if calls else None,
                        "frame": int(frame.group(1)) if frame else None,
                        "op_name": op_name.group(1) if op_name else ""})
    self.by_name = {i["name"]: i for comp in self.computations.values() for i in comp}

  def stack(self, frame: int | None) -> list[tuple[str, str, int]]:
    """(file, function, line), innermost first."""
    out, seen = [], set()
    while frame and frame not in seen and frame in self.frames:
      seen.add(frame)
      loc, parent = self.frames[frame]
      file_id, function_id, line = self.locations[loc]
      out.append((self.files.get(file_id, "?"), self.functions.get(function_id, "?"), line))
      frame = parent - 1  # the dump prints a parent as its id + 1 (1: no parent)
    return out

  def dot_flops(self, dot: dict, computation: list[dict]) -> float:
    shapes = {i["name"]: i["shape"] for i in computation}
    operands = re.findall(r"%([\w.\-]+)", dot["rest"].split(")", 1)[0])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot["rest"])
    if not operands or contracting is None or operands[0] not in shapes:
      return 0.0
    lhs = shapes[operands[0]]
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
    return 2.0 * math.prod(dot["shape"]) * k


_SOURCE_CACHE: dict[str, list[str]] = {}


def _source_line(path: str, line: int) -> str:
  if path not in _SOURCE_CACHE:
    try:
      with open(path, encoding="utf-8") as f:
        _SOURCE_CACHE[path] = f.read().splitlines()
    except OSError:
      _SOURCE_CACHE[path] = []
  lines = _SOURCE_CACHE[path]
  return lines[line - 1] if 0 < line <= len(lines) else ""


# Frames of Dense's own code: a matmul is named by the model line that called the Dense.
_DENSE_FRAMES = ("Dense.__call__", "_contract")


def categorize(module: HloModule, instr: dict) -> tuple[str, float]:
  """(category, matmul FLOPs) of one executed op."""
  inner = module.computations.get(instr["calls"] or "", [])
  dots = [i for i in inner if i["opcode"] in ("dot", "convolution")]
  if instr["opcode"] == "dot":
    dots = [instr]
    inner = next((c for c in module.computations.values() if instr in c), [])
  anchor = dots[0] if dots else next((i for i in [instr, *inner] if i["frame"]), instr)
  flops = sum(module.dot_flops(d, inner) for d in dots)
  stack = module.stack(anchor["frame"])
  direction = "bwd" if "transpose(" in anchor["op_name"] else "fwd"
  kind = "matmul" if dots else "other"
  if not stack:
    if instr["opcode"] in ("copy", "transpose") or "copy" in instr["name"]:
      return "copies/layout (compiler)", flops
    return f"unattributed {instr['opcode']}", flops
  files = [os.path.basename(f) for f, _, _ in stack]
  functions = [fn for _, fn, _ in stack]
  if any("/optax/" in f for f, _, _ in stack):
    return "optimizer (AdamW)", flops
  if "attention.py" in files:
    return f"attention {kind} {direction}", flops
  if "loss.py" in files:
    return f"cross-entropy {kind} {direction}", flops
  for path, function, line in stack:
    if function in _DENSE_FRAMES:
      continue
    if os.path.basename(path) == "model.py":
      if dots:
        called = re.search(r"self\.(\w+_proj)", _source_line(path, line))
        if called:
          return f"{called.group(1)} matmul {direction}", flops
      break
  inner_fn = next((fn for f, fn, _ in stack if os.path.basename(f) == "model.py"
                   and fn not in _DENSE_FRAMES), "")
  names = {"RMSNorm.__call__": "rmsnorm", "apply_rope": "rope", "rope_cos_sin": "rope",
           "MLP.__call__": "mlp silu*up", "Llama.embed": "embedding",
           "Block.__call__": "residual adds", "Llama.output_embedding": "output embedding"}
  if inner_fn in names:
    return f"{names[inner_fn]} {direction}", flops
  if inner_fn:
    return f"model {inner_fn} {kind} {direction}", flops
  if "step.py" in files:
    return "step glue (grad scale, skip guard)", flops
  return f"other {functions[0]}", flops


def profile(size: str, rows: int, length: int, chunk: int, steps: int, impl: str) -> dict:
  dump = tempfile.mkdtemp(prefix="im_jax_hlo_")
  trace_dir = tempfile.mkdtemp(prefix="im_jax_trace_")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
                             " --xla_dump_hlo_module_re=.*step.*")
  import bench_train  # pylint: disable=g-import-not-at-top  (sets thread counts, imports jax)
  import jax  # pylint: disable=g-import-not-at-top
  from im_jax import malloc_tuning  # pylint: disable=g-import-not-at-top
  from im_jax.models.llama import training_flops  # pylint: disable=g-import-not-at-top

  config = dataclasses.replace(bench_train.SIZES[size], attention_impl=impl)
  batch, lengths = bench_train.packed_batch(config, rows, length)
  runner = bench_train.JaxRunner(config, batch, chunk, 100)
  runner.step()  # compiles
  walls, kernel, faults = [], [], []
  for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    runner.step()
    walls.append(time.perf_counter() - t)
    after = resource.getrusage(resource.RUSAGE_SELF)
    kernel.append(after.ru_stime - before.ru_stime)
    faults.append(after.ru_minflt - before.ru_minflt)
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0  # Python frames would slow the traced step further
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True, profiler_options=options)
  t = time.perf_counter()
  runner.step()
  traced_wall = time.perf_counter() - t
  jax.profiler.stop_trace()

  hlo_path = max(glob.glob(os.path.join(dump, "*jit_step*cpu_after_optimizations.txt")),
                 key=os.path.getsize)
  with open(hlo_path, encoding="utf-8") as f:
    module = HloModule(f.read())
  trace_path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                         recursive=True)[0]
  with gzip.open(trace_path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  seconds, flops, count = collections.Counter(), collections.Counter(), collections.Counter()
  containers = ("while", "call", "conditional")
  for e in events:
    instr = module.by_name.get(e.get("name", ""))
    if e.get("ph") != "X" or instr is None or instr["opcode"] in containers:
      continue
    category, f = categorize(module, instr)
    seconds[category] += e.get("dur", 0) / 1e6
    flops[category] += f
    count[category] += 1
  total_flops = training_flops(config, lengths)
  return {"size": size, "batch": f"{rows}x{length}", "tokens": sum(lengths),
          "attention_impl": impl, "step_s_untraced_min": min(walls),
          "step_s_untraced": walls, "kernel_s_per_step": kernel, "page_faults_per_step": faults,
          "step_s_traced": traced_wall,
          "model_flops_per_step": total_flops, "ops_seconds_sum": sum(seconds.values()),
          "hlo": hlo_path, "load_avg_1m": os.getloadavg()[0], "malloc": malloc_tuning.status(),
          "categories": {c: {"seconds": s, "ops": count[c],
                             "gflop_per_s": flops[c] / s / 1e9 if flops[c] and s else None}
                         for c, s in seconds.most_common()}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="smollm2_135m")
  parser.add_argument("--rows", type=int, default=4)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--chunk", type=int, default=128)
  parser.add_argument("--impl", default="xla", help="attention_impl (xla, blocked, ...)")
  parser.add_argument("--steps", type=int, default=2, help="untraced timed steps first")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  result = profile(args.size, args.rows, args.length, args.chunk, args.steps, args.impl)
  if args.json:
    print(json.dumps(result, indent=1))
    return
  print(f"{result['size']} {result['batch']} attention {result['attention_impl']}: step "
        f"{result['step_s_untraced_min']:.2f} s (traced {result['step_s_traced']:.2f} s), "
        f"kernel time {min(result['kernel_s_per_step']):.2f} s and "
        f"{min(result['page_faults_per_step'])} page faults per step, ops sum "
        f"{result['ops_seconds_sum']:.2f} s, load {result['load_avg_1m']:.2f}, {result['malloc']}")
  print("| category | seconds | share | ops | matmul GFLOP/s |\n| --- | ---: | ---: | ---: | ---: |")
  total = result["ops_seconds_sum"]
  for c, v in result["categories"].items():
    rate = f"{v['gflop_per_s']:.0f}" if v["gflop_per_s"] else ""
    print(f"| {c} | {v['seconds']:.3f} | {100 * v['seconds'] / total:.1f}% | {v['ops']} | "
          f"{rate} |")


if __name__ == "__main__":
  from im_jax import malloc_tuning  # pylint: disable=g-import-not-at-top
  malloc_tuning.reexec_with_tuned_malloc()
  main()
