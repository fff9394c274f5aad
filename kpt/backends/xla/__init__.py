"""The ``xla`` backend: kpt's ops on XLA devices through torch_xla (TPUs, or any PJRT device).

Each op runs in one of two forms, named by the backend's config ``{"kernel": ...}``:

* ``"pallas"``: a Pallas kernel that torch_xla ships, where one fits the call. They compile
  through Mosaic for TPUs only, so on any other PJRT device (the CPU one included) that is a
  reason (:func:`pallas_unavailable`) and the op takes the other form.
* ``"xla"``: the op's reference written for XLA tracing: static shapes (varlen and paged inputs
  become padded tensors whose validity masks are built on the device), no Python control flow
  on tensor data and no host reads (``.item()``, ``.tolist()``), so that one call traces into
  one graph and a repeat with the same shapes reuses its compilation. Where an op's reference is
  written that way already (``rmsnorm_qkv_rope``, ``flex_attention``, ``fp8_gemm``,
  ``append_paged_kv``), it is that reference.

torch_xla 2.9 quirk this package works around: ``Tensor.__rshift__`` (``a >> b``) computes wrong
values on XLA tensors (a broadcast shift gives 0, a scalar shift of a negative int32 rounds
toward zero); ``torch.bitwise_right_shift`` is right, and int4 unpacking uses it.

Adding the backend to an op is one entry in its ``BACKENDS`` and one in its priority::

    xla_backend("moe", dtypes=_FLOATS)         # kpt/backends/xla/moe.py: run, supports, configs
    xla_backend(_reference.run, dtypes=_FLOATS)  # or: the op's reference is XLA-friendly as is
    priority={..., "xla": ("xla", "reference")}
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from packaging.version import InvalidVersion, Version

XLA_DEVICES = frozenset({"xla"})
XLA_CONFIG = {"kernel": "xla"}
PALLAS_CONFIG = {"kernel": "pallas"}


def _minor(version: str) -> tuple[int, ...] | None:
    try:
        return Version(version).release[:2]
    except InvalidVersion:
        return None


@functools.cache
def xla_unavailable() -> str | None:
    """Why torch_xla cannot be used here, or None; imports nothing."""
    if importlib.util.find_spec("torch_xla") is None:
        return "torch_xla is not installed (bash scripts/setup_xla.sh makes .venv-xla)"
    try:
        version = importlib.metadata.version("torch_xla")
    except importlib.metadata.PackageNotFoundError:
        return None  # a source build: its own torch is the one it was built with
    if _minor(version) != _minor(torch.__version__):
        return (f"torch_xla {version} is built for torch {'.'.join(map(str, _minor(version)))}"
                f".x, this is torch {torch.__version__}")
    return None


@functools.cache
def pallas_unavailable() -> str | None:
    """Why torch_xla's Pallas kernels cannot run here, or None (asked only for calls on an XLA
    device, so torch_xla is imported by then)."""
    missing = xla_unavailable()
    if missing:
        return missing
    import torch_xla.runtime as xr

    kind = xr.device_type()
    if kind != "TPU":
        return f"torch_xla's Pallas kernels need a TPU (the PJRT device is {kind})"
    if importlib.util.find_spec("jax") is None:
        return "jax is not installed (pip install 'torch_xla[pallas]')"
    return None


def pallas_configs(fits: Callable[[Any], list[str]]) -> Callable[[Any], list[dict]]:
    """``configs(problem)`` of an op with a Pallas form: Pallas first where it can run and
    ``fits(problem)`` (the kernel's limits, as reasons) is empty, then the XLA form."""

    def configs(problem: Any) -> list[dict]:
        if pallas_unavailable() is None and not fits(problem):
            return [dict(PALLAS_CONFIG), dict(XLA_CONFIG)]
        return [dict(XLA_CONFIG)]

    return configs


def pallas_reasons(fits: Callable[[Any], list[str]], problem: Any) -> list[str]:
    """Why the Pallas form does not serve ``problem`` (empty: it does)."""
    missing = pallas_unavailable()
    return ([missing] if missing else []) + fits(problem)


def _xla_only(_problem: Any) -> list[dict]:
    return [dict(XLA_CONFIG)]


def xla_backend(impl: str | Callable[..., None], *, dtypes: frozenset,
                entry: str = "run") -> Any:
    """The ``xla`` backend of an op.

    ``impl``: the name of a module of this package (``"flash_attention"``), whose ``entry``
    function ``(call, config)`` runs the op and whose ``supports(problem)`` and
    ``configs(problem)`` state its limits and forms; or a ``run(call, config)`` callable, the
    op's reference when it is XLA-friendly as it is (one form, no limits of its own)."""
    # kpt.ops imports this package while it declares its ops: its modules are imported here.
    from kpt.ops._common import lazy
    from kpt.ops._registry import Backend

    if isinstance(impl, str):
        module = f"{__name__}.{impl}"
        return Backend(name="xla", device_types=XLA_DEVICES, dtypes=dtypes,
                       run=lazy(module, entry), available=xla_unavailable,
                       supports=lazy(module, "supports"), configs=lazy(module, "configs"))
    return Backend(name="xla", device_types=XLA_DEVICES, dtypes=dtypes, run=impl,
                   available=xla_unavailable, configs=_xla_only)
