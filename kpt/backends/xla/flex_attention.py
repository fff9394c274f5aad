"""``flex_attention`` on XLA: the reference's math (``flex_attention/reference.py``: scores in
float32, the traced mods evaluated on broadcast index tensors, the block map applied as a mask,
static chunks of query rows) with the product over visible keys in static shapes
(:func:`._attention.visible_product`: the reference's skips non-finite values with a
data-dependent branch, a host read on XLA). The backward is autograd through it.

No Pallas form: torch_xla's Pallas flash attention takes a causal flag and segment ids, not
score or mask mods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kpt.backends.xla import XLA_CONFIG
from kpt.ops._common import module

from ._attention import visible_product

PALLAS_REASON = ("torch_xla's Pallas flash attention takes a causal flag and segment ids, not "
                 "score_mod / mask_mod")
_CHUNK_ELEMENTS = 1 << 24


def supports(_problem) -> list[str]:
    return []


def configs(_problem) -> list[dict]:
    return [dict(XLA_CONFIG)]


def pallas_reason(_problem) -> list[str]:
    return [PALLAS_REASON]


def attention(q: Tensor, k: Tensor, v: Tensor, score_fn: Callable | None,
              mask_fn: Callable | None, scale: float, blocks: Tensor | None,
              block_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """As ``reference.attention``: (out in q's dtype, lse float32) for (B, H, S, D) inputs."""
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
        keep = torch.ones((), dtype=torch.bool, device=dev)
        if mask_fn is not None:
            keep = mask_fn(b, h, q_idx, kv_idx)
            keep = keep.to(torch.bool) if isinstance(keep, Tensor) else \
                torch.tensor(bool(keep), device=dev)
        if blocks is not None:
            qb = (q_idx // block_size[0]).view(-1)
            kb = (kv_idx // block_size[1]).view(-1)
            keep = keep & (blocks[:, :, qb][..., kb] != 0)
        s = torch.where(keep, s, float("-inf")).expand(B, H, stop - start, skv)
        # Fully masked rows: a zero row keeps softmax and logsumexp's backward finite.
        dead = (s == float("-inf")).all(dim=-1, keepdim=True)
        safe = torch.where(dead, 0.0, s)
        p = torch.softmax(safe, dim=-1) * (~dead)
        lses.append(torch.where(dead.squeeze(-1), float("-inf"), torch.logsumexp(safe, dim=-1)))
        outs.append(visible_product(p, keep.expand(p.shape), vv))
    out = torch.cat(outs, dim=2).to(q.dtype)
    lse = torch.cat(lses, dim=2)
    return out, lse.float() if wp == torch.float32 else lse


def _kwargs(call) -> dict:
    """The reference's arguments for this call (the mods as evaluated IR, the dense blocks)."""
    kwargs = module("kpt.ops.flex_attention")._reference_kwargs(call)
    return dict(score_fn=kwargs["score_fn"], mask_fn=kwargs["mask_fn"], scale=kwargs["scale"],
                blocks=kwargs["blocks"], block_size=kwargs["block_size"])


def run(call, config: dict) -> None:
    out, lse = attention(call.q, call.k, call.v, **_kwargs(call))
    call.out.copy_(out)
    call.lse.copy_(lse)


def backward(call, config: dict) -> None:
    """dq, dk, dv by autograd through :func:`attention` (the reference's backward is autograd
    through its own forward)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (call.q, call.k, call.v)]
        out, lse = attention(*leaves, **_kwargs(call))
        outputs, grads = [out], [call.dout]
        if call.dlse is not None:
            outputs.append(lse)
            grads.append(call.dlse.to(lse.dtype))
        dq, dk, dv = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    for out_t, grad, like in ((call.dq, dq, call.q), (call.dk, dk, call.k),
                              (call.dv, dv, call.v)):
        out_t.copy_(torch.zeros_like(like) if grad is None else grad)
