"""Host memory on the CPU backend: back each step's large buffers with huge pages.

XLA's CPU runtime allocates a step's temporaries afresh on every call and frees them at its
end (7.3 GiB for SmolLM2-135M at 4 x 512 tokens, float32, layers unrolled). glibc serves
blocks that large with mmap and returns them with munmap, so every step faults in GBs of new
4 KiB pages: 2.3 million page faults and 5-6 s of kernel time in a 12 s step on a 2-core
machine, a cost set by the kernel and hypervisor rather than the program (one reason the same
step ran 1.85x slower on another machine of the same kind). glibc's `hugetlb=1` tunable
makes malloc advise transparent huge pages for what it maps: 512x fewer faults, a 7.3 s
step, the same peak memory (docs/benchmarks.md). Keeping freed memory instead (one arena, no
mmap, no trimming) was as fast but fragmented the heap: 17 GiB peak instead of 10.

Tunables are read when a process starts, so the entry points re-execute themselves once with
it set (`reexec_with_tuned_malloc`), before any work. Only for the CPU backend on glibc >=
2.35 Linux; never when the caller chose malloc tunables already or set IM_JAX_MALLOC=system.
It needs transparent huge pages in `madvise` or `always` mode (/sys/kernel/mm/
transparent_hugepage/enabled); with `never` it changes nothing.
"""

import os
import platform
import sys

ENV = "IM_JAX_MALLOC"  # "system": leave malloc alone; "tuned": set by the re-execution
TUNABLES = ("glibc.malloc.hugetlb=1",)
MIN_GLIBC = (2, 35)  # the first with glibc.malloc.hugetlb


def tuned_environ(environ: dict[str, str], backend: str,
                  libc: tuple[str, str]) -> dict[str, str] | None:
  """The environment to re-execute with, or None when this process should run as it is.

  `libc`: `platform.libc_ver()`, e.g. ("glibc", "2.36").
  """
  name, version = libc
  try:
    new_enough = tuple(int(x) for x in version.split(".")[:2]) >= MIN_GLIBC
  except ValueError:
    new_enough = False
  if environ.get(ENV) in ("system", "tuned") or backend != "cpu" or name != "glibc":
    return None
  if not new_enough:
    return None
  existing = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc." in existing:  # the caller's own malloc settings win
    return None
  tunables = ":".join([t for t in [existing] if t] + list(TUNABLES))
  # im_jax's import told libtpu this host has no chip (TPU_WORKER_HOSTNAMES, ...) and chose the
  # CPU backend in-process; the new process sees those variables and would skip that choice,
  # so name the backend outright.
  platforms = {"JAX_PLATFORMS": environ.get("JAX_PLATFORMS") or "cpu"}
  return {**environ, "GLIBC_TUNABLES": tunables, ENV: "tuned", **platforms}


def _backend() -> str:
  """The platform JAX will use, without starting a backend (im_jax's import has already
  chosen cpu on machines with no accelerator)."""
  import jax  # pylint: disable=g-import-not-at-top

  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  return platforms.split(",")[0].strip().lower()


def reexec_with_tuned_malloc() -> None:
  """Replaces this process by itself with glibc's tunables set, when `tuned_environ` says so.

  Call it first thing under `if __name__ == "__main__":` of an entry point, never from code
  a test imports and calls (it would replace the test runner).
  """
  environ = tuned_environ(dict(os.environ), _backend(), platform.libc_ver())
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), environ)


def status() -> str:
  """One line for logs and benchmark reports."""
  state = os.environ.get(ENV, "default")
  return f"malloc {state}" + (f" ({os.environ['GLIBC_TUNABLES']})" if state == "tuned" else "")
