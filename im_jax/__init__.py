"""im_jax: Instruction Modelling (loss over instructions) fine-tuning in JAX/Flax."""

import os

__version__ = "0.1.0"


def _has_accelerator_plugin() -> bool:
  """Whether a PJRT plugin (CUDA, ROCm, ...) is installed, as JAX discovers them."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import pkgutil  # pylint: disable=g-import-not-at-top
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


# Google's PCI vendor id and its TPU chips' device ids (v3, v4, v5p, v5e, v6e, 7x, and one
# unnamed), as JAX's own probe lists them; JAX keeps that probe private, so it is read here.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f",
                              "0x0076"})


def _may_have_tpu_chips(sys_root: str = "/sys", dev_root: str = "/dev") -> bool:
  """Whether this host may have TPU chips: a known TPU on its PCI bus, or the device files
  chips appear as (/dev/accel*, numbered /dev/vfio groups): the latter so that a TPU
  generation newer than the id list still counts as chips, and the machine is left alone."""
  import glob  # pylint: disable=g-import-not-at-top
  for vendor in glob.glob(os.path.join(sys_root, "bus/pci/devices/*/vendor")):
    try:
      with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
        if f.read().strip() == _GOOGLE_PCI_VENDOR and g.read().strip() in _TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
  if glob.glob(os.path.join(dev_root, "accel*")):
    return True
  vfio = os.path.join(dev_root, "vfio")
  return os.path.isdir(vfio) and any(name.isdigit() for name in os.listdir(vfio))


def _quiet_libtpu_without_chips() -> None:
  """libtpu is installed for compiling to virtual TPUs (`python -m im_jax.plan`). On a machine
  with no TPU chip, JAX's backend probe still loads it: libtpu prints start-up errors about
  worker hostnames and the accelerator type, and JAX logs that the TPU backend failed. Tell
  libtpu this is one local host, and where no other accelerator plugin is installed either,
  use the CPU backend without probing. Real TPU VMs (chips present), explicit TPU settings,
  GPU installs and an explicit JAX_PLATFORMS are left alone."""
  if "TPU_WORKER_HOSTNAMES" in os.environ:
    return
  if _may_have_tpu_chips():
    return
  os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  # With no chip to guard, libtpu's one-process lock would only stop two plans (or a test
  # and the plan it starts) from compiling at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not os.environ.get("JAX_PLATFORMS") and not _has_accelerator_plugin():
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")


_quiet_libtpu_without_chips()
