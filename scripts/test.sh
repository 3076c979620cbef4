#!/usr/bin/env bash
# The README's test command. Sharding tests need 8 simulated CPU devices; tests/conftest.py
# sets XLA_FLAGS before jax is imported. Arguments go to pytest; when the first names a test
# file or folder (tests/test_plan.py, tests/test_plan.py::test_x) only those run.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(tests)
if [[ $# -gt 0 && -e "${1%%::*}" ]]; then
  targets=()
fi
exec python -m pytest "${targets[@]}" -q --durations=20 --timeout=900 "$@"
