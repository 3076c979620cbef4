"""Compile a run's exact train step for a topology and measure it: memory, FLOPs, verdict.

The step comes from `experiment.build_steps` (what the trainer runs) with the state and batch
as abstract arrays in their shardings, so nothing is allocated and no weights are read.
"""

import dataclasses
import re
from typing import Any

import jax

from im_jax.run import experiment, settings
from im_jax.convert.load import read_model_config
from im_jax.model_files import ModelFileError
from im_jax.models.llama import LlamaConfig, num_params, training_flops
from im_jax.plan import topology as topo_lib
from im_jax.train import device_memory
from im_jax.train import sharding

GiB = 2**30
MFU_POINTS = (0.4, 0.6)
# The compiler refuses a program that does not fit, naming what it needed.
_OOM = re.compile(r"memory required for HLO temporaries \(([0-9.]+)([KMGT])\) exceeds available "
                  r"HBM \(([0-9.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass
class Plan:
  topology: str
  device_kind: str
  devices: int
  mesh: dict[str, int]
  remat_policy: str
  attention_impl: str
  model: str
  parameters: int
  rows_per_step: int  # train.batch_size: global rows of max_seq_len per optimizer step
  seq_len: int
  grad_accum: int
  tokens_per_step: int
  memory: dict[str, int] | None  # StepMemory.as_dict() per device; None when out of memory
  usable_hbm: int | None  # bytes per device; None for cpu:N
  # XLA's count: a loop body (scanned layers, micro-batches) counts once; no Pallas kernels.
  compiler_flops_per_device: float | None
  analytic_flops_per_step: float
  peak_flops_per_device: float | None
  out_of_memory: str | None = None  # the compiler's refusal, when it does not fit
  kl_reference: bool = False  # loss.kl_to_base > 0: a frozen reference model in the step

  @property
  def needed(self) -> int | None:
    """Bytes per device: the total when compiled; when refused, the temporaries it named."""
    if self.memory is not None:
      return self.memory["total"]
    m = _OOM.search(self.out_of_memory or "")
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None

  @property
  def fits(self) -> bool | None:
    if self.out_of_memory is not None:
      return False
    return None if self.usable_hbm is None else self.memory["total"] <= self.usable_hbm

  def step_seconds(self, mfu: float) -> float | None:
    if not self.peak_flops_per_device:
      return None
    return self.analytic_flops_per_step / (self.devices * self.peak_flops_per_device * mfu)

  def tokens_per_second_per_chip(self, mfu: float) -> float | None:
    t = self.step_seconds(mfu)
    return None if t is None else self.tokens_per_step / t / self.devices

  def verdict(self) -> str:
    if self.fits is None:
      return "no device memory limit known for this topology"
    need, have = self.needed, self.usable_hbm
    if self.out_of_memory is not None:
      temps = f"its temporaries alone need {need / GiB:.2f} GiB" if need else "it needs more"
      return f"DOES NOT FIT: {temps} per device, {have / GiB:.2f} GiB usable"
    if not self.fits:
      return f"DOES NOT FIT: needs {need / GiB:.2f} GiB per device, {have / GiB:.2f} GiB usable"
    return (f"fits: {need / GiB:.2f} of {have / GiB:.2f} GiB usable per device "
            f"(margin {(have - need) / GiB:.2f} GiB, {(have - need) / have:.0%})")

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(fits=self.fits, needed=self.needed, verdict=self.verdict(), mfu={
        str(m): {"step_seconds": self.step_seconds(m),
                 "tokens_per_second_per_chip": self.tokens_per_second_per_chip(m)}
        for m in MFU_POINTS})
    return d


def model_config(c: settings.RunConfig) -> LlamaConfig:
  """The run's model config, from `model.init_from`'s config (no weights) or the preset."""
  pretrained = None
  if c.model.init_from:
    try:
      pretrained = read_model_config(c.model.init_from, **settings.model_options(c))
    except ModelFileError as e:  # a damaged file: the line names it
      raise experiment.ConfigError(str(e)) from None
    except (OSError, ValueError, KeyError) as e:
      raise experiment.ConfigError(f"model.init_from={c.model.init_from}: {e}") from None
  return experiment.model_config(c, 0, pretrained)


def plan(c: settings.RunConfig, topology: topo_lib.Topology) -> Plan:
  """Compiles the train step of config `c` (`settings.load`) for `topology` and measures it."""
  devices = topo_lib.devices(topology)
  settings.check_mesh(c, len(devices), 1)  # the topology's devices, not this machine's
  mesh = sharding.make_mesh(c.mesh, devices)
  mcfg = model_config(c)
  steps = experiment.build_steps(c, mcfg, mesh, updates=1000)
  batch = experiment.train_batch_shapes(c, mesh)
  chip = topology.chip
  tokens = c.train.batch_size * c.data.max_seq_len
  result = Plan(
      topology=topology.name, device_kind=devices[0].device_kind, devices=len(devices),
      mesh=dict(zip(sharding.MESH_AXES, mesh.devices.shape)),
      remat_policy=mcfg.remat_policy,
      attention_impl=("splash" if mcfg.attention_impl == "auto" and chip else
                      "xla" if mcfg.attention_impl == "auto" else mcfg.attention_impl),
      model=c.model.init_from or c.model.preset, parameters=num_params(mcfg),
      rows_per_step=c.train.batch_size, seq_len=c.data.max_seq_len,
      grad_accum=c.train.grad_accum, tokens_per_step=tokens, memory=None,
      usable_hbm=int(chip.usable_hbm_gib * GiB) if chip else None,
      compiler_flops_per_device=None,
      analytic_flops_per_step=training_flops(mcfg, [c.data.max_seq_len] * c.train.batch_size,
                                             reference=c.loss.kl_to_base > 0),
      kl_reference=c.loss.kl_to_base > 0,
      peak_flops_per_device=chip.peak_bf16_tflops * 1e12 if chip else None)
  try:
    with jax.set_mesh(mesh):
      compiled = steps.train_step.jitted.lower(steps.abstract_state, batch).compile()
  except Exception as e:  # noqa: BLE001 - the TPU compiler's out-of-memory refusal
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    result.out_of_memory = " ".join(str(e).split())[:500]
    return result
  result.memory = device_memory.step_memory(compiled, steps.abstract_state, batch).as_dict()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if cost and cost.get("flops"):
    result.compiler_flops_per_device = float(cost["flops"])
  return result
