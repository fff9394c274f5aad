"""transformers' sparse MoE blocks through kpt's ``moe_route`` + ``fused_moe``.

transformers 5 stores a block's experts fused, ``experts.gate_up_proj`` (E, 2I, H) with the gate
rows first and ``experts.down_proj`` (E, H, I): ``fused_moe``'s ``w13`` / ``w2`` as they are.
The patch keeps the block, its router (``gate``) and every parameter, and overrides two
forwards on the instances:

* the router's: logits as HF computes them (its dtype rule), then ``moe_route`` with the model's
  routing; it returns HF's ``(router_logits, weights, ids)``, so the hooks transformers records
  ``router_logits`` with (``output_router_logits``, the load-balancing loss) still fire;
* the block's: ``kpt.nn.moe.moe_forward``: the router module, one ``fused_moe`` over the
  experts' own parameters, plus the model's shared expert (HF's module, run as it is) and its
  sigmoid gate where there is one.

Routing per family (the routers' own attributes, read when patching):

* qwen3_moe, qwen2_moe: softmax top-k, renormalised if ``norm_topk_prob``; logits in the
  input's dtype.
* mixtral: softmax top-k, renormalised; logits in the input's dtype.
* deepseek_v3: sigmoid scores, ``e_score_correction_bias`` added for the choice only, top-k
  inside the ``topk_group`` best of ``n_group`` groups, renormalised if ``norm_topk_prob``,
  times ``routed_scaling_factor``; logits in float32.

Where HF rounds differently: Qwen's routers round the weights to the model dtype and HF's
experts add each expert's share into a bf16/fp16 sum; ``fused_moe`` keeps the weights in float32
and rounds each token's sum once. DeepSeek-V3 renormalises by ``sum + 1e-20``, kpt by the sum
(sigmoid scores are positive: no difference beyond an ulp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kpt.integrations._undo import Bound, Restore
from kpt.nn.moe import Routing, moe_forward
from kpt.nn.quantized import HF_EXPERTS_LAYOUT, QuantizedExperts
from kpt.ops.moe import ACTIVATIONS

# transformers' activation classes (experts.act_fn) -> fused_moe's activation.
_ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu",
                "GELU": "gelu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                "NewGELUActivation": "gelu_tanh"}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Family:
    """One model family's sparse block: its class, where the routing options live on its
    router, and its optional parts (attribute names on the block / router)."""

    block: str
    scoring: str = "softmax"
    renormalize: str | bool = "norm_topk_prob"  # a router attribute, or a constant
    grouped: bool = False  # n_group / topk_group / routed_scaling_factor on the router
    router_dtype: torch.dtype | None = None
    bias: str | None = None  # the router's correction-bias buffer
    shared: str | None = None
    shared_gate: str | None = None
    jitter: bool = False  # the block's training-time jitter_noise (Mixtral)


FAMILIES = {
    "qwen3_moe": Family("Qwen3MoeSparseMoeBlock"),
    "qwen2_moe": Family("Qwen2MoeSparseMoeBlock", shared="shared_expert",
                        shared_gate="shared_expert_gate"),
    "mixtral": Family("MixtralSparseMoeBlock", renormalize=True, jitter=True),
    "deepseek_v3": Family("DeepseekV3MoE", scoring="sigmoid", grouped=True,
                          router_dtype=torch.float32, bias="e_score_correction_bias",
                          shared="shared_experts"),
}

WHAT = {
    "qwen3_moe": "sparse MoE block: router (softmax top-k) -> kpt moe_route, experts -> "
                 "fused_moe",
    "qwen2_moe": "sparse MoE block: router (softmax top-k) -> kpt moe_route, experts -> "
                 "fused_moe; HF's shared expert and its sigmoid gate added",
    "mixtral": "sparse MoE block: router (softmax top-k, renormalised) -> kpt moe_route, "
               "experts -> fused_moe",
    "deepseek_v3": "MoE block: router (sigmoid, grouped top-k, correction bias, scaling) -> "
                   "kpt moe_route, experts -> fused_moe; HF's shared experts added",
}


@dataclass(frozen=True)
class Plan:
    """What a patched block and its router need per call (picklable, copied with the model)."""

    routing: Routing
    activation: str
    backend: str | None = None
    bias: str | None = None
    shared: str | None = None
    shared_gate: str | None = None
    jitter: bool = False


def _routing(family: Family, gate: nn.Module) -> Routing:
    renormalize = (family.renormalize if isinstance(family.renormalize, bool)
                   else bool(getattr(gate, family.renormalize)))
    if not family.grouped:
        return Routing(int(gate.top_k), family.scoring, renormalize,
                       router_dtype=family.router_dtype)
    return Routing(int(gate.top_k), family.scoring, renormalize, int(gate.num_group),
                   int(gate.topk_group), float(gate.routed_scaling_factor), family.router_dtype)


def family_of(block: nn.Module) -> tuple[str, Family] | None:
    name = type(block).__name__
    return next(((mt, f) for mt, f in FAMILIES.items() if f.block == name), None)


def _float_experts(experts: nn.Module, weight: Any) -> list[str] | tuple[tuple[int, str | None],
                                                                        list[str]]:
    """((E, activation), reasons) of a transformers 5 fused experts module with float
    weights, or the reasons it is not one."""
    reasons = []
    w13, w2 = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not all(isinstance(t, Tensor) and t.dim() == d for t, d in ((w13, 3), (w2, 3),
                                                                 (weight, 2))):
        return ["experts without 3-D gate_up_proj / down_proj or a router without a 2-D "
                "weight (quantized or another layout)"]
    e, two_i, h = w13.shape
    if w2.shape != (e, h, two_i // 2) or two_i % 2 or weight.shape != (e, h):
        reasons.append(f"expert shapes gate_up_proj {tuple(w13.shape)}, down_proj "
                       f"{tuple(w2.shape)}, router {tuple(weight.shape)} are not (E, 2I, H), "
                       f"(E, H, I), (E, H)")
    if w13.dtype not in _FLOATS or w2.dtype != w13.dtype:
        reasons.append(f"expert weights {w13.dtype}/{w2.dtype} (float experts only)")
    for attr, want in HF_EXPERTS_LAYOUT:
        if getattr(experts, attr, want) != want:
            reasons.append(f"experts.{attr} is {getattr(experts, attr)!r}")
    act = type(getattr(experts, "act_fn", None)).__name__
    activation = _ACTIVATIONS.get(act)
    if activation not in ACTIVATIONS:
        reasons.append(f"expert activation {act} (kpt: silu, gelu, gelu_tanh)")
    return (e, activation), reasons


def describe(block: nn.Module, family: Family | None = None,
             backend: str | None = None) -> tuple[Plan, dict[str, nn.Module]] | list[str]:
    """(the plan, ``{"gate", "experts", "shared", "shared_gate": module}``) of a sparse MoE
    block, or the reasons kpt cannot run it."""
    if family is None:
        found = family_of(block)
        if found is None:
            return [f"not a supported MoE block (supported: "
                    f"{sorted(f.block for f in FAMILIES.values())})"]
        family = found[1]
    if type(block).__name__ != family.block:
        return [f"a {type(block).__name__} (dense), not a {family.block}"]
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if gate is None or experts is None:
        return ["no gate (router) or no experts"]
    reasons = []
    weight = getattr(gate, "weight", None)
    if isinstance(experts, QuantizedExperts):  # patch(quantize=...) swapped them in
        e = experts.num_experts
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (e, experts.hidden_dim):
            return [f"a router weight of shape {tuple(getattr(weight, 'shape', ()))} for "
                    f"{e} quantized experts of hidden size {experts.hidden_dim}"]
        activation = experts.activation
    else:
        found = _float_experts(experts, weight)
        if isinstance(found, list):
            return found
        (e, activation), reasons = found[0], found[1]
    parts: dict[str, nn.Module] = {"gate": gate, "experts": experts}
    for key, attr in (("shared", family.shared), ("shared_gate", family.shared_gate)):
        if attr is not None:
            if getattr(block, attr, None) is None:
                reasons.append(f"no {attr}")
            else:
                parts[key] = getattr(block, attr)
    if family.bias is not None and not isinstance(getattr(gate, family.bias, None), Tensor):
        reasons.append(f"router has no {family.bias}")
    try:
        routing = _routing(family, gate)
    except (AttributeError, TypeError, ValueError) as err:
        return [*reasons, f"router options: {err}"]
    reasons += routing.reasons(e)
    if reasons:
        return reasons
    plan = Plan(routing, activation, backend, family.bias, family.shared, family.shared_gate,
                family.jitter)
    return plan, parts


def _router_forward(gate: nn.Module, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A patched router: HF's ``(router_logits, weights, ids)`` through ``moe_route`` (weights
    float32, ids int32)."""
    plan: Plan = gate._kpt_moe
    bias = None if plan.bias is None else getattr(gate, plan.bias)
    x = hidden_states.reshape(-1, gate.weight.shape[-1])
    return plan.routing(x, gate.weight, bias, plan.backend)


def _block_forward(block: nn.Module, hidden_states: Tensor) -> Tensor:
    """A patched sparse block: HF's router module (hooks included), ``fused_moe`` over the
    experts' own parameters, the shared expert (and gate) where the model has one."""
    plan: Plan = block._kpt_moe
    experts = block.experts
    if isinstance(experts, QuantizedExperts):
        w13, w2, quantized = experts.operands()
    else:
        w13, w2, quantized = experts.gate_up_proj, experts.down_proj, None
    y, _ = moe_forward(
        hidden_states, block.gate, w13, w2, activation=plan.activation, quantized=quantized,
        shared=getattr(block, plan.shared) if plan.shared else None,
        shared_gate=getattr(block, plan.shared_gate) if plan.shared_gate else None,
        jitter_noise=float(block.jitter_noise) if plan.jitter and block.training else 0.0,
        backend=plan.backend)
    return y


def patch_block(model: nn.Module, block: nn.Module, config: Any,
                backend: str | None) -> Restore | list[str]:
    """Patch-table entry: run ``block`` (a ``FAMILIES[config.model_type]`` block) through kpt;
    the reasons it cannot, otherwise the undo record."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        return [f"no MoE family for model_type {getattr(config, 'model_type', None)!r}"]
    found = describe(block, family, backend)
    if isinstance(found, list):
        return found
    plan, parts = found
    gate = parts["gate"]
    block._kpt_moe = gate._kpt_moe = plan
    gate.forward = Bound(_router_forward, gate)
    block.forward = Bound(_block_forward, block)
    return Restore(_unpatch_block, block, gate)


def _unpatch_block(block: nn.Module, gate: nn.Module) -> None:
    for module in (block, gate):
        vars(module).pop("forward", None)
        vars(module).pop("_kpt_moe", None)
