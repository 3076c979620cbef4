"""Host malloc tuning: when entry points re-execute, and that it cuts per-step page faults."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from im_jax import malloc_tuning

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A jit whose 64 MiB output is allocated on every call (above glibc's largest mmap
# threshold, so mapped afresh each time): page faults counted over 8 calls.
PROBE = """
import os, resource
from im_jax import malloc_tuning
malloc_tuning.reexec_with_tuned_malloc()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0)
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(20):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
  f(x).block_until_ready()
print(os.environ.get(malloc_tuning.ENV, "default"),
      resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_tuned_environ_only_for_cpu_on_glibc_and_never_twice():
  env, glibc = {"PATH": "/bin"}, ("glibc", "2.36")
  tuned = malloc_tuning.tuned_environ(env, "cpu", glibc)
  assert tuned["GLIBC_TUNABLES"] == ":".join(malloc_tuning.TUNABLES)
  assert tuned[malloc_tuning.ENV] == "tuned" and tuned["PATH"] == "/bin"
  assert tuned["JAX_PLATFORMS"] == "cpu"  # the child must not probe libtpu
  assert malloc_tuning.tuned_environ(tuned, "cpu", glibc) is None  # no loop
  assert malloc_tuning.tuned_environ(env, "tpu", glibc) is None
  assert malloc_tuning.tuned_environ(env, "cuda", glibc) is None
  assert malloc_tuning.tuned_environ(env, "cpu", ("", "")) is None  # musl, macOS
  assert malloc_tuning.tuned_environ(env, "cpu", ("glibc", "2.31")) is None  # no hugetlb yet
  assert malloc_tuning.tuned_environ({malloc_tuning.ENV: "system"}, "cpu", glibc) is None
  # The caller's own malloc tunables win; other tunables are kept.
  assert malloc_tuning.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, "cpu",
                                   glibc) is None
  kept = malloc_tuning.tuned_environ({"GLIBC_TUNABLES": "glibc.rtld.nns=4"}, "cpu", glibc)
  assert kept["GLIBC_TUNABLES"].startswith("glibc.rtld.nns=4:glibc.malloc.")


def _huge_pages_available() -> bool:
  try:
    mode = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
  except OSError:
    return False
  return "[never]" not in mode and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _huge_pages_available(), reason="needs glibc and transparent huge pages")
def test_reexecuted_process_faults_huge_pages_instead_of_small_ones():
  def run(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in (malloc_tuning.ENV, "GLIBC_TUNABLES")}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=120, check=True)
    state, faults = proc.stdout.split()
    return state, int(faults)

  tuned_state, tuned_faults = run()
  system_state, system_faults = run(**{malloc_tuning.ENV: "system"})
  assert (tuned_state, system_state) == ("tuned", "system")
  # 8 x 64 MiB of fresh pages is 131072 faults of 4 KiB, 256 of 2 MiB.
  assert system_faults > 50_000, system_faults
  assert tuned_faults < system_faults / 20, (tuned_faults, system_faults)
