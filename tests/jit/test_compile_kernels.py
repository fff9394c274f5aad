"""Every kernel in csrc/ compiles for every target kpt supports, on any machine with compilers.

One test per (kernel file, target): nvcc for sm_90a and sm_80, hipcc for gfx90a. A missing
compiler skips ("nvcc not found"), unless ``KPT_REQUIRE_COMPILERS=1`` (CI images that are
supposed to have them), where it fails; a compile error always fails.

A kernel built on instructions of one architecture only (wgmma, TMA, setmaxnreg: sm_90a)
declares its targets in a comment among its first lines, ``// kpt-targets: sm_90a``; the other
targets are skipped with that declaration as the reason.
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
_TARGETS_LINE = re.compile(r"^\s*//\s*kpt-targets:(.*)$")
# The declaration must come before the code: only the file's head is read.
_HEAD_LINES = 5


def declared_targets(text: str) -> tuple[str, ...] | None:
    """The targets a kernel source declares (``// kpt-targets: sm_90a``), None for all."""
    for line in text.splitlines()[:_HEAD_LINES]:
        match = _TARGETS_LINE.match(line)
        if match:
            return tuple(match.group(1).replace(",", " ").split())
    return None

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
    declared = declared_targets(kernel.read_text(errors="replace"))
    if declared is not None and target not in declared:
        pytest.skip(f"{kernel.name} declares kpt-targets: {' '.join(declared)}")
    _require(TARGETS[target])
    monkeypatch.setenv("KPT_CACHE_DIR", str(tmp_path / "cache"))  # failure logs land here
    compile_check(kernel, target)


@pytest.mark.parametrize(
    "kernel_file", KERNELS, ids=lambda p: p.relative_to(csrc_dir()).as_posix()
)
def test_declared_targets_are_known(kernel_file):
    """A typo in a declaration would silently skip every check of that kernel."""
    declared = declared_targets(kernel_file.read_text(errors="replace"))
    if declared is not None:
        assert declared, f"{kernel_file.name}: empty kpt-targets declaration"
        assert set(declared) <= set(TARGETS), f"{kernel_file.name}: unknown {declared}"


def test_declared_targets_parsing():
    assert declared_targets("// kpt-targets: sm_90a\n#include <x>\n") == ("sm_90a",)
    assert declared_targets("// a kernel\n//   kpt-targets: sm_90a, sm_80\n") == (
        "sm_90a",
        "sm_80",
    )
    assert declared_targets("#include <x>\n") is None
    # Only the head of the file counts: a mention deep inside is documentation, not a declaration.
    assert declared_targets("\n" * _HEAD_LINES + "// kpt-targets: sm_90a\n") is None


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
