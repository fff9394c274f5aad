"""``MoE``: a sparse mixture-of-experts feed-forward block over ``moe_route`` + ``fused_moe``.

``y = sum_k weights[t, k] * W2[e] @ (act(W1[e] @ x[t]) * (W3[e] @ x[t]))`` over the ``top_k``
experts ``e = ids[t, k]`` that the router picks from ``logits = x @ router_weight.T``, plus an
optional dense shared expert (``+ sigmoid(x @ shared_gate.T) * shared(x)`` when gated). The
routing covers Mixtral / Qwen (softmax top-k, optionally renormalised) and DeepSeek-V3 (sigmoid
scores, grouped top-k, a correction bias that shifts the choice only, a scaling factor): see
``kpt.ops.moe.moe_route``. ``MoE.from_hf(block)`` wraps a transformers sparse MoE block, reusing
its parameters (the fused ``gate_up_proj`` (E, 2I, H) / ``down_proj`` (E, H, I) of transformers
5 are ``fused_moe``'s ``w13`` / ``w2`` layout: no copy).

Both ops are differentiable (the experts, the input and, through the routing weights, the
router), so the block trains; the expert choice itself (top-k) has no gradient, as in HF.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kpt.ops.moe import ACTIVATIONS, SCORINGS, fused_moe, moe_route

_ACT_FNS = {"silu": F.silu, "gelu": F.gelu,
            "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}


@dataclass(frozen=True)
class Routing:
    """How a router turns hidden states into (logits, weights, ids): ``moe_route``'s arguments
    plus the dtype the logits are computed in (``None``: the input's, as Mixtral and Qwen do;
    DeepSeek-V3 computes them in float32)."""

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    num_expert_groups: int | None = None
    topk_groups: int | None = None
    routed_scaling_factor: float = 1.0
    router_dtype: torch.dtype | None = None

    def reasons(self, num_experts: int) -> list[str]:
        """Why this routing cannot run over ``num_experts`` experts (empty if it can)."""
        out = []
        if not 1 <= self.top_k <= num_experts:
            out.append(f"top_k {self.top_k} not in 1..{num_experts} (the number of experts)")
        if self.scoring not in SCORINGS:
            out.append(f"scoring {self.scoring!r} not in {SCORINGS}")
        groups = self.num_expert_groups or 1
        if groups > 1:
            topk_groups = self.topk_groups or groups
            if num_experts % groups:
                out.append(f"{num_experts} experts do not split into {groups} groups")
            elif not 1 <= topk_groups <= groups:
                out.append(f"topk_groups {topk_groups} not in 1..{groups}")
            elif self.top_k > topk_groups * num_experts // groups:
                out.append(f"top_k {self.top_k} > the {topk_groups * num_experts // groups} "
                           f"experts of {topk_groups} kept groups")
        return out

    def __call__(self, x: Tensor, weight: Tensor, correction_bias: Tensor | None = None,
                 backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` (T, H), ``weight`` (E, H) -> (logits (T, E), weights (T, top_k) float32,
        ids (T, top_k) int32)."""
        if self.router_dtype is None:
            logits = F.linear(x, weight)
        else:
            logits = F.linear(x.to(self.router_dtype), weight.to(self.router_dtype))
        groups = self.num_expert_groups if (self.num_expert_groups or 1) > 1 else None
        weights, ids = moe_route(
            logits, self.top_k, scoring=self.scoring, renormalize=self.renormalize,
            num_expert_groups=groups, topk_groups=(self.topk_groups or groups) if groups else None,
            correction_bias=correction_bias,
            routed_scaling_factor=self.routed_scaling_factor, backend=backend)
        return logits, weights, ids


def moe_forward(x: Tensor, router: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
                w13: Tensor, w2: Tensor, *, activation: str = "silu",
                shared: Callable[[Tensor], Tensor] | None = None,
                shared_gate: Callable[[Tensor], Tensor] | None = None,
                jitter_noise: float = 0.0, backend: str | None = None,
                quantized: dict[str, Tensor | None] | None = None) -> tuple[Tensor, Tensor]:
    """One MoE block: ``x`` (..., H) -> (y shaped like ``x``, router logits (T, E)).

    ``router(x2d)`` returns (logits, weights, ids) (a ``Routing`` bound to its weights, or a
    patched HF router module, whose forward hooks then record the logits as HF's do);
    ``shared`` / ``shared_gate`` are callables on (T, H) (HF's own modules when patched);
    ``jitter_noise`` > 0 multiplies the input by uniform noise in [1 - j, 1 + j] first
    (Mixtral's training-time ``router_jitter_noise``, drawn exactly as HF draws it);
    ``quantized``: ``fused_moe``'s scale/zero-point arguments when ``w13`` / ``w2`` are fp8 or
    int4 (``QuantizedExperts.operands()``)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if jitter_noise > 0:
        x2 = x2 * torch.empty_like(x2).uniform_(1.0 - jitter_noise, 1.0 + jitter_noise)
    logits, weights, ids = router(x2)
    y = fused_moe(x2, w13, w2, weights, ids, activation=activation, backend=backend,
                  **(quantized or {}))
    if shared is not None:
        s = shared(x2)
        if shared_gate is not None:
            s = torch.sigmoid(shared_gate(x2)) * s
        y = y + s
    return y.view(shape), logits


class GatedMLP(nn.Module):
    """A dense gated MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))`` (the shared expert; the
    names are HF's)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype, "bias": False}
        self.activation = activation
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(_ACT_FNS[self.activation](self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Router + routed experts (+ shared expert) over ``moe_route`` and ``fused_moe``.

    Parameters: ``router_weight`` (E, H); ``w13`` (E, 2I, H), gate rows then up rows; ``w2``
    (E, H, I); with ``correction_bias=True`` a float32 buffer ``correction_bias`` (E,) that
    shifts the expert choice only (DeepSeek-V3's ``e_score_correction_bias``, learnt outside
    the gradient); with ``shared_intermediate_size`` a ``GatedMLP`` ``shared_experts`` and, with
    ``shared_gate=True``, ``shared_gate`` (an ``nn.Linear(H, 1)``, Qwen2-MoE's sigmoid gate).

    ``forward(x)`` takes (..., H) and returns y of the same shape, or ``(y, router_logits)``
    with ``return_router_logits=True`` (for a load-balancing loss). The routed experts run in
    ``x``'s dtype with float32 accumulation and one rounding per token (``fused_moe``); float32
    runs on the reference backend only. ``backend`` forces a kpt backend for both ops.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        scoring: str = "softmax",
        renormalize: bool = True,
        num_expert_groups: int | None = None,
        topk_groups: int | None = None,
        correction_bias: bool = False,
        routed_scaling_factor: float = 1.0,
        router_dtype: torch.dtype | None = None,
        activation: str = "silu",
        shared_intermediate_size: int = 0,
        shared_gate: bool = False,
        jitter_noise: float = 0.0,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                           ("num_experts", num_experts), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got "
                             f"{activation!r}")
        if shared_gate and not shared_intermediate_size:
            raise ValueError(f"{name}: shared_gate needs a shared expert "
                             f"(shared_intermediate_size > 0)")
        self.routing = Routing(top_k, scoring, renormalize, num_expert_groups, topk_groups,
                               float(routed_scaling_factor), router_dtype)
        reasons = self.routing.reasons(num_experts)
        if reasons:
            raise ValueError(f"{name}: " + "; ".join(reasons))
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.activation = num_experts, activation
        self.jitter_noise, self.backend = float(jitter_noise), backend
        self.router_weight = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size,
                                            **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size,
                                           **factory))
        self.register_buffer("correction_bias", torch.zeros(
            num_experts, device=device, dtype=torch.float32) if correction_bias else None)
        self.shared_experts = (GatedMLP(hidden_size, shared_intermediate_size, activation,
                                        **factory) if shared_intermediate_size else None)
        self.shared_gate = (nn.Linear(hidden_size, 1, bias=False, **factory) if shared_gate
                            else None)
        if self.w13.device.type != "meta":
            for weight, fan_in in ((self.router_weight, hidden_size), (self.w13, hidden_size),
                                   (self.w2, intermediate_size)):
                nn.init.normal_(weight, std=fan_in**-0.5)

    @classmethod
    def from_hf(cls, block: nn.Module, backend: str | None = None) -> MoE:
        """A ``MoE`` over a transformers 5 sparse MoE block (``Qwen3MoeSparseMoeBlock``,
        ``Qwen2MoeSparseMoeBlock`` with its gated shared expert, ``MixtralSparseMoeBlock``,
        ``DeepseekV3MoE`` with its shared experts), holding the block's own parameters (and
        shared-expert modules): training one trains the other. Routing, logits dtype and
        activation follow the block (see ``kpt.integrations._hf_moe``); raises ``ValueError``
        naming what is not supported."""
        from kpt.integrations import _hf_moe

        found = _hf_moe.describe(block)
        if isinstance(found, list):
            raise ValueError(f"MoE.from_hf: {type(block).__name__}: " + "; ".join(found))
        plan, parts = found
        gate, experts = parts["gate"], parts["experts"]
        if not isinstance(getattr(experts, "gate_up_proj", None), Tensor):
            raise ValueError(f"MoE.from_hf: {type(block).__name__}: its experts are "
                             f"{type(experts).__name__} (quantized, inference only): MoE holds "
                             f"float parameters; the patched block runs them as they are")
        e, two_i, h = experts.gate_up_proj.shape
        r = plan.routing
        module = cls(h, two_i // 2, e, r.top_k, scoring=r.scoring, renormalize=r.renormalize,
                     num_expert_groups=r.num_expert_groups, topk_groups=r.topk_groups,
                     correction_bias=plan.bias is not None,
                     routed_scaling_factor=r.routed_scaling_factor, router_dtype=r.router_dtype,
                     activation=plan.activation,
                     jitter_noise=getattr(block, "jitter_noise", 0.0) if plan.jitter else 0.0,
                     backend=backend, device="meta")
        module.router_weight = gate.weight
        module.w13, module.w2 = experts.gate_up_proj, experts.down_proj
        if plan.bias is not None:
            module.correction_bias = getattr(gate, plan.bias)
        module.shared_experts = parts.get("shared")
        module.shared_gate = parts.get("shared_gate")
        return module.train(block.training)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` (T, H) -> (logits (T, E), weights (T, top_k) float32, ids (T, top_k) int32)."""
        return self.routing(x, self.router_weight, self.correction_bias, self.backend)

    def forward(self, x: Tensor, return_router_logits: bool = False) -> Any:
        y, logits = moe_forward(
            x, self.route, self.w13, self.w2, activation=self.activation,
            shared=self.shared_experts, shared_gate=self.shared_gate,
            jitter_noise=self.jitter_noise if self.training else 0.0, backend=self.backend)
        return (y, logits) if return_router_logits else y

    def extra_repr(self) -> str:
        r = self.routing
        text = (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"experts={self.num_experts}, top_k={r.top_k}, scoring={r.scoring}, "
                f"renormalize={r.renormalize}, activation={self.activation}")
        if (r.num_expert_groups or 1) > 1:
            text += f", groups={r.topk_groups}/{r.num_expert_groups}"
        if r.routed_scaling_factor != 1.0:
            text += f", scaling={r.routed_scaling_factor}"
        return text
