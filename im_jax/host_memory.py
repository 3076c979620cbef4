"""Host memory on the CPU backend: let each step reuse the last step's memory.

XLA's CPU runtime allocates a step's temporaries afresh on every call and frees them at its
end (GBs for a 135M model). glibc serves blocks that large with mmap and returns them with
munmap, so every step touches GBs of never-used pages: on a SmolLM2-135M step (4 x 512
tokens, float32) 2.3 million page faults and 5-6 s of kernel time per 12 s step on a 2-core
machine, a cost set by the kernel and hypervisor, not by the program (one reason the same
step ran 1.85x slower on another machine of the same kind). glibc's tunables fix it: one
arena, no mmap for large blocks and no trimming keep freed memory in the process, so from the
second step on there are no page faults (docs/benchmarks.md has the figures).

Tunables are read when a process starts, so the entry points re-execute themselves once with
them set (`reexec_with_tuned_malloc`), before any work. Only for the CPU backend on glibc
Linux; never when the caller chose malloc tunables already or set IM_JAX_MALLOC=system. The
price: memory a step freed stays with the process (its resident size stays at its peak).
"""

import os
import platform
import sys

ENV = "IM_JAX_MALLOC"  # "system": leave malloc alone; "tuned": set by the re-execution
TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
            "glibc.malloc.trim_threshold=68719476736")


def tuned_environ(environ: dict[str, str], backend: str, libc: str) -> dict[str, str] | None:
  """The environment to re-execute with, or None when this process should run as it is."""
  if environ.get(ENV) in ("system", "tuned") or backend != "cpu" or libc != "glibc":
    return None
  existing = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc." in existing:  # the caller's own malloc settings win
    return None
  tunables = ":".join([t for t in [existing] if t] + list(TUNABLES))
  return {**environ, "GLIBC_TUNABLES": tunables, ENV: "tuned"}


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
  environ = tuned_environ(dict(os.environ), _backend(), platform.libc_ver()[0])
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), environ)


def status() -> str:
  """One line for logs and benchmark reports."""
  state = os.environ.get(ENV, "default")
  return f"malloc {state}" + (f" ({os.environ['GLIBC_TUNABLES']})" if state == "tuned" else "")
