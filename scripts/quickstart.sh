#!/usr/bin/env bash
# The README's main job on a fresh machine: set up, then a short Instruction Modelling
# fine-tune on synthetic data the project generates (configs/demo.py), a Hugging Face export
# in runs/demo/hf, and transformers answering a prompt with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Rerunning resumes runs/demo (a finished run: evaluated and exported again); nothing is deleted.
python -m im_jax.train --config configs/demo.py --workdir runs/demo
python scripts/hf_generate.py runs/demo/hf "What is 12 plus 30? Reply with the number."
