"""Backward of ``fused_moe`` for bf16/fp16/fp32 experts: the forward recomputed in PyTorch
(one gate/up and one down matmul per expert that received pairs, in the experts' dtype with
float32 sums) and differentiated by autograd. Not a kpt kernel: it costs one host sync (the
per-expert pair counts) and a matmul launch per active expert."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as _reference


def recompute(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor,
              expert_map: Tensor | None, activation: str) -> Tensor:
    """The forward as a differentiable PyTorch graph; float32 (T, H)."""
    t, h = x.shape
    i = w2.shape[2]
    out = x.new_zeros((t, h), dtype=torch.float32)
    if t == 0:
        return out
    k = ids.shape[1]
    local = _reference.local_ids(ids, expert_map, w13.shape[0]).reshape(-1)
    valid = local >= 0
    key = torch.where(valid, local, w13.shape[0])
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=w13.shape[0] + 1).tolist()
    start = 0
    w_flat = weights.reshape(-1).float()
    for e, n in enumerate(counts[:-1]):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tok = pairs // k
        hid = x[tok] @ w13[e].t()
        a = (_reference.activate(hid[:, :i].float(), activation) * hid[:, i:].float())
        y = a.to(x.dtype) @ w2[e].t()
        out = out.index_add(0, tok, y.float() * w_flat[pairs, None])
    return out


def backward(dout: Tensor, x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor,
             expert_map: Tensor | None, activation: str,
             needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """(dx, dw13, dw2, dweights), None where ``needs`` says no gradient is wanted."""
    inputs = (x, w13, w2, weights)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(need)) for t, need in zip(inputs, needs)]
        out = recompute(*leaves, ids, expert_map, activation)
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, dout.float(), allow_unused=True)
                     if wanted and out.requires_grad else [None] * len(wanted))
    result = []
    for t, need in zip(inputs, needs):
        g = next(grads) if need else None
        if need and g is None:
            g = torch.zeros_like(t)
        result.append(None if g is None else g.to(t.dtype))
    return tuple(result)
