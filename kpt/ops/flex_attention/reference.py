"""The specification of ``flex_attention`` in plain PyTorch.

For every (b, h, i, j)::

    s = (q[b, h] . k[b, h // G, j]) * scale           # float32 (float64 for float64 inputs)
    s = score_mod(s, b, h, i, j)                      # if given
    s = -inf  where not mask_mod(b, h, i, j) or block (i // BQ, j // BKV) is not listed
    lse[b, h, i] = logsumexp_j s                      # natural log; -inf for a fully masked row
    out[b, h, i] = sum_j exp(s - lse) * v[b, h // G, j]   # 0 for a fully masked row

like torch's ``flex_attention`` (its eager math path), except that the sum runs over the keys
the masks keep: a NaN or inf value of a masked key never reaches a row (torch's math path
multiplies it by 0: NaN). In float32 a score overflows where the kernels' does: they take
``s * log2(e)`` (float32) into the exp2 domain, so a finite ``s`` whose product is +-inf counts
as +-inf here too. A +inf score then gives lse +inf and out NaN, even beside NaN scores (the
kernels' running maximum skips NaN, so they cannot tell; torch's logsumexp would give NaN
there), and a row whose scores are all -inf is a fully masked one.

The mods are evaluated with broadcasting index tensors ``b (B,1,1,1), h (1,H,1,1),
q_idx (1,1,C,1), kv_idx (1,1,1,Skv)`` instead of vmap, over chunks of C query rows, so memory
stays bounded. Everything is differentiable with torch autograd, which is the reference
backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kpt.ops._common import visible_matmul

_CHUNK_ELEMENTS = 1 << 24
_LOG2E = 1.4426950408889634


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    score_fn: Callable | None,
    mask_fn: Callable | None,
    scale: float,
    blocks: Tensor | None = None,
    block_size: tuple[int, int] = (128, 128),
) -> tuple[Tensor, Tensor]:
    """(out in q's dtype, lse float32) for (B, H, S, D) inputs; k/v may have H // G heads.

    ``blocks``: (Bm, Hm, NQ, NKV) int8 block map (0 = skipped) with batch/head dims 1 or B/H.
    """
    B, H, sq, _ = q.shape
    skv = k.shape[2]
    group = H // k.shape[1]
    wp = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k.to(wp).repeat_interleave(group, dim=1).expand(B, -1, -1, -1)
    vv = v.to(wp).repeat_interleave(group, dim=1).expand(B, -1, -1, -1)
    dev = q.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    kv_idx = torch.arange(skv, device=dev).view(1, 1, 1, skv)
    rows = max(1, _CHUNK_ELEMENTS // max(1, B * H * skv))
    outs, lses = [], []
    for start in range(0, sq, rows):
        stop = min(sq, start + rows)
        q_idx = torch.arange(start, stop, device=dev).view(1, 1, -1, 1)
        s = (q[:, :, start:stop].to(wp) @ kk.transpose(-1, -2)) * scale
        if score_fn is not None:
            s = score_fn(s, b, h, q_idx, kv_idx).to(wp)
        if wp == torch.float32:  # overflow in the kernels' exp2 domain (module doc)
            s2 = s * _LOG2E
            s = torch.where(torch.isinf(s2), s2, s)
        keep = torch.ones((), dtype=torch.bool, device=dev)
        if mask_fn is not None:
            keep = mask_fn(b, h, q_idx, kv_idx)
            keep = keep.to(torch.bool) if isinstance(keep, Tensor) else torch.tensor(bool(keep))
        if blocks is not None:
            qb = (q_idx // block_size[0]).view(-1)
            kb = (kv_idx // block_size[1]).view(-1)
            keep = keep & (blocks[:, :, qb][..., kb] != 0)
        s = torch.where(keep.to(dev), s, torch.tensor(float("-inf"), dtype=wp, device=dev))
        s = s.expand(B, H, stop - start, skv)
        # A fully masked row would give NaN in softmax and in logsumexp's backward; compute on a
        # zero row instead and zero its weights, which keeps the gradients finite.
        dead = (s == float("-inf")).all(dim=-1, keepdim=True)
        safe = torch.where(dead, torch.zeros((), dtype=wp, device=dev), s)
        p = torch.softmax(safe, dim=-1) * (~dead)
        lse = torch.where(dead.squeeze(-1), float("-inf"), torch.logsumexp(safe, dim=-1))
        lse = torch.where((s == float("inf")).any(dim=-1), float("inf"), lse)  # module doc
        outs.append(visible_matmul(p, keep.to(dev), vv))  # masked values never reach a row
        lses.append(lse)
    out = torch.cat(outs, dim=2).to(q.dtype)
    lse = torch.cat(lses, dim=2)
    return out, lse.float() if wp == torch.float32 else lse


def backward(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor, dlse: Tensor | None, **kwargs
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v by autograd through :func:`attention` (the reference backward)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out, lse = attention(*leaves, **kwargs)
        outputs, grads = [out], [dout]
        # lse depends on no input when the score_mod ignores the score (a pure positional
        # bias): then it carries no gradient and is left out.
        if dlse is not None and lse.requires_grad:
            outputs.append(lse)
            grads.append(dlse.to(lse.dtype))
        dq, dk, dv = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip((dq, dk, dv), (q, k, v)))
