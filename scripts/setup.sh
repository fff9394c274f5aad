#!/usr/bin/env bash
# Set up a fresh machine for kpt: a virtual environment in .venv with torch, kpt (editable) and
# its test and HuggingFace extras. Idempotent; sourced by the other scripts.
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
