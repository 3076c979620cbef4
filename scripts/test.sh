#!/usr/bin/env bash
# The README's test command. Sharding tests need 8 simulated CPU devices; tests/conftest.py
# sets XLA_FLAGS before jax is imported. Arguments go to pytest; when the first names a test
# file or folder (tests/test_plan.py, tests/test_plan.py::test_x) only those run.
# `--fast` (first) leaves out the tests marked slow (pyproject.toml: training subprocesses,
# killed runs, TPU compiles, the study): the edit-test loop. CI runs everything.
# IM_JAX_TEST_WORKERS=N runs the whole suite (or tier) in N pytest-xdist workers (at most the
# CPU count), a test file to each, so a module's fixtures are built once: 848-952 s instead of
# 1,126-1,535 s on 2 cores (docs/benchmarks.md). Default 0, one process, as CI runs: one of
# four two-worker runs lost a worker and hung. Named files always run in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [[ "${1:-}" == "--fast" ]]; then
  shift
  select=(-m "not slow")
  # The edit-test loop keeps its compiled graphs between runs: JAX's persistent compilation
  # cache, keyed on the graph, the compile options and jax's version, so an edit recompiles
  # only the graphs it changed (and a graph compiled twice in one run compiles once).
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.pytest_cache/d/jax_cache}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
fi
targets=(tests)
workers="${IM_JAX_TEST_WORKERS:-0}"
if [[ $# -gt 0 && -e "${1%%::*}" ]]; then
  targets=()
  workers=0
fi
cpus="$(nproc)"
(( workers > cpus )) && workers="$cpus"
parallel=()
(( workers > 1 )) && parallel=(-n "$workers" --dist loadfile)
exec python -m pytest "${targets[@]}" -q --durations=20 --timeout=900 "${parallel[@]}" \
  "${select[@]}" "$@"
