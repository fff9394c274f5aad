"""Where things are and what this machine builds for: directories, compilers, target arch.

Nothing here imports torch at module level, so :func:`compile_check` and the directory helpers
work in an environment without torch (a lint or packaging job).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from ._errors import BuildError

# Where toolkits live when neither the environment nor PATH says; checked last, like torch's
# cpp_extension does. Tests point these elsewhere to simulate a machine without toolkits.
DEFAULT_CUDA_HOME = "/usr/local/cuda"
DEFAULT_ROCM_HOME = "/opt/rocm"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the installed or checked-out kpt/


def cache_dir() -> Path:
    """``$KPT_CACHE_DIR`` or ``~/.cache/kpt``; JIT builds live under ``cache_dir()/"jit"``."""
    override = os.environ.get("KPT_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "kpt"


def csrc_dir() -> Path:
    """The ``csrc/`` tree the JIT builds from.

    ``$KPT_CSRC_DIR`` if set (tests, kernel development against another tree); else the copy a
    wheel ships inside the package (``kpt/_csrc``), so non-editable installs can build; else the
    source checkout's ``<repo>/csrc`` (editable installs, running from the repo).
    """
    override = os.environ.get("KPT_CSRC_DIR")
    if override:
        return Path(override).expanduser().resolve()
    packaged = _PACKAGE_DIR / "_csrc"
    if packaged.is_dir():
        return packaged
    checkout = _PACKAGE_DIR.parent / "csrc"
    return checkout if checkout.is_dir() else packaged


def jit_disabled() -> bool:
    """``KPT_DISABLE_JIT=1``: load only finished cached builds, never run a compiler."""
    return os.environ.get("KPT_DISABLE_JIT", "0").strip().lower() not in ("", "0", "false", "no")


def _tool(name: str, home_vars: tuple[str, ...], default_home: str) -> str | None:
    for var in home_vars:
        home = os.environ.get(var)
        if home:
            candidate = Path(home) / "bin" / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(default_home) / "bin" / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def compilers() -> dict[str, str | None]:
    """Paths of the GPU compilers, or None: ``{"nvcc": ..., "hipcc": ...}``.

    Looked up the way torch's cpp_extension does (``CUDA_HOME``/``CUDA_PATH``, then PATH, then
    the default install dir) so the compiler kpt reports is the one a build will run. Not cached:
    PATH may change during a process, and a lookup costs microseconds.
    """
    return {
        "nvcc": _tool("nvcc", ("CUDA_HOME", "CUDA_PATH"), DEFAULT_CUDA_HOME),
        "hipcc": _tool("hipcc", ("ROCM_HOME", "ROCM_PATH"), DEFAULT_ROCM_HOME),
    }


def host_compiler() -> str | None:
    """The C++ compiler cpp_extension runs for ``.cpp`` sources (``$CXX`` or ``c++``)."""
    return shutil.which(os.environ.get("CXX", "c++"))


def hip_env() -> dict[str, str]:
    """The environment for hipcc: it must target AMD even where nvcc is installed too."""
    return {**os.environ, "HIP_PLATFORM": "amd"}


@functools.cache
def _version_of(path: str, mtime_ns: int) -> str:
    env = hip_env() if Path(path).name.startswith("hipcc") else None
    try:
        done = subprocess.run(
            [path, "--version"], check=False, capture_output=True, text=True, timeout=60, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    # nvcc's last line names the release and build; clang's first lines name the version.
    return done.stdout.strip() or done.stderr.strip()


def tool_version(path: str) -> str:
    """``<path> --version``, cached per binary (and its mtime, so an upgrade is noticed)."""
    return _version_of(path, os.stat(path).st_mtime_ns)


# ---- target architecture ------------------------------------------------------------------

_ARCH_ENTRY = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def cuda_arch_flags() -> tuple[str, ...]:
    """nvcc ``-gencode`` flags for this build.

    ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0a+PTX"``) is honoured as written. Otherwise the
    current device's arch, except that sm_90 becomes sm_90a: wgmma and setmaxnreg exist only
    in the arch-specific target, and a sm_90a cubin runs on every sm_90 device anyway.
    """
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";")
    entries = [e for e in listed.split(";") if e]
    if not entries:
        import torch

        if not torch.cuda.is_available():
            raise BuildError(
                "no CUDA device is visible to pick the target arch from; "
                "set TORCH_CUDA_ARCH_LIST (e.g. '9.0a') to build without one"
            )
        major, minor = torch.cuda.get_device_capability()
        entries = [f"{major}.{minor}{'a' if (major, minor) == (9, 0) else ''}"]
    flags = []
    for entry in entries:
        match = _ARCH_ENTRY.match(entry)
        if match is None:
            raise BuildError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not like '8.0' or '9.0a'")
        major, minor, suffix, ptx = match.groups()
        arch = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return tuple(flags)


def rocm_arch_flags() -> tuple[str, ...]:
    """hipcc ``--offload-arch`` flags: ``PYTORCH_ROCM_ARCH`` if set, else the device's gfx name
    (without feature suffixes such as ``:sramecc+:xnack-``)."""
    listed = os.environ.get("PYTORCH_ROCM_ARCH", "").replace(",", ";").replace(" ", ";")
    archs = [a for a in listed.split(";") if a]
    if not archs:
        import torch

        if not torch.cuda.is_available():
            raise BuildError(
                "no ROCm device is visible to pick the target arch from; "
                "set PYTORCH_ROCM_ARCH (e.g. 'gfx90a') to build without one"
            )
        archs = [torch.cuda.get_device_properties().gcnArchName.split(":")[0]]
    return tuple(f"--offload-arch={arch}" for arch in archs)
