"""``flex_attention`` on XLA: the reference itself (``flex_attention/reference.py``: scores in
float32, the traced mods evaluated on broadcast index tensors, the block map applied as a mask,
static chunks of query rows, the product over visible keys without a host read off the CPU),
which traces into one graph per call shape. The backward is autograd through it.

No Pallas form: torch_xla's Pallas flash attention takes a causal flag and segment ids, not
score or mask mods.
"""

from __future__ import annotations

import torch

from kpt.backends.xla import XLA_CONFIG
from kpt.ops._common import module
from kpt.ops.flex_attention import reference as _reference

PALLAS_REASON = ("torch_xla's Pallas flash attention takes a causal flag and segment ids, not "
                 "score_mod / mask_mod")


def supports(_problem) -> list[str]:
    return []


def configs(_problem) -> list[dict]:
    return [dict(XLA_CONFIG)]


def pallas_reason(_problem) -> list[str]:
    return [PALLAS_REASON]


attention = _reference.attention  # static already: visible_matmul reads nothing off the CPU


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
