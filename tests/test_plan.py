"""Real FSDP and launch plans: the train step compiled for the 8-device CPU mesh and for virtual
TPUs (libtpu, compile only), checked in the compiled per-device shapes and memory."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from im_jax.configs import base
from im_jax.run import experiment, settings
from im_jax.plan import analysis
from im_jax.plan import topology as topo_lib
from im_jax.train import sharding

pytestmark = [pytest.mark.slow]  # compiles for virtual TPU topologies

GiB = 2**30
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(preset="tiny", rows=16, seq_len=40, mesh=(1, -1, 1), remat="none", dtype="float32"):
  c = base.get_config()
  c.model.preset = preset
  c.model.remat_policy = remat
  c.model.compute_dtype = dtype
  c.train.batch_size = rows
  c.data.max_seq_len = seq_len
  c.loss.chunk_size = 512
  c.eval.batch_size = rows
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def _compile(c, devices):
  run = settings.load(c)
  mesh = sharding.make_mesh(run.mesh, devices)
  steps = experiment.build_steps(run, analysis.model_config(run), mesh, updates=10)
  batch = experiment.train_batch_shapes(run, mesh)
  with jax.set_mesh(mesh):
    return steps.train_step.jitted.lower(steps.abstract_state, batch).compile()


def _row_shapes(hlo: str, rows: int, seq_len: int) -> set[str]:
  """Array shapes in the HLO whose dimensions hold `rows` then `seq_len`: [.., rows, T, ..]."""
  return set(re.findall(r"\w+\[(?:\d+,)*%d,%d(?:,\d+)*\]" % (rows, seq_len), hlo))


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)])
def test_activations_split_by_rows_on_cpu_mesh(mesh):
  rows, seq_len = 24, 40
  per_device = rows // (mesh[0] * mesh[1])
  hlo = _compile(_config(rows=rows, seq_len=seq_len, mesh=mesh), jax.devices()[:8]).as_text()
  assert not _row_shapes(hlo, rows, seq_len), "an activation holds every row"
  # The residual stream (hidden 64) is there, with this device's rows only.
  assert _row_shapes(hlo, per_device, seq_len) & {f"f32[{per_device},{seq_len},64]"}


def test_tiny_step_compiles_for_v5e_with_rows_split_and_splash():
  """The tiny preset's full train step on a (1, 2, 2) mesh of virtual v5e chips: rows split,
  and `attention_impl=auto` picks the splash kernel on TPUs (a Pallas custom call)."""
  devices = topo_lib.devices(topo_lib.parse("v5e:2x2"))
  rows, seq_len = 12, 384  # not 8: splash lays segment ids out over 8 sublanes
  c = _config(rows=rows, seq_len=seq_len, mesh=(1, 2, 2), dtype="bfloat16")
  assert c.model.attention_impl == "auto"
  hlo = _compile(c, devices).as_text()
  assert not _row_shapes(hlo, rows, seq_len)
  assert f"bf16[6,{seq_len},64]" in _row_shapes(hlo, 6, seq_len)
  assert "tpu_custom_call" in hlo


def test_smollm2_temporaries_scale_with_rows_per_chip():
  """SmolLM2-135M, 2048 tokens, remat full on v5e:2x2: 1 row per chip in at most 2 GiB of
  temporaries, 4 rows per chip in at most 4.5x that (before FSDP was real: 3.88 and 52.7 GB)."""
  topology = topo_lib.parse("v5e:2x2")
  temps = {}
  for rows in (4, 16):
    c = _config("smollm2_135m", rows=rows, seq_len=2048, remat="full", dtype="bfloat16")
    p = analysis.plan(settings.load(c), topology)
    assert p.fits, p.verdict()
    temps[rows] = p.memory["temporaries"]
  assert temps[4] <= 2 * GiB, temps
  assert temps[16] <= 4.5 * temps[4], temps


@pytest.mark.parametrize("name,expected", [
    ("v5e:8x8", ("v5e", (8, 8))), ("v5litepod-64", ("v5e", (8, 8))),
    ("v5litepod-4", ("v5e", (2, 2))), ("v5litepod-8", ("v5e", (2, 4))),
    ("v4-8", ("v4", (2, 2, 1))), ("v4-32", ("v4", (2, 2, 4))), ("v4-128", ("v4", (4, 4, 4))),
    ("v5p-16", ("v5p", (2, 2, 2))), ("v6e-16", ("v6e", (4, 4))), ("cpu:8", (None, (8,))),
])
def test_topology_names(name, expected):
  t = topo_lib.parse(name)
  assert ((t.chip.kind if t.chip else None), t.shape) == expected


@pytest.mark.parametrize("name", ["v5e:3", "v9:2x2", "v4-12", "v5litepod-6", "tpu", "cpu:0"])
def test_bad_topology_names_are_one_line(name):
  with pytest.raises(topo_lib.TopologyError) as e:
    topo_lib.parse(name)
  assert "\n" not in str(e.value) and name in str(e.value)


def test_usable_hbm_is_the_compilers():
  """The chip table's usable HBM is what the TPU compiler says when a program does not fit."""
  for chip in topo_lib.CHIPS.values():
    shape = "x".join(["2"] * chip.dims) if chip.dims == 2 else "2x2x1"
    device = topo_lib.devices(topo_lib.parse(f"{chip.kind}:{shape}"))[0]
    mesh = jax.sharding.Mesh([device], ("x",))
    huge = jax.ShapeDtypeStruct((64 * GiB,), jax.numpy.float32,
                                sharding=jax.sharding.NamedSharding(mesh, jax.P()))
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as e:
      jax.jit(lambda x: (x * 2, x * 3)).lower(huge).compile()
    available = re.search(r"exceeds available HBM \(([0-9.]+)G\)", str(e.value))
    assert float(available.group(1)) == chip.usable_hbm_gib, (chip.kind, str(e.value)[:300])


def test_llama2_7b_paper_recipe_plan_on_v5e_64():
  """The README's worked example, through the CLI: the paper's Llama-2-7B recipe on 64 v5e
  chips fits with full remat, and parameters + AdamW moments per chip equal the analytic
  12 bytes x 6,738,415,616 / 64."""
  out = subprocess.run(
      [sys.executable, "-m", "im_jax.plan", "--config", "configs/paper.py:lima,im,llama2_7b",
       "--topology", "v5litepod-64", "--config.train.grad_accum=2",
       "--config.eval.batch_size=64", "--json"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=True)
  plan = json.loads(out.stdout)
  assert plan["devices"] == 64 and plan["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
  assert plan["parameters"] == 6_738_415_616 and plan["remat_policy"] == "full"
  assert plan["fits"] is True, plan["verdict"]
  state = plan["memory"]["params"] + plan["memory"]["optimizer"]
  assert state == pytest.approx(12 * 6_738_415_616 / 64, rel=0.05)
  assert plan["compiler_flops_per_device"] > 0


def _tpu_vm(tmp_path, *args, **env):
  """scripts/tpu_vm.sh with a stand-in gcloud that records its calls."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  calls = tmp_path / "gcloud_calls"
  (bin_dir / "gcloud").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
  (bin_dir / "gcloud").chmod(0o755)
  full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
              "CONFIG": "configs/demo.py", "ACCELERATOR": "v5litepod-4", **env}
  out = subprocess.run(["bash", "scripts/tpu_vm.sh", *args], cwd=REPO_ROOT, env=full_env,
                       capture_output=True, text=True, timeout=600)
  return out, (calls.read_text() if calls.exists() else "")


def test_tpu_vm_create_runs_the_plan_and_stops_when_it_does_not_fit(tmp_path):
  out, calls = _tpu_vm(tmp_path, "create", "--", "--config.train.batch_size=1024",
                       "--config.data.max_seq_len=8192")
  assert out.returncode == 2, out.stderr
  assert "DOES NOT FIT" in out.stdout and "does not fit v5litepod-4" in out.stderr
  assert calls == ""  # no slice was created
  out, calls = _tpu_vm(tmp_path, "create")
  assert out.returncode == 0, out.stderr
  assert "verdict: fits" in out.stdout and "create im-jax --accelerator-type=v5litepod-4" in calls


def test_cpu_runs_do_not_probe_libtpu_noisily(tmp_path):
  """libtpu is installed for the plan; without JAX_PLATFORMS, JAX's backend probe would load it
  on a machine without TPU chips, and libtpu and JAX would print start-up errors."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE")}
  out = subprocess.run([sys.executable, "-c", "import im_jax, jax; print(jax.devices())"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "CpuDevice" in out.stdout
  assert out.stderr == "", out.stderr
  # An entry point, whose absl logging would show JAX's INFO line about the TPU backend.
  out = subprocess.run([sys.executable, "-m", "im_jax.train", "--config", "configs/demo.py",
                        "--workdir", str(tmp_path / "w"), "--print-config"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "tpu" not in out.stderr.lower(), out.stderr


def test_tpu_chips_are_found_on_the_pci_bus_or_as_device_files(tmp_path):
  """What decides whether `import im_jax` quiets libtpu (no chip) or leaves the host alone."""
  import im_jax  # pylint: disable=import-outside-toplevel

  sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
  (dev_root / "vfio").mkdir(parents=True)
  (dev_root / "vfio" / "vfio").touch()  # the VFIO control node alone: no device group

  def pci(slot, vendor, device):
    (sys_root / "bus/pci/devices" / slot).mkdir(parents=True)
    (sys_root / "bus/pci/devices" / slot / "vendor").write_text(vendor + "\n")
    (sys_root / "bus/pci/devices" / slot / "device").write_text(device + "\n")

  def found():  # pylint: disable=protected-access
    return im_jax._may_have_tpu_chips(str(sys_root), str(dev_root))

  pci("0000:00:04.0", "0x1ae0", "0x0042")  # Google's virtual NIC on a CPU VM: not a chip
  pci("0000:00:05.0", "0x10de", "0x2330")  # another vendor's accelerator
  assert not found()
  (dev_root / "vfio" / "0").touch()  # a device group: chips of a generation not listed yet
  assert found()
  (dev_root / "vfio" / "0").unlink()
  (dev_root / "accel0").touch()
  assert found()
  (dev_root / "accel0").unlink()
  pci("0000:00:06.0", "0x1ae0", "0x0063")  # a v5e chip
  assert found()


def test_plan_on_cpu_devices():
  """`cpu:N`: the same plan over N host devices; no HBM limit to judge against."""
  p = analysis.plan(settings.load(_config(rows=16, seq_len=64)), topo_lib.parse("cpu:8"))
  assert p.devices == 8 and p.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
  assert p.attention_impl == "xla" and p.fits is None and p.usable_hbm is None
  assert 0 < p.memory["params"] < p.memory["total"]
  # AdamW: two float32 moments per parameter, plus its step counters.
  assert 0 <= p.memory["optimizer"] - 2 * p.memory["params"] < 1024
  assert "no device memory limit" in p.verdict()
