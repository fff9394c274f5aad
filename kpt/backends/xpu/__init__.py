"""The ``xpu`` backend: Intel GPUs through Triton's Intel backend and Intel Extension for PyTorch
(IPEX); IPEX's fused ops also serve Intel CPUs.

The backend's config names the kernel that runs a call:

* ``{"kernel": "triton", ...}`` (XPU devices): the op's own Triton kernels (its ``_triton``
  module and tile configs), compiled by Triton's Intel backend (``pytorch-triton-xpu``, which
  the XPU build of torch brings);
* ``{"kernel": "ipex"}``: IPEX's fused op, where the op has one (``kpt/backends/xpu/<op>.py``):
  on the CPU only where it measured faster than kpt's reference (see that module), so that
  dispatch on a CPU with IPEX installed takes it before the reference.

IPEX ops left out, and why: ``ipex.llm.functional.varlen_attention`` (on the CPU it pads into
torch's SDPA, ignores ``softmax_scale`` and returns no lse), ``PagedAttention``'s
``single_query_cached_kv_attention`` / ``flash_attn_varlen_func`` (no lse, which
``paged_attention`` returns and ``cascade_attention`` merges levels with) and
``reshape_and_cache`` (``append_paged_kv``'s reference is one device-side scatter already; the
reference serves XPU devices for it).

Nothing here imports IPEX or Triton until a call runs: a missing package, an IPEX built for
another torch or no XPU device is a reason. IPEX is imported on first use (seconds; it also
registers its own CPU kernels with torch, e.g. autocast ones).

Adding the backend to an op is one entry in its ``BACKENDS`` and one in its priority::

    xpu_backend(f"{__name__}._triton", dtypes=_HALF, supports=_triton_supports)
    priority={..., "xpu": ("xpu", "reference")}

(``ipex="<op>", cpu=True`` when ``kpt/backends/xpu/<op>.py`` has an IPEX path for the CPU too,
and then ``"cpu": ("xpu", "reference")``.)
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import torch
from packaging.version import InvalidVersion, Version

IPEX = "intel_extension_for_pytorch"


def _minor(version: str) -> tuple[int, ...] | None:
    try:
        return Version(version).release[:2]
    except InvalidVersion:
        return None


@functools.cache
def ipex_unavailable() -> str | None:
    """Why IPEX cannot be used here, or None; imports nothing (IPEX refuses, at import, a torch
    of another minor version than its own)."""
    if importlib.util.find_spec(IPEX) is None:
        return f"{IPEX} is not installed (bash scripts/setup_xpu.sh makes .venv-xpu)"
    try:
        version = importlib.metadata.version(IPEX)
    except importlib.metadata.PackageNotFoundError:
        return None
    if _minor(version) != _minor(torch.__version__):
        return (f"{IPEX} {version} needs torch {'.'.join(map(str, _minor(version)))}.x, this is "
                f"torch {torch.__version__}")
    return None


@functools.cache
def _ipex_build() -> str | None:
    """"cpu" or "xpu" from IPEX's ``_version.py`` (``2.8.0+cpu``), read without importing it;
    None when it does not say."""
    origin = importlib.util.find_spec(IPEX).submodule_search_locations[0]
    try:
        with open(f"{origin}/_version.py") as f:
            text = f.read()
    except OSError:
        return None
    return next((build for build in ("cpu", "xpu") if f"+{build}" in text), None)


def ipex_build_unavailable(device_type: str) -> str | None:
    """Why IPEX cannot run on ``device_type`` ("cpu" or "xpu") here, or None. IPEX ships one
    build per device: PyPI's wheel is the CPU one, the XPU one comes from Intel's index."""
    missing = ipex_unavailable()
    if missing:
        return missing
    build = _ipex_build()
    if build is not None and build != device_type:
        return f"{IPEX} is its {build.upper()} build ({device_type.upper()} kernels need the other)"
    return None


def xpu_device_count() -> int:
    xpu = getattr(torch, "xpu", None)
    return xpu.device_count() if xpu is not None and xpu.is_available() else 0


@functools.cache
def triton_intel_unavailable() -> str | None:
    """Why Triton cannot compile for Intel GPUs here, or None."""
    from kpt.ops._common import triton_unavailable

    missing = triton_unavailable()
    if missing:
        return missing
    from triton.backends import backends

    if "intel" not in backends:
        return ("triton has no Intel (XPU) backend (the XPU build of torch brings "
                "pytorch-triton-xpu)")
    return None


def xpu_unavailable() -> str | None:
    """The backend serves nothing here: neither an XPU device nor IPEX (its CPU kernels)."""
    if xpu_device_count() or ipex_unavailable() is None:
        return None
    return "no XPU device (torch.xpu.is_available() is False) and no IPEX"


def ipex_ops() -> Any:
    """``torch.ops.torch_ipex`` after importing IPEX; a failed import makes the backend
    unavailable (dispatch records it and chooses again)."""
    if IPEX not in sys.modules:
        from kpt.ops._registry import BackendUnavailable

        try:
            importlib.import_module(IPEX)
        except Exception as err:  # noqa: BLE001 - any import failure is the same reason
            raise BackendUnavailable(f"{IPEX} failed to import: {type(err).__name__}: "
                                     f"{err}") from err
    return torch.ops.torch_ipex


def _no_reasons(_problem: Any) -> list[str]:
    return []


def xpu_backend(triton: str | None, *, dtypes: frozenset, triton_dtypes: frozenset | None = None,
                supports: Callable[[Any], list[str]] = _no_reasons, configs: str | None = None,
                ipex: str | None = None, cpu: bool = False, entry: str = "run") -> Any:
    """The ``xpu`` backend of an op.

    ``triton``: the op's Triton module (absolute name; ``None`` when it has none), whose
    ``entry`` launches a call and ``configs`` (when named) lists its tile configs; ``supports``:
    its Triton limits (the op's own ``_triton_supports``; reasons about running on the CPU do
    not apply to XPU problems); ``triton_dtypes``: what its kernels take (default ``dtypes``).
    ``ipex``: the name of a module of this package with IPEX's fused op for this op: its
    ``supports(problem)`` and ``run(call, config)`` (``run_backward`` for ``entry`` likewise);
    ``cpu``: that module also serves CPU problems."""
    # kpt.ops imports this package while it declares its ops: its modules are imported here.
    from kpt.ops._common import dtype_name, lazy, module
    from kpt.ops._registry import Backend

    triton_dtypes = dtypes if triton_dtypes is None else triton_dtypes
    ipex_module = None if ipex is None else f"{__name__}.{ipex}"

    def triton_reasons(p: Any) -> list[str]:
        if triton is None:
            return ["kpt has no Triton kernel for this op"]
        missing = triton_intel_unavailable()
        if missing:
            return [missing]
        if p.dtype not in triton_dtypes:
            return [f"dtype {dtype_name(p.dtype)} not in the Triton kernels' dtypes"]
        return supports(p)

    def ipex_reasons(p: Any) -> list[str]:
        if ipex_module is None:
            return ["IPEX has no fused op for this op"]
        missing = ipex_build_unavailable(p.device_type)
        if missing:
            return [missing]
        return module(ipex_module).supports(p)

    def check(p: Any) -> list[str]:
        if p.device_type == "cpu":
            return [f"IPEX on the CPU: {r}" for r in ipex_reasons(p)]
        triton_r, ipex_r = triton_reasons(p), ipex_reasons(p)
        if not triton_r or not ipex_r:
            return []
        return [f"triton: {'; '.join(triton_r)}", f"IPEX: {'; '.join(ipex_r)}"]

    def choose(p: Any) -> list[dict]:
        if p.device_type == "cpu":
            return [{"kernel": "ipex"}]
        out = []
        if not triton_reasons(p):
            tiles = lazy(triton, configs)(p) if configs else [{}]
            out += [{"kernel": "triton", **tile} for tile in tiles]
        if not ipex_reasons(p):
            out.append({"kernel": "ipex"})
        return out

    def run(call: Any, config: dict) -> None:
        if config.get("kernel") == "ipex":
            return getattr(module(ipex_module), entry)(call, config)
        tile = {k: v for k, v in config.items() if k != "kernel"}
        return getattr(module(triton), entry)(call, tile)

    devices = frozenset({"xpu", "cpu"}) if cpu else frozenset({"xpu"})
    return Backend(name="xpu", device_types=devices, dtypes=dtypes, run=run,
                   available=xpu_unavailable, supports=check, configs=choose)


def triton_entry(triton: str, entry: str) -> Callable[[Any, dict], None]:
    """``entry`` of the op's Triton module called with an ``xpu`` config (its tile, without the
    ``kernel`` key): for ops that look a backward up by backend name (flex_attention)."""

    from kpt.ops._common import module

    def call(op_call: Any, config: dict) -> None:
        tile = {k: v for k, v in config.items() if k != "kernel"}
        getattr(module(triton), entry)(op_call, tile)

    return call
