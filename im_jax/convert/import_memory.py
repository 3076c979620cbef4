"""Peak host memory of a HF import, measured in a fresh process.

`python -m im_jax.convert.import_memory HF_DIR` prints JSON: the peak resident set size (VmHWM)
after importing jax/flax/im_jax and starting the CPU backend (`baseline_bytes`), the peak after
`load_hf` (`peak_bytes`), their difference (`growth_bytes`) and the parameter bytes
(`model_bytes`). On the CPU backend the placed parameters themselves live in host memory, so
`growth / model` is the import's whole footprint: 1.0 would be the model alone.

Honest measurement: peak RSS counts file pages mapped by safetensors (`safe_open` mmaps the
file); they are counted because they are memory the process really touched. The baseline is
taken after the backend is up, so imports and XLA's own start-up are not charged to import.
"""

import json
import os
import sys


def _vm_hwm() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def measure(hf_dir: str) -> dict[str, float]:
  """Runs in this process: call it from a fresh interpreter (see `main`)."""
  import jax
  import numpy as np

  from im_jax.models.llama import LlamaConfig
  from im_jax.models.llama import params as hf_params

  config = LlamaConfig.from_hf(hf_dir, scan_layers=True)
  jax.block_until_ready(jax.device_put(np.zeros(4)))  # start the backend before the baseline
  baseline = _vm_hwm()
  model = hf_params.load_hf(hf_dir, config)
  from flax import nnx
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  jax.block_until_ready(leaves)
  peak = _vm_hwm()
  model_bytes = sum(x.nbytes for x in leaves)
  return {"baseline_bytes": baseline, "peak_bytes": peak, "growth_bytes": peak - baseline,
          "model_bytes": model_bytes, "ratio": (peak - baseline) / model_bytes}


def main(argv: list[str]) -> int:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  print(json.dumps(measure(argv[1])))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
