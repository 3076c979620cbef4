"""TPU chip kinds and topology names -> compile-only devices (nothing runs on them).

`devices("v5e:8x8")`, `devices("v5litepod-64")`, `devices("v4-32")` or `devices("cpu:8")`.
Cloud accelerator types count chips for v5e/v6e (`v5litepod-64`, `v6e-16`) and TensorCores
for v4/v5p (`v4-32` is 16 chips): both are turned into JAX's `KIND:AxBxC` topology names, and
libtpu (installed by scripts/setup.sh) gives compile-only devices for them.
"""

import dataclasses
import math
import re
from typing import Sequence

import jax

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip kind. `usable_hbm_gib`: the HBM the TPU compiler lets one program use (its
  out-of-memory message, libtpu 0.0.42.1; tests/test_plan.py checks it against the compiler);
  `peak_bf16_tflops`: dense bf16 peak per chip from the Cloud TPU system-architecture pages."""

  kind: str  # as in topology names: v5e:2x2
  device_kind: str  # jax Device.device_kind
  usable_hbm_gib: float
  peak_bf16_tflops: float
  dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus
  cores_per_chip_in_type: int  # accelerator types count TensorCores (2) or chips (1)
  type_prefix: str  # Cloud accelerator type: v5litepod-64, v4-32
  source: str


CHIPS = {c.kind: c for c in (
    Chip("v4", "TPU v4", 30.75, 275.0, 3, 2, "v4",
         "cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 275 TFLOP/s bf16"),
    Chip("v5e", "TPU v5 lite", 15.75, 197.0, 2, 1, "v5litepod",
         "cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 197 TFLOP/s bf16"),
    Chip("v5p", "TPU v5", 95.74, 459.0, 3, 2, "v5p",
         "cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 459 TFLOP/s bf16"),
    Chip("v6e", "TPU v6 lite", 31.25, 918.0, 2, 1, "v6e",
         "cloud.google.com/tpu/docs/v6e: 32 GiB HBM, 918 TFLOP/s bf16"),
)}
_TYPE_PREFIXES = {c.type_prefix: c for c in CHIPS.values()}


class TopologyError(ValueError):
  """A topology this module cannot name or build; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given
  chip: Chip | None  # None for cpu:N
  shape: tuple[int, ...]  # chips per torus dimension; (N,) for cpu:N

  @property
  def num_devices(self) -> int:
    return math.prod(self.shape)

  @property
  def jax_name(self) -> str:
    return f"{self.chip.kind}:{'x'.join(map(str, self.shape))}" if self.chip else self.name


def _torus(chips: int, dims: int, name: str) -> tuple[int, ...]:
  """The standard slice shape for a chip count: double the smallest side (last on ties),
  from 2x2x1 (3-D) or 1x1 (2-D): v4-32 -> 2x2x4, v5litepod-64 -> 8x8."""
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f"{name}: {chips} chips is not a power of two")
  shape = [1] * dims
  if dims == 3 and chips >= 4:
    shape = [2, 2, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  if math.prod(shape) != chips:
    raise TopologyError(f"{name}: no standard slice holds {chips} chips")
  return tuple(shape)


def parse(name: str) -> Topology:
  """`v5e:8x8`, `v4:2x2x4`, `v5litepod-64`, `v4-32`, `v5p-16`, `v6e-16` or `cpu:N`."""
  text = name.strip()
  m = re.fullmatch(r"cpu:(\d+)", text)
  if m:
    n = int(m.group(1))
    if n < 1:
      raise TopologyError(f"{name}: cpu:N needs N >= 1")
    return Topology(text, None, (n,))
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
  if m:
    chip = CHIPS.get(m.group(1))
    if chip is None:
      raise TopologyError(f"{name}: unknown chip kind {m.group(1)!r}; known: "
                          f"{', '.join(CHIPS)}")
    shape = tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
      raise TopologyError(f"{name}: {chip.kind} topologies have {chip.dims} dimensions, "
                          f"e.g. {chip.kind}:{'x'.join(['2'] * chip.dims)}")
    return Topology(text, chip, shape)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if m and m.group(1) in _TYPE_PREFIXES:
    chip = _TYPE_PREFIXES[m.group(1)]
    count = int(m.group(2))
    if count % chip.cores_per_chip_in_type:
      raise TopologyError(f"{name}: {chip.type_prefix} types count TensorCores "
                          f"({chip.cores_per_chip_in_type} per chip)")
    return Topology(text, chip, _torus(count // chip.cores_per_chip_in_type, chip.dims, name))
  raise TopologyError(f"{name}: not a topology; use KIND:AxB[xC] ({', '.join(CHIPS)}), a Cloud "
                      "accelerator type (v5litepod-64, v4-32, v5p-16, v6e-16) or cpu:N")


def devices(topology: Topology) -> Sequence[jax.Device]:
  """Compile-only TPU devices for the topology, or the first N CPU devices for cpu:N."""
  if topology.chip is None:
    cpus = jax.devices("cpu")
    if len(cpus) < topology.num_devices:
      raise TopologyError(f"{topology.name}: only {len(cpus)} CPU devices; set "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count="
                          f"{topology.num_devices} before JAX starts")
    return cpus[:topology.num_devices]
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    # v4/v5p: one device per chip (megacore), as JAX runs them on real slices.
    kw = {"chip_config_name": "megacore"} if topology.chip.kind == "v4" else {}
    found = topologies.get_topology_desc(topology.jax_name, platform="tpu", **kw).devices
  except Exception as e:  # noqa: BLE001 - libtpu missing, or a platform without a wheel
    raise TopologyError(f"{topology.name}: cannot compile for TPUs here ({_first_line(e)}); "
                        "libtpu comes with `pip install jax[tpu]` (Linux x86_64 only)") from None
  if len(found) != topology.num_devices:
    raise TopologyError(f"{topology.name}: libtpu gave {len(found)} devices, expected "
                        f"{topology.num_devices}")
  return found


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
