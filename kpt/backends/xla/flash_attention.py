"""``flash_attention`` on XLA: torch_xla's Pallas flash attention (TPU), else static-shape
attention (:mod:`._attention`); the backward is autograd through the static form.

Varlen calls pad each sequence to ``max_seqlen_q`` / ``max_seqlen_k`` slots (which the op has
as ints: the graph depends on them, not on ``cu_seqlens``' content), attend, and gather the
rows back; tokens outside every sequence get out 0, lse -inf and zero gradients, as in the
reference.

The Pallas kernel (``torch_xla.experimental.custom_kernel``'s ``fa_custom_forward``, JAX's TPU
flash attention) serves batched calls without a mask or with a causal one on square scores
(its causal mask is top-left aligned), no soft-cap and sequence lengths that are multiples of
its 128-row blocks; kv heads are repeated for GQA. It returns the softmax's row max ``m`` and
sum ``l``, so lse = m + log(l). Unverified without a TPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kpt.backends.xla import pallas_configs, pallas_reasons

from ._attention import attend, pad, unpad_index

_PALLAS_BLOCK = 128


def pallas_fits(p) -> list[str]:
    """The Pallas kernel's limits, as reasons."""
    reasons = []
    if p["varlen"]:
        reasons.append("varlen (the Pallas kernel takes a padded batch)")
    if p["softcap"]:
        reasons.append("soft-cap")
    if p["mask"] == "window" or (p["mask"] == "causal" and p["seqlen_q"] != p["seqlen_k"]):
        reasons.append("masks other than none or causal on square scores")
    if p["seqlen_q"] % _PALLAS_BLOCK or p["seqlen_k"] % _PALLAS_BLOCK:
        reasons.append(f"sequence lengths not multiples of {_PALLAS_BLOCK}")
    return reasons


def supports(_problem) -> list[str]:
    return []


configs = pallas_configs(pallas_fits)


def pallas_reason(problem) -> list[str]:
    return pallas_reasons(pallas_fits, problem)


def forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor | None, cu_k: Tensor | None,
            max_q: int, max_k: int, scale: float, left: int, right: int,
            softcap: float) -> tuple[Tensor, Tensor]:
    """(out float32 like q, lse float32 (B, H, Sq) or (H, Tq)) in static shapes."""
    options = dict(scale=scale, left=left, right=right, softcap=softcap)
    if cu_q is None:
        sq, sk = q.shape[1], k.shape[1]
        pos = torch.arange(sq, device=q.device) + (sk - sq)
        return attend(q, k, v, pos.expand(q.shape[0], sq), **options)
    cq, ck = cu_q.to(torch.int64), cu_k.to(torch.int64)
    len_q, len_k = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    qp, q_ok = pad(q, cq[:-1], len_q, max_q)
    kp, _ = pad(k, ck[:-1], len_k, max_k)
    vp, _ = pad(v, ck[:-1], len_k, max_k)
    pos = torch.arange(max_q, device=q.device)[None, :] + (len_k - len_q)[:, None]
    out_p, lse_p = attend(qp, kp, vp, pos, k_len=len_k, q_valid=q_ok, **options)
    seq, index, inside = unpad_index(cu_q, q.shape[0])
    index = index.clamp(0, max(max_q - 1, 0))
    out = torch.where(inside[:, None, None], out_p[seq, index], 0.0)
    lse = torch.where(inside[None, :], lse_p[seq, :, index].transpose(0, 1), float("-inf"))
    return out, lse


def _pallas(call) -> tuple[Tensor, Tensor]:
    from torch_xla.experimental.custom_kernel import fa_custom_forward

    group = call.q.shape[2] // call.k.shape[2]
    q = call.q.transpose(1, 2)
    k = call.k.repeat_interleave(group, dim=2).transpose(1, 2)
    v = call.v.repeat_interleave(group, dim=2).transpose(1, 2)
    causal = call.window_right == 0
    # ctx_grad all True: the kernel then returns its residuals l and m, which give the lse.
    outs = fa_custom_forward(q, k, v, causal, None, None, call.scale, None, "None", "None",
                             [True, True, True])
    out, row_sum, row_max = outs[0], outs[4], outs[5]
    return out.transpose(1, 2), row_max + torch.log(row_sum)


def run(call, config: dict) -> None:
    if config.get("kernel") == "pallas":
        out, lse = _pallas(call)
    else:
        out, lse = forward(call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k,
                           call.max_seqlen_q, call.max_seqlen_k, call.scale, call.window_left,
                           call.window_right, call.softcap)
    call.out.copy_(out)
    call.lse.copy_(lse)


def run_backward(call, config: dict) -> None:
    """dq, dk, dv by autograd through :func:`forward` (float32, rounded once at the end, as
    the reference backward)."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(True) for t in (call.q, call.k, call.v))
        out, lse = forward(q, k, v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q,
                           call.max_seqlen_k, call.scale, call.window_left, call.window_right,
                           call.softcap)
        outputs, grads = [out], [call.dout.float()]
        if call.dlse is not None:
            # lse is -inf where a row sees no key; its gradient there must not reach anything.
            outputs.append(torch.where(torch.isfinite(lse), lse, 0.0))
            grads.append(call.dlse.float())
        dq, dk, dv = torch.autograd.grad(outputs, (q, k, v), grads, allow_unused=True)
    for out, grad in ((call.dq, dq), (call.dk, dk), (call.dv, dv)):
        if grad is None:
            out.zero_()
        else:
            out.copy_(grad)
