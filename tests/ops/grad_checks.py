"""Gradient checks shared by the attention tests."""

from __future__ import annotations

from torch import Tensor

from kpt.ops._common import compare
from kpt.ops.flash_attention import BACKWARD_TOLERANCE


def compare_grad(name: str, got: Tensor, want: Tensor, *, dout: Tensor, v: Tensor,
                 other: Tensor, scale: float) -> str | None:
    """``compare`` at the op's backward tolerance, except for a gradient that is exactly zero.

    dq and dk vanish exactly when every query sees a single key (softmax is then constant:
    ds = dp - delta = 0). Kernels keep the rounding noise of delta = rowsum(dO * rnd(O)) against
    dp = dO . v summed in another order: |ds| <= u |dO| |v|, times ``scale`` |k| for dq
    (``other`` = k) or |q| for dk (``other`` = q). A relative error against zero means nothing,
    so that case is held to this absolute bound instead.
    """
    u = BACKWARD_TOLERANCE[got.dtype]
    if want.detach().abs().max().item() == 0:
        bound = u * scale * (dout.detach().float().norm(dim=-1).max()
                             * v.detach().float().norm(dim=-1).max()
                             * other.detach().float().norm(dim=-1).max()).item()
        worst = got.detach().float().abs().max().item()
        if worst <= bound:
            return None
        return f"{name}: max |grad| {worst:.3e} where the exact gradient is 0 (bound {bound:.3e})"
    return compare(name, got, want, u)
