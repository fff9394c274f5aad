#!/usr/bin/env bash
# Create .venv-xpu: Intel Extension for PyTorch with the torch it is built for, kpt (editable)
# and pytest, for the `xpu` backend's tests (tests/xpu: IPEX's fused ops on the CPU).
# Idempotent.
# Pins: IPEX 2.8.0 loads only under torch 2.8.x. PyPI's IPEX wheel is its CPU build (the XPU
# build lives on Intel's own index), and PyPI's torch 2.8.0 for Linux x86_64 is the CUDA build,
# which brings the nvidia-* runtime wheels; there is no CPU-only build of it in the index.
# About 7 GB.
set -euo pipefail
# shellcheck source=scripts/backend_venv.sh
. "$(dirname "${BASH_SOURCE[0]}")/backend_venv.sh"
backend_venv .venv-xpu "torch==2.8.0" "intel_extension_for_pytorch==2.8.0"
"$py" - <<'PY'
import torch, intel_extension_for_pytorch as ipex
print(f"torch {torch.__version__}, intel_extension_for_pytorch {ipex.__version__}")
PY
