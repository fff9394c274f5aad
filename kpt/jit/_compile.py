"""Compile one kernel source for one GPU target, without torch and without a GPU.

This is how CPU machines (CI, every developer laptop) know that every kernel builds for every
target kpt supports: nvcc for sm_90a/sm_80, hipcc for gfx90a. Device code goes all the way to
machine code (ptxas / the AMDGPU backend run), so register and shared-memory limits are checked
too, not just the C++ front end.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ._env import cache_dir, compilers, csrc_dir, hip_env
from ._errors import CompilerMissing, build_error

log = logging.getLogger("kpt")

_NVIDIA = re.compile(r"^sm_(\d+[af]?)$")
_AMD = re.compile(r"^gfx[0-9a-f]+$")
_TIMEOUT_S = 1800
# The macros torch's cpp_extension puts on every device compile (COMMON_NVCC_FLAGS, and
# COMMON_HIP_FLAGS + COMMON_HIPCC_FLAGS), so a kernel is checked as the JIT build will see it:
# e.g. with __half operators disabled. tests/jit checks these still match torch's.
TORCH_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)
TORCH_HIPCC_FLAGS = (
    "-D__HIP_PLATFORM_AMD__=1",
    "-DUSE_ROCM=1",
    "-DHIPBLAS_V2",
    "-fPIC",
    "-DCUDA_HAS_FP16=1",
    "-D__HIP_NO_HALF_OPERATORS__=1",
    "-D__HIP_NO_HALF_CONVERSIONS__=1",
    "-DHIP_ENABLE_WARP_SYNC_BUILTINS=1",
)


def _command(target: str, source: Path, obj: Path) -> tuple[list[str], dict[str, str] | None]:
    """The compiler command line and environment for ``target``."""
    nvidia = _NVIDIA.match(target)
    if nvidia is None and _AMD.match(target) is None:
        raise ValueError(f"compile_check: target {target!r} is not like 'sm_90a' or 'gfx90a'")
    tool = "nvcc" if nvidia else "hipcc"
    path = compilers()[tool]
    if path is None:
        home = "CUDA_HOME" if nvidia else "ROCM_HOME"
        raise CompilerMissing(
            f"kpt: {tool} not found, cannot compile {source.name} for {target}\n"
            f"hint: install it, set {home}, or add it to PATH"
        )
    if nvidia:
        arch = nvidia.group(1)
        flags = [f"-gencode=arch=compute_{arch},code=sm_{arch}", *TORCH_NVCC_FLAGS]
        return [path, *flags, "-std=c++17", "-c", str(source), "-o", str(obj)], None
    flags = ["-x", "hip", f"--offload-arch={target}", *TORCH_HIPCC_FLAGS]
    return [path, *flags, "-std=c++17", "-c", str(source), "-o", str(obj)], hip_env()


def compile_check(
    source: Path | str,
    target: str,
    *,
    include_dirs: Sequence[Path | str] = (),
    extra_flags: Sequence[str] = (),
) -> None:
    """Compile ``source`` to an object file for ``target`` in a temp dir; raise if it fails.

    ``target``: ``"sm_90a"`` -> ``nvcc -gencode=arch=compute_90a,code=sm_90a``; ``"sm_80"``
    likewise; ``"gfx90a"`` -> ``HIP_PLATFORM=amd hipcc -x hip --offload-arch=gfx90a``. Always
    ``-std=c++17 -I csrc/include`` and the macros cpp_extension defines. Raises
    :class:`CompilerMissing` when the compiler is absent, :class:`BuildError` with the first
    error line(s) and the log path when compiling fails.
    """
    source = Path(source).resolve()
    if not source.is_file():
        raise FileNotFoundError(f"compile_check: {source} does not exist")
    includes = [csrc_dir() / "include", *map(Path, include_dirs)]
    with tempfile.TemporaryDirectory(prefix="kpt-compile-check-") as tmp:
        cmd, env = _command(target, source, Path(tmp) / f"{source.stem}.o")
        cmd += [f"-I{d}" for d in includes] + list(extra_flags)
        log.debug("kpt: %s", " ".join(cmd))
        try:
            done = subprocess.run(
                cmd,
                check=False,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                timeout=_TIMEOUT_S,
                cwd=tmp,
            )
            output, failed = done.stdout, done.returncode != 0
        except subprocess.TimeoutExpired as err:
            partial = err.output.decode(errors="replace") if err.output else ""
            output, failed = f"{partial}\nerror: timed out after {_TIMEOUT_S} s", True
    if not failed:
        return
    # Named after the op folder too: every op has a kernels.cu.
    log_name = f"{source.parent.name}-{source.stem}.{target}.log"
    log_path = cache_dir() / "jit" / "compile_check" / log_name
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(" ".join(cmd) + "\n\n" + output)
    raise build_error(
        f"kpt: {source} does not compile for {target}:",
        output,
        log_path,
        "the full command line is the first line of the log",
    )
