"""im_jax: Instruction Modelling (loss over instructions) fine-tuning in JAX/Flax."""

import os

__version__ = "0.1.0"


def _quiet_libtpu_without_chips() -> None:
  """libtpu is installed for compiling to virtual TPUs (`python -m im_jax.plan`). On a machine
  with no TPU chip, JAX's backend probe still loads it and libtpu prints start-up errors about
  worker hostnames and the accelerator type. Tell it this is one local host; real TPU VMs
  (chips present) and explicit settings are left alone."""
  if "TPU_WORKER_HOSTNAMES" in os.environ or os.environ.get("JAX_PLATFORMS", "") == "tpu":
    return
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except Exception:  # noqa: BLE001 - a private helper; when it moves, assume chips
    return
  if chips == 0:
    os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    # With no chip to guard, libtpu's one-process lock would only stop two plans (or a test
    # and the plan it starts) from compiling at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


_quiet_libtpu_without_chips()
