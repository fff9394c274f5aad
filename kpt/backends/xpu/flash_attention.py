"""``flash_attention`` forward through IPEX's CPU flash-attention kernel
(``torch.ops.torch_ipex.flash_attention``: (B, H, S, D) inputs, returns out and the natural-log
lse, which kpt's op needs for its backward and ``return_lse``).

Masks: none, or causal on square scores, go to the kernel's own ``is_causal`` (top-left, which is
bottom-right when Sq = Sk); any other causal or sliding window becomes a boolean mask built from
the same rule as the reference. Queries that see no key come back NaN from the kernel and are
set to out 0, lse -inf. GQA repeats the kv heads. Varlen calls run one kernel call per sequence
(the CPU op reads ``cu_seqlens`` on the host anyway, in validation). No soft-cap: the kernel has
none.

The kernel multiplies the keys and values a query cannot see by 0, so a NaN or inf among them
would reach every row; the reference's rule is that masked keys take no part. A call whose k or
v holds a non-finite value (one pass over them tells) therefore runs the reference.

``ipex.llm.functional.varlen_attention`` is not used: on the CPU (IPEX 2.8) it pads into torch's
SDPA, ignores ``softmax_scale`` and returns no lse. On XPU devices the op's Triton kernels serve
(IPEX's llm attention APIs document no lse output on any device).

Measured 2026-12-06 on this project's 2-core CPU machine, shared with other jobs, so over
several runs (IPEX 2.8.0, torch 2.8.0, causal, Hq 8 / Hkv 2; ``tests/xpu/timings.py``): S=1024
D=64 bf16 7.9-16x the reference's speed, fp32 6.4-15x; B=4 S=256 D=128 bf16 1-8.6x; S=64 bf16
3-4.8x. Hence ``xpu`` before the reference in flash_attention's CPU priority.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kpt.backends.xpu import ipex_ops
from kpt.ops.flash_attention import reference

DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def supports(p) -> list[str]:
    if p.device_type != "cpu":
        return ["IPEX's XPU attention ops return no lse (the Triton kernels serve XPU devices)"]
    return ["soft-cap: IPEX's CPU flash attention has none"] if p["softcap"] else []


def _visible(sq: int, sk: int, left: int, right: int) -> Tensor:
    rows = torch.arange(sq)[:, None] + (sk - sq)
    cols = torch.arange(sk)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        visible &= cols <= rows + right
    if left >= 0:
        visible &= cols >= rows - left
    return visible


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, left: int,
           right: int) -> tuple[Tensor, Tensor]:
    """q (B, Sq, H, D), k and v (B, Sk, Hkv, D) -> out (B, Sq, H, D), lse (B, H, Sq)."""
    if not bool(torch.isfinite(k).all() and torch.isfinite(v).all()):
        # The kernel multiplies the keys and values a query cannot see by 0, so a NaN or inf
        # there would reach it; the reference's rule is that they take no part. Such calls (one
        # pass over k and v tells) run the reference.
        return reference.attention_forward(q, k, v, None, None, scale, left, right, 0.0)
    sq, sk, heads = q.shape[1], k.shape[1], q.shape[2]
    group = heads // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    flash = ipex_ops().flash_attention
    if left < 0 and (right < 0 or (right == 0 and sq == sk)):
        out, lse = flash(q, k, v, 0.0, right == 0, scale=scale)
        return out.transpose(1, 2), lse
    visible = _visible(sq, sk, left, right)
    out, lse = flash(q, k, v, 0.0, False, attention_mask=visible[None, None], scale=scale)
    dead = ~visible.any(-1)  # (Sq,): rows the kernel leaves NaN
    out = out.masked_fill(dead[None, None, :, None], 0.0)
    lse = lse.masked_fill(dead[None, None, :], float("-inf"))
    return out.transpose(1, 2), lse


def run(call, config: dict) -> None:
    left, right = call.window_left, call.window_right
    if call.cu_seqlens_q is None:
        out, lse = attend(call.q, call.k, call.v, call.scale, left, right)
        call.out.copy_(out)
        call.lse.copy_(lse)
        return
    # Varlen: call.out / call.lse come zeroed / -inf for tokens outside every sequence.
    cq, ck = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        (q0, q1), (k0, k1) = (cq[b], cq[b + 1]), (ck[b], ck[b + 1])
        if q1 == q0:
            continue
        if k1 == k0:  # no key at all: out 0, lse -inf, as allocated
            continue
        out, lse = attend(call.q[None, q0:q1], call.k[None, k0:k1], call.v[None, k0:k1],
                          call.scale, left, right)
        call.out[q0:q1] = out[0]
        call.lse[:, q0:q1] = lse[0]
