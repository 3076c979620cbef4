#!/usr/bin/env bash
# The README's test command. Sharding tests need 8 simulated CPU devices; tests/conftest.py
# sets XLA_FLAGS before jax is imported. Arguments go to pytest; when the first names a test
# file or folder (tests/test_plan.py, tests/test_plan.py::test_x) only those run.
# `--fast` (first) leaves out the tests marked slow (pyproject.toml: training subprocesses,
# killed runs, TPU compiles, the study): the edit-test loop. CI runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [[ "${1:-}" == "--fast" ]]; then
  shift
  select=(-m "not slow")
fi
targets=(tests)
if [[ $# -gt 0 && -e "${1%%::*}" ]]; then
  targets=()
fi
exec python -m pytest "${targets[@]}" -q --durations=20 --timeout=900 "${select[@]}" "$@"
