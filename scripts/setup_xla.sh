#!/usr/bin/env bash
# Create .venv-xla: torch_xla with the torch it is built for, kpt (editable) and pytest, for the
# `xla` backend's tests (tests/xla, run on torch_xla's PJRT CPU device). Idempotent.
# Pins: torch_xla 2.9.0 is built against torch 2.9.0 exactly (it declares no torch dependency,
# so both are pinned here). PyPI's torch 2.9.0 for Linux x86_64 is the CUDA build and brings the
# nvidia-* runtime wheels; there is no CPU-only build of it in the package index. About 7 GB.
set -euo pipefail
# shellcheck source=scripts/backend_venv.sh
. "$(dirname "${BASH_SOURCE[0]}")/backend_venv.sh"
backend_venv .venv-xla "torch==2.9.0" "torch_xla==2.9.0"
PJRT_DEVICE=CPU "$py" - <<'PY'
import torch, torch_xla
print(f"torch {torch.__version__}, torch_xla {torch_xla.__version__}")
PY
