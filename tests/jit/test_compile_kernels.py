"""Every kernel in csrc/ compiles for every target kpt supports, on any machine with compilers.

One test per (kernel file, target): nvcc for sm_90a and sm_80, hipcc for gfx90a. A missing
compiler skips ("nvcc not found"), unless ``KPT_REQUIRE_COMPILERS=1`` (CI images that are
supposed to have them), where it fails; a compile error always fails.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kpt.jit import compile_check, compilers, csrc_dir

TARGETS = {"sm_90a": "nvcc", "sm_80": "nvcc", "gfx90a": "hipcc"}
KERNELS = sorted(csrc_dir().glob("*/*.cu"))
_TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.MULTILINE)

# Used only while csrc/ has no kernel yet, so that the checking path itself stays tested.
EXAMPLE_KERNEL = """\
#if defined(__HIP__)
#include <hip/hip_runtime.h>
#endif

__global__ void scale(float* x, float s, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] *= s;
}
"""


def _require(tool: str) -> None:
    if compilers()[tool] is None:
        if os.environ.get("KPT_REQUIRE_COMPILERS", "0") not in ("", "0"):
            pytest.fail(f"{tool} not found and KPT_REQUIRE_COMPILERS=1")
        pytest.skip(f"{tool} not found")


@pytest.fixture(
    params=KERNELS or [None],
    ids=lambda p: p.relative_to(csrc_dir()).as_posix() if p else "example-kernel",
)
def kernel(request, tmp_path) -> Path:
    if request.param is not None:
        return request.param
    example = tmp_path / "example" / "kernels.cu"
    example.parent.mkdir()
    example.write_text(EXAMPLE_KERNEL)
    return example


@pytest.mark.parametrize("target", TARGETS)
def test_kernel_compiles(kernel, target, tmp_path, monkeypatch):
    _require(TARGETS[target])
    monkeypatch.setenv("KPT_CACHE_DIR", str(tmp_path / "cache"))  # failure logs land here
    compile_check(kernel, target)


def test_only_bindings_include_torch():
    """Kernels must build without torch (CPU wheel, hipcc); only binding.cpp may include it."""
    offenders = [
        path.relative_to(csrc_dir()).as_posix()
        for path in sorted(csrc_dir().rglob("*"))
        if path.is_file()
        and path.name != "binding.cpp"
        and _TORCH_INCLUDE.search(path.read_text(errors="replace"))
    ]
    assert not offenders, f"these include torch/ATen/c10 headers: {offenders}"


def test_checks_use_the_macros_of_torch_builds():
    """compile_check mirrors cpp_extension's device flags; if torch changes them, follow."""
    from torch.utils import cpp_extension

    from kpt.jit import _compile as check_module

    assert list(check_module.TORCH_NVCC_FLAGS) == cpp_extension.COMMON_NVCC_FLAGS
    hip = cpp_extension.COMMON_HIP_FLAGS + cpp_extension.COMMON_HIPCC_FLAGS
    assert list(check_module.TORCH_HIPCC_FLAGS) == hip
