"""Shared by the tests of the ops with csrc (JIT-built) backends."""

from __future__ import annotations

from types import ModuleType

import torch


def unusable(cuda_module: ModuleType) -> str | None:
    """Why an op's cuda/hip backend (``kpt.ops.<op>._cuda``, with ``cuda_unavailable`` and
    ``hip_unavailable``) cannot run its GPU tests here, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA/HIP device"
    if torch.version.hip is None and torch.cuda.get_device_capability() < (8, 0):
        return "the cuda backend needs sm_80 or newer"
    hip = torch.version.hip is not None
    reason = cuda_module.hip_unavailable() if hip else cuda_module.cuda_unavailable()
    return f"the {'hip' if hip else 'cuda'} backend is unavailable: {reason}" if reason else None
