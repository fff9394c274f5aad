"""Shared by the tests of the ops with csrc (JIT-built) backends."""

from __future__ import annotations

import ast
import re
from pathlib import Path
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


def forward_arguments(cuda_module: ModuleType, binding_text: str) -> tuple[int, list[str]]:
    """(positional arguments of the launcher's one ``module.forward(...)`` call, the
    ``py::arg`` names of the binding's ``forward``): the binding first compiles on a GPU
    machine, so CPU tests check that the two agree."""
    tree = ast.parse(Path(cuda_module.__file__).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "forward"]
    assert len(calls) == 1 and not calls[0].keywords, "one positional forward(...) call"
    body = binding_text[binding_text.index('m.def("forward"'):]
    names = re.findall(r'py::arg\("(\w+)"\)', body[: body.index(";")])
    return len(calls[0].args), names
