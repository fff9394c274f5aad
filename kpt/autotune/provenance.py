"""What a tuned row was measured on and with: hardware fingerprint, versions, kernel sources.

A timing is only worth reusing on the same GPU model running the same code. The *fingerprint*
names the hardware and the CUDA/HIP runtime (rows are keyed by it); the *provenance* (kernel
source hash and package versions) is stored with every row and compared on lookup, so a row
measured on other code is ignored instead of trusted.

Nothing here imports torch at module level: the database and its worker processes stay cheap.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Provenance fields a row must match to be trusted, per backend. The kernel source and the kpt
# and torch versions matter to every backend (the JIT binding is built against torch, the
# reference *is* torch); the Triton version matters only to Triton kernels.
STALE_FIELDS: dict[str, tuple[str, ...]] = {
    "triton": ("source_hash", "kpt_version", "torch_version", "triton_version"),
}
DEFAULT_STALE_FIELDS = ("source_hash", "kpt_version", "torch_version")

# Files of csrc/ that can end up in a build (not editor backups or build outputs).
_KERNEL_SUFFIXES = frozenset(
    {".cu", ".hip", ".cpp", ".cc", ".c", ".h", ".hh", ".hpp", ".hxx", ".cuh", ".inc", ".inl"}
)
_TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton-rocm", "pytorch-triton", "triton-xpu")


def device_fingerprint(device: torch.device | str | None = None) -> str | None:
    """A readable id of the GPU model and runtime that tuned rows hold for, e.g.
    ``NVIDIA H200/sm_90/132sm/140GiB/cuda12.8`` or ``AMD Instinct MI300X/gfx942:sramecc+:
    xnack-/304cu/192GiB/hip6.2.41133``; None for devices that are not tuned (CPU and others).

    SM (or CU) count and memory size tell apart MIG slices and SKUs of one name; the runtime
    version stands for the compiler that built the kernels. The driver version is recorded
    with each row but left out of the key: drivers update often and do not change the code
    nvcc, hipcc or Triton's bundled ptxas emit, and a key with it would orphan shipped rows.
    """
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_fingerprint(index)


@functools.cache
def _cuda_fingerprint(index: int) -> str:
    import torch

    props = torch.cuda.get_device_properties(index)
    memory = f"{round(props.total_memory / 2**30)}GiB"
    if torch.version.hip:
        arch = getattr(props, "gcnArchName", "") or "gfx-unknown"
        hip = str(torch.version.hip).split("-")[0]
        return f"{props.name}/{arch}/{props.multi_processor_count}cu/{memory}/hip{hip}"
    arch = f"sm_{props.major}{props.minor}"
    return f"{props.name}/{arch}/{props.multi_processor_count}sm/{memory}/cuda{torch.version.cuda}"


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions stored with every row (computed once per process)."""
    import torch

    import kpt

    return {
        "kpt_version": kpt.__version__,
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
        "runtime_version": torch.version.hip or torch.version.cuda or "",
        "driver_version": _driver_version(),
    }


def triton_version() -> str:
    """Installed Triton version without importing it (importing Triton takes a second)."""
    module = sys.modules.get("triton")
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    for name in _TRITON_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _driver_version() -> str:
    """The CUDA driver API version (e.g. ``12080``) through libcuda, or "" when unknown."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.dylib")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        value = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(value)) == 0:
            return str(value.value)
    return ""


def _op_dir(op: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(f"kpt.ops.{op}")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _backend_files(op: str, backend: str) -> list[tuple[str, Path]]:
    """The files whose content decides the code a backend runs, with stable names."""
    files: list[tuple[str, Path]] = []
    op_dir = _op_dir(op)
    module = {"reference": "reference.py", "cuda": "_cuda.py", "hip": "_cuda.py"}.get(
        backend, f"_{backend}.py"
    )
    if op_dir is not None and (op_dir / module).is_file():
        files.append((module, op_dir / module))
    if backend in ("cuda", "hip"):
        # CUDA and HIP build csrc/<op>/ with the portability headers of csrc/include/, from
        # the tree the JIT builds from.
        from kpt.jit import csrc_dir

        root = csrc_dir()
        # csrc/<op>/ and csrc/<op>_<variant>/ (an arch-specific kernel of the same backend),
        # and the shared headers; headers of include/ named after another op belong to that
        # op: adding or editing them must not make this op's tuned rows stale.
        mine = sorted(d for d in root.iterdir() if d.is_dir()
                      and (d.name == op or d.name.startswith(op + "_")))
        others = [d.name for d in root.iterdir() if d.is_dir() and d.name != "include"
                  and d not in mine]
        for sub in (*mine, root / "include"):
            if sub.is_dir():
                files.extend((str(p.relative_to(root)), p) for p in sorted(sub.rglob("*"))
                             if p.suffix in _KERNEL_SUFFIXES and p.is_file()
                             and not (sub.name == "include" and p.stem.startswith(tuple(others))))
    return files


@functools.cache
def source_hash(op: str, backend: str) -> str:
    """A short hash of the kernel sources of one backend of one op.

    The files only, not the JIT's build hash: that one also covers the host compiler, Python
    and torch's git revision, which do not change how fast a kernel runs but would make rows
    shipped with kpt match no user's machine; and it needs compiler version probes, which do
    not belong on the first lookup. An op or backend with no files hashes to the digest of
    nothing, which is stable too.
    """
    digest = hashlib.sha256()
    for name, path in _backend_files(op, backend):
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def provenance(op: str, backend: str) -> dict[str, str]:
    """Provenance columns for a row measured now."""
    return {"source_hash": source_hash(op, backend), **versions()}


def stale_reason(row: dict[str, Any]) -> str | None:
    """Why a row does not describe the code running now, or None when it does."""
    current = provenance(row["op"], row["backend"])
    for name in STALE_FIELDS.get(row["backend"], DEFAULT_STALE_FIELDS):
        if row.get(name) != current[name]:
            return f"{name} {row.get(name)!r} != current {current[name]!r}"
    return None


def clear_caches() -> None:
    """Forget cached hashes and versions (after sources changed, or in tests)."""
    source_hash.cache_clear()
    versions.cache_clear()
    _cuda_fingerprint.cache_clear()
