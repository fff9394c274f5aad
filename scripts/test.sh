#!/usr/bin/env bash
# Run kpt's tests (and lint). On a machine without a GPU, Triton kernels run under the
# interpreter and CUDA/HIP kernels are compile-checked with nvcc/hipcc when those are present.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
. "$root/scripts/setup.sh"
cd "$root"
ruff check kpt tests bench
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
fi
python -m pytest -q -p no:cacheprovider "$@"
