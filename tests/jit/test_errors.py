"""Failures must read well: the first error, the log path, a hint; and never retry in a loop."""

from __future__ import annotations

import os

import pytest

from kpt.jit import BuildError, CompilerMissing, JitSpec, _env, compile_check, compilers
from kpt.jit._errors import first_errors

from .helpers import TOY_SPEC, compiler_runs, instrument

GCC_LOG = """\
[1/2] c++ -MMD -MF binding.o.d -DTORCH_EXTENSION_NAME=broken -fPIC -std=c++20 -O3 -c binding.cpp
FAILED: binding.o
c++ -MMD -MF binding.o.d -DTORCH_EXTENSION_NAME=broken -fPIC -std=c++20 -O3 -c binding.cpp
binding.cpp: In function 'int f()':
binding.cpp:3:12: error: expected ';' before '}' token
    3 |   return 1 }
      |            ^
binding.cpp:7:1: error: 'g' was not declared in this scope
ninja: build stopped: subcommand failed.
"""

NVCC_LOG = """\
kernels.cu(12): error: identifier "threadIdx_x" is undefined
      out[threadIdx_x] = 0.f;
          ^

1 error detected in the compilation of "kernels.cu".
"""


def test_first_errors_gcc():
    shown = first_errors(GCC_LOG)
    assert shown.splitlines() == [
        "binding.cpp:3:12: error: expected ';' before '}' token",
        "    3 |   return 1 }",
        "      |            ^",
        "... and 1 more error line(s) in the log",
    ]


def test_first_errors_nvcc_and_fallback():
    assert first_errors(NVCC_LOG).splitlines()[:2] == [
        'kernels.cu(12): error: identifier "threadIdx_x" is undefined',
        "      out[threadIdx_x] = 0.f;",
    ]
    assert first_errors("ptxas error   : Entry function uses too much shared data") == (
        "ptxas error   : Entry function uses too much shared data"
    )
    assert first_errors("Killed\n") == "Killed"


def test_syntax_error(toy_env):
    instrument(toy_env["counter"])
    binding = toy_env["csrc"] / "toy" / "binding.cpp"
    binding.write_text(binding.read_text() + "\nint broken( {\n")
    spec = JitSpec("kpt_toy_broken", ("toy/binding.cpp",))
    with pytest.raises(BuildError) as caught:
        spec.load()
    message = str(caught.value)
    log_path = spec.build_dir() / "build.log"
    assert "kpt_toy_broken" in message
    assert "binding.cpp:" in message and "error:" in message
    assert f"full log: {log_path}" in message
    assert (
        "hint:" in message and "KPT_DISABLE_JIT=1" in message and str(spec.build_dir()) in message
    )
    assert len(message.splitlines()) < 15, "the message must not be the whole log"
    assert "int broken(" in log_path.read_text()

    reason = spec.unavailable_reason()
    assert reason is not None and "failed" in reason and "error:" in reason
    with pytest.raises(BuildError, match="error:"):
        spec.load()
    assert compiler_runs(toy_env["counter"]) == 1, "a failed hash is not rebuilt in-process"


@pytest.fixture
def no_gpu_compilers(tmp_path, monkeypatch):
    """PATH, CUDA_HOME/ROCM_HOME and the default install dirs all lead nowhere."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for name in ("CUDA_HOME", "CUDA_PATH", "ROCM_HOME", "ROCM_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_env, "DEFAULT_CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.setattr(_env, "DEFAULT_ROCM_HOME", str(tmp_path / "no-rocm"))


@pytest.mark.parametrize(
    ("target", "tool", "home"), [("sm_90a", "nvcc", "CUDA_HOME"), ("gfx90a", "hipcc", "ROCM_HOME")]
)
def test_missing_gpu_compiler(tmp_path, no_gpu_compilers, target, tool, home):
    assert compilers() == {"nvcc": None, "hipcc": None}
    kernel = tmp_path / "kernels.cu"
    kernel.write_text("__global__ void k() {}\n")
    with pytest.raises(CompilerMissing) as caught:
        compile_check(kernel, target)
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, BuildError)
    message = str(caught.value)
    assert f"{tool} not found" in message and home in message and "hint:" in message


def test_missing_host_compiler(toy_env, monkeypatch):
    monkeypatch.setenv("CXX", "kpt-no-such-compiler")
    reason = TOY_SPEC.unavailable_reason()
    assert reason is not None and "no C++ compiler" in reason
    with pytest.raises(CompilerMissing, match="no C.. compiler"):
        TOY_SPEC.load()


def test_compile_check_rejects_unknown_targets(tmp_path):
    kernel = tmp_path / "k.cu"
    kernel.write_text("\n")
    with pytest.raises(ValueError, match="sm_90a"):
        compile_check(kernel, "hopper")
    with pytest.raises(FileNotFoundError):
        compile_check(tmp_path / "absent.cu", "sm_80")


@pytest.mark.skipif(compilers()["nvcc"] is None, reason="nvcc not found")
def test_compile_check_reports_the_first_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KPT_CACHE_DIR", str(tmp_path / "cache"))
    kernel = tmp_path / "op" / "kernels.cu"
    kernel.parent.mkdir()
    kernel.write_text("__global__ void k(float* x) {\n  x[0] = undefined_name;\n}\n")
    with pytest.raises(BuildError) as caught:
        compile_check(kernel, "sm_80")
    message = str(caught.value)
    assert 'identifier "undefined_name" is undefined' in message
    assert "kernels.cu(2)" in message and "sm_80" in message and "full log:" in message
    log_path = tmp_path / "cache" / "jit" / "compile_check" / "op-kernels.sm_80.log"
    assert "nvcc" in log_path.read_text().splitlines()[0]


@pytest.mark.parametrize("kind", ["a file", "read-only"])
def test_an_unusable_cache_folder_is_a_clear_build_error(toy_env, monkeypatch, kind, tmp_path):
    """KPT_CACHE_DIR naming a file, or a folder nobody may write: a BuildError that names the
    cache and the fix, never a raw OSError from deep inside the build."""
    if kind == "a file":
        bad = tmp_path / "afile"
        bad.write_text("x")
    else:
        bad = tmp_path / "ro"
        bad.mkdir()
        bad.chmod(0o555)
        if os.access(bad, os.W_OK):
            pytest.skip("this process writes through read-only permissions (root); the "
                        "file case covers the same path")
    monkeypatch.setenv("KPT_CACHE_DIR", str(bad))
    with pytest.raises(BuildError, match="KPT_CACHE_DIR at a writable folder"):
        TOY_SPEC.load()


@pytest.mark.parametrize(("args", "text"), [((5, ("a.cpp",)), "name must be a str"),
                                            (("ext", None), "sequence of str"),
                                            (("ext", ("a.cpp", 3)), "sequence of str")])
def test_jitspec_arguments_are_typed(args, text):
    with pytest.raises(TypeError, match=text):
        JitSpec(*args)
