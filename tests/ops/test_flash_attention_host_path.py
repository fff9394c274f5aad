"""The per-call shortcuts of flash_attention's host path agree with the full checks they skip:
the sm90 layout test (``_layout_ok``) never accepts a layout ``call_reasons`` would reject, and
the dispatch key determines the Problem. Pure Python over CPU tensors: runs everywhere."""

from __future__ import annotations

import itertools

import pytest
import torch

from kpt.ops.flash_attention import Call, _key, _sm90, problem_of


def _views(dtype: torch.dtype) -> list[torch.Tensor]:
    """(B, S, H, D) tensors with aligned and misaligned starts and strides."""
    base = torch.randn(2 * 9 * 5 * 72 + 8).to(dtype)
    out = [base[:2 * 9 * 5 * 64].view(2, 9, 5, 64)]  # dense, aligned
    out.append(base[1:1 + 2 * 9 * 5 * 64].view(2, 9, 5, 64))  # start off by one element
    out.append(base[:2 * 9 * 5 * 72].view(2, 9, 5, 72)[..., :64])  # row stride 72: aligned
    out.append(base[:2 * 9 * 5 * 68].view(2, 9, 5, 68)[..., :64])  # row stride 68: not 16 B
    out.append(base[:2 * 5 * 9 * 64].view(2, 5, 9, 64).transpose(1, 2))  # (B, H, S, D) view
    out.append(base[:2 * 9 * 5 * 66].view(2, 9, 5, 66)[..., :64])  # odd-ish: 66 (4 B only)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sm90_layout_shortcut_never_accepts_a_rejected_layout(dtype):
    views = _views(dtype)
    accepted = rejected = 0
    for q, k, out in itertools.product(views, views[:3], views):
        lse = torch.empty(2, 5, 9)
        call = Call(q, k, k, None, None, 9, 9, 0.125, -1, 0, 0.0, out, lse)
        fast = _sm90._layout_ok(call)
        full = _full_reasons(call)
        if fast:
            assert not full, f"shortcut accepted a layout the full check rejects: {full}"
            accepted += 1
        else:
            rejected += 1
    # both outcomes happen, so the comparison above is exercised
    assert rejected > 0 and (accepted > 0 or dtype == torch.float32)


def _full_reasons(call) -> list[str]:
    """call_reasons without its shortcut."""
    original = _sm90._layout_ok
    try:
        _sm90._layout_ok = lambda call: False
        return _sm90.call_reasons(call)
    finally:
        _sm90._layout_ok = original


def test_dispatch_key_determines_the_problem():
    """Two calls with equal keys have equal problems (the keyed cache may share a decision)."""
    seen: dict[tuple, object] = {}
    for b, s, h, hk, d, left, right, cap in itertools.product(
            (1, 2), (5, 64), (4,), (1, 4), (32, 64), (-1, 3), (-1, 0), (0.0, 5.0)):
        q = torch.randn(b, s, h, d, dtype=torch.bfloat16)
        k = torch.randn(b, s + 1, hk, d, dtype=torch.bfloat16)
        call = Call(q, k, k, None, None, s, s + 1, 0.1, left, right, cap, q, q)
        key, problem = _key(call), problem_of(call)
        assert seen.setdefault(key, problem) == problem
    assert len(seen) == 2 * 2 * 2 * 2 * 2 * 2 * 2
