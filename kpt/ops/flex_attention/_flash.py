"""``flash`` backend of flex_attention: mods that lower to a band and a soft-cap, run through
``kpt.ops.flash_attention``'s own dispatch.

``_lower.py`` recognises the named mods (causal, sliding window, soft-cap, or an equivalent
lambda); when they lower to a band (bottom-right windows) and a soft-cap only, without the
hooks the cuda/hip kernels add for flex (ALiBi slopes, prefix lengths, document ids), the call
is exactly a ``flash_attention`` call. This backend builds that call (``flash.Call`` /
``flash.BackwardCall`` over (B, S, H, D) ``transpose(1, 2)`` views, no copies) and launches
``flash.SPEC`` / ``flash.SPEC_BACKWARD``, which choose backend and config per direction for
the device (autotune database, else flash's priority): on an H200 the TMA Triton or wgmma
forward and the Triton backward, several times faster than flex's own kernels. On cpu flash's
dispatch runs its reference (or its Triton kernels when ``KPT_BACKEND`` asks for them under
``TRITON_INTERPRET=1``).

Geometry (trailing queries that see no key, trailing keys no query sees) is handled by the
helpers shared with the cuda/hip backend (``_cuda.forward_views`` / ``backward_views``).
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from kpt.ops._common import module
from kpt.ops._registry import Config, Problem

from . import _cuda

_FLASH = "kpt.ops.flash_attention"


@functools.cache
def unavailable() -> str | None:
    """Why the backend cannot run here, or None: it needs only flash_attention to import."""
    try:
        importlib.import_module(_FLASH)
    except ImportError as err:
        return f"{_FLASH} does not import ({err})"
    return None


def supports(p: Problem) -> list[str]:
    """The reasons of the cuda/hip backend (block mask, mods, geometry, head dims, k/v batch),
    plus: no flex hooks, since flash_attention takes a band and a soft-cap only. Any head dim
    up to 256 qualifies (flash's dispatch falls back from kernels that need multiples of 8)."""
    low, reasons = _cuda.lowered_reasons(p)
    if low is not None:
        hooks = [name for name, ir in (("ALiBi slopes", low.slopes), ("a prefix", low.prefix),
                                       ("document ids", low.doc)) if ir is not None]
        if hooks:
            reasons.append(f"the mods lower to {', '.join(hooks)}, which flash_attention "
                           "cannot take (only a band and a soft-cap)")
    return reasons


def _strided(t: Tensor) -> str | None:
    """flash_attention's backends read and write any strides with a contiguous last dim (its
    cuda backend copies what its kernels cannot address): only that needs a copy here."""
    return None if t.stride(-1) == 1 else "its last dim is not contiguous"


def run(call, config: Config) -> None:
    """Forward: writes ``call.out`` and ``call.lse`` (flash's lse is flex's: (B, H, Sq) fp32,
    natural log)."""
    flash = module(_FLASH)
    low, geo = _cuda.plan_geometry(call)

    def launch(q, k, v, out, lse):
        fcall = flash.Call(q, k, v, None, None, geo.sq, geo.sk, call.scale, geo.window_left,
                           geo.window_right, low.softcap, out, lse)
        flash.SPEC.launch(flash.problem_of(fcall), fcall)

    _cuda.forward_views(call, geo, launch, _strided)


def backward(call, config: Config) -> None:
    """Backward: writes ``call.dq``, ``call.dk``, ``call.dv``; flash computes its own
    ``rowsum(dout * out) - dlse`` (``call.delta`` is never read)."""
    flash = module(_FLASH)
    low, geo = _cuda.plan_geometry(call)

    def launch(dout, dlse, q, k, v, out, lse, dq, dk, dv):
        bcall = flash.BackwardCall(dout, dlse, q, k, v, out, lse, None, None, geo.sq, geo.sk,
                                   call.scale, geo.window_left, geo.window_right, low.softcap,
                                   torch.are_deterministic_algorithms_enabled(), dq, dk, dv)
        flash.SPEC_BACKWARD.launch(flash.backward_problem_of(bcall), bcall)

    _cuda.backward_views(call, geo, launch, _strided)
