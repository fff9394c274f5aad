"""Merging attention computed over disjoint parts of the keys (cascade attention's combine step).

Attention over keys ``A ∪ B`` from the parts: with natural-log logsumexps ``lse_a``, ``lse_b``
(flash_attention's ``return_lse`` convention: float32, -inf where a part has no visible key)::

    lse = logaddexp(lse_a, lse_b)
    o   = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b        # 0 where lse = -inf

in float32, rounded once to the outputs' dtype. ``cascade_attention`` itself (shared-prefix
levels over a paged cache) is not implemented yet; this is the piece it merges with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kpt.ops._common import check_tensor

OP = "merge_attention_states"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _validate(op: str, o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> None:
    check_tensor(op, "o_a", o_a, dtypes=_FLOATS)
    if o_a.dim() < 2:
        raise ValueError(f"{op}: o_a must be (..., H, D), got shape {tuple(o_a.shape)}")
    check_tensor(op, "o_b", o_b, dtypes=(o_a.dtype,), device=o_a.device)
    if o_b.shape != o_a.shape:
        raise ValueError(f"{op}: o_a {tuple(o_a.shape)} and o_b {tuple(o_b.shape)} differ")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        check_tensor(op, name, lse, dtypes=(torch.float32,), device=o_a.device)
        if lse.shape != o_a.shape[:-1]:
            raise ValueError(f"{op}: {name} must be shaped like o without its last dim, "
                             f"{tuple(o_a.shape[:-1])}, got {tuple(lse.shape)}")


def _merge(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    lse = torch.logaddexp(lse_a, lse_b)
    # Where both parts are empty lse is -inf: shift by 0 there so no (-inf) - (-inf) NaN forms.
    finite = torch.isfinite(lse)
    shift = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - shift), torch.zeros_like(lse))
    w_b = torch.where(finite, torch.exp(lse_b - shift), torch.zeros_like(lse))
    o = w_a[..., None] * o_a.float() + w_b[..., None] * o_b.float()
    return o.to(o_a.dtype), lse


def merge_attention_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor,
                           lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """(o, lse) of attention over both parts' keys; o (..., H, D), lse (..., H) float32 (for
    flash_attention's varlen lse (H, T), pass ``lse.T``). Device ops only: graph-capturable."""
    _validate(OP, o_a, lse_a, o_b, lse_b)
    return _merge(o_a, lse_a, o_b, lse_b)


def merge_attention_states_(o_a: Tensor, lse_a: Tensor, o_b: Tensor,
                            lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """In place: the merged state replaces ``o_a`` and ``lse_a``, which are returned."""
    _validate(OP + "_", o_a, lse_a, o_b, lse_b)
    o, lse = _merge(o_a, lse_a, o_b, lse_b)
    o_a.copy_(o)
    lse_a.copy_(lse)
    return o_a, lse_a


__all__ = ["merge_attention_states", "merge_attention_states_"]
