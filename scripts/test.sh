#!/usr/bin/env bash
# The README's test command. Sharding tests need 8 simulated CPU devices; tests/conftest.py
# sets XLA_FLAGS before jax is imported.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest tests -q --durations=20 --timeout=900 "$@"
