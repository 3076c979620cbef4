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


def _quiet_libtpu_without_chips() -> None:
  """libtpu is installed for compiling to virtual TPUs (`python -m im_jax.plan`). On a machine
  with no TPU chip, JAX's backend probe still loads it: libtpu prints start-up errors about
  worker hostnames and the accelerator type, and JAX logs that the TPU backend failed. Tell
  libtpu this is one local host, and where no other accelerator plugin is installed either,
  use the CPU backend without probing. Real TPU VMs (chips present), explicit TPU settings,
  GPU installs and an explicit JAX_PLATFORMS are left alone."""
  if "TPU_WORKER_HOSTNAMES" in os.environ:
    return
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except Exception:  # noqa: BLE001 - a private helper; when it moves, assume chips
    return
  if chips:
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
