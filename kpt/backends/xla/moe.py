"""``moe_route`` and ``fused_moe`` on XLA.

Routing: the reference as it is (softmax/sigmoid, two stable sorts, a gather): static shapes.

Experts: a static form of the reference. The reference gathers each expert's tokens (a host
read of which experts were hit, then a data-dependent gather); XLA needs shapes that do not
depend on the routing. Here every local expert runs on every token and a (T, E) combine matrix
(the routing weights where a pair chose the expert, 0 elsewhere) weights its output: E matmul
pairs of T rows, a static Python loop over the experts that traces into one graph. That costs
E / top_k times the reference's FLOPs, fine for the modest T of a TPU decode step or a test and
what dense TPU MoE layers do; the rounding points are the reference's (the intermediate
activations rounded to x's dtype, fp8 inputs quantised 1x128, float32 sums). Tokens with no
local expert get zeros. A NaN produced by an expert that a token did not choose is masked out
(``where``, not a product), as the reference never computes it.

No Pallas form: torch_xla ships no grouped-GEMM / MoE kernel.
"""

from __future__ import annotations

import torch

from kpt.backends.xla import XLA_CONFIG
from kpt.ops.moe import reference as _reference

PALLAS_REASON = "torch_xla ships no grouped-GEMM (MoE) Pallas kernel"


def pallas_reason(_problem) -> list[str]:
    return [PALLAS_REASON]


def supports(_problem) -> list[str]:
    return []


def configs(_problem) -> list[dict]:
    return [dict(XLA_CONFIG)]


def run_route(call, config: dict) -> None:
    _reference.run_route(call, config)


def run(call, config: dict) -> None:
    x = call.x
    t, h = x.shape
    i, experts = call.i, call.e
    local = _reference.local_ids(call.ids, call.expert_map, experts)  # (T, k), -1: not local
    weights = call.weights.float()
    xin = _reference._quantize_rows(x) if call.quant == "fp8" else x.float()
    out = torch.zeros((t, h), dtype=torch.float32, device=x.device)
    for e in range(experts):
        chosen = local == e  # (T, k)
        weight = torch.where(chosen, weights, torch.zeros_like(weights)).sum(-1, keepdim=True)
        hit = chosen.any(-1, keepdim=True)
        w13, w2 = _reference.expert_weights(call, e, x.dtype)
        hid = xin @ w13.float().t()
        a = (_reference.activate(hid[:, :i], call.activation) * hid[:, i:]).to(x.dtype)
        a = _reference._quantize_rows(a) if call.quant == "fp8" else a.float()
        y = a @ w2.float().t()
        out = out + torch.where(hit, y * weight, torch.zeros_like(y))
    call.out.copy_(out.to(x.dtype))
