"""What the autotuner needs of ``moe_route`` and ``fused_moe`` (``kpt.ops._registry.Tuning``):
the calls a HF MoE config's layers make, built on fresh random inputs, and their checks.

``kpt-autotune warmup --model <qwen3_moe / qwen2_moe / mixtral / deepseek_v3 config>`` then
tunes the routing and the experts across backends and tile configs for each token count; a
dense config gives no MoE shapes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from kpt.ops._common import compare

from . import reference as _reference

# A tuned kernel against the reference: the same rounding points, float32 sums in another
# order (an intermediate value straddling a bf16 rounding boundary moves by one unit): one
# unit norm-wise (bf16 2^-8 twice, fp16 2^-10 with its smaller headroom), float32 ~1e-5.
TOLERANCE = {torch.bfloat16: 2**-7, torch.float16: 2**-9, torch.float32: 1e-5}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}


def _experts(config: Mapping[str, Any]) -> int:
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if config.get(key):
            return int(config[key])
    return 0


def shapes_from_hf_config(config: Mapping[str, Any], tokens: list[int]) -> list[dict]:
    """One MoE layer's calls for each token count; [] for a model without routed experts."""
    experts = _experts(config)
    if not experts:
        return []
    hidden = int(config["hidden_size"])
    inter = int(config.get("moe_intermediate_size") or config["intermediate_size"])
    act = str(config.get("hidden_act", "silu"))
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not one fused_moe computes")
    deepseek = config.get("model_type") == "deepseek_v3"
    groups = int(config.get("n_group") or 1) if deepseek else 1
    base = {
        "hidden": hidden, "intermediate": inter, "experts": experts,
        "top_k": int(config["num_experts_per_tok"]), "activation": ACTIVATIONS[act],
        "scoring": str(config.get("scoring_func", "sigmoid" if deepseek else "softmax")),
        "renormalize": bool(config.get("norm_topk_prob", True)),
        "groups": groups, "topk_groups": int(config.get("topk_group") or 1) if groups > 1 else 1,
        "bias": deepseek,
        "scaling": float(config.get("routed_scaling_factor", 1.0)),
    }
    return [dict(base, tokens=int(t)) for t in tokens]


def _rand(gen: torch.Generator, *size: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*size, generator=gen) * scale


def make_route_call(shape: Mapping[str, Any], dtype: torch.dtype, device: torch.device,
                    seed: int = 0):
    from kpt.ops.moe import RouteCall

    gen = torch.Generator(device="cpu").manual_seed(seed)
    t, e, k = shape["tokens"], shape["experts"], shape["top_k"]
    logits = _rand(gen, t, e, scale=2.0).to(device=device, dtype=dtype)
    bias = _rand(gen, e, scale=0.1).to(device) if shape.get("bias") else None
    return RouteCall(logits, k, shape.get("scoring", "softmax"), shape.get("renormalize", True),
                     shape.get("groups", 1), shape.get("topk_groups", 1), bias,
                     shape.get("scaling", 1.0),
                     torch.empty((t, k), dtype=torch.float32, device=device),
                     torch.empty((t, k), dtype=torch.int32, device=device))


def make_call(shape: Mapping[str, Any], dtype: torch.dtype, device: torch.device,
              seed: int = 0):
    """A bf16/fp16 experts call; ids and weights from the reference routing of random logits,
    so the load per expert is what a fresh router gives."""
    from kpt.ops.moe import FusedCall

    gen = torch.Generator(device="cpu").manual_seed(seed)
    t, h, i = shape["tokens"], shape["hidden"], shape["intermediate"]
    e, k = shape["experts"], shape["top_k"]
    x = _rand(gen, t, h).to(device=device, dtype=dtype)
    w13 = _rand(gen, e, 2 * i, h, scale=h**-0.5).to(device=device, dtype=dtype)
    w2 = _rand(gen, e, h, i, scale=i**-0.5).to(device=device, dtype=dtype)
    weights, ids = _reference.route(_rand(gen, t, e, scale=2.0), k)
    return FusedCall(x, w13, w2, weights.to(device), ids.to(device),
                     shape.get("activation", "silu"), "none", None, None, None, None, 0, 0,
                     None, torch.empty((t, h), dtype=dtype, device=device))


def route_problem(call):
    from kpt.ops.moe import route_problem as problem

    return problem(call)


def problem(call):
    from kpt.ops.moe import problem_of

    return problem_of(call)


def poison_route(call) -> None:
    call.weights.fill_(float("nan"))
    call.ids.fill_(-1)


def poison(call) -> None:
    call.out.fill_(float("nan"))


def clone_route_outputs(call):
    return dataclasses.replace(call, weights=torch.empty_like(call.weights),
                               ids=torch.empty_like(call.ids))


def clone_outputs(call):
    return dataclasses.replace(call, out=torch.empty_like(call.out))


def check_route(call, expected) -> str | None:
    if not torch.equal(call.ids, expected.ids):
        return "moe_route: ids differ from the reference's"
    # float32 softmax / sigmoid and a sum of top_k terms: a few float32 units.
    return compare("moe_route.weights", call.weights, expected.weights, 1e-5)


def check(call, expected) -> str | None:
    return compare("fused_moe.out", call.out, expected.out.float(), TOLERANCE[call.x.dtype])
