"""Mixture-of-experts: routing (``moe_route``) and the fused experts (``fused_moe``).

Equivalent PyTorch (see ``reference.py``)::

    s = softmax(logits) or sigmoid(logits)                # (T, E), float32
    ids = top_k experts of s + correction_bias             # grouped top-k first when asked
    weights = s[ids] (/ their sum) * routed_scaling_factor
    y[t] = sum_j weights[t, j] * W2[e] @ (act(W1[e] @ x[t]) * (W3[e] @ x[t])),  e = ids[t, j]

with ``w13[e]`` = W1 (gate rows 0..I-1) stacked on W3 (up rows I..2I-1), the layout
transformers' fused expert modules use (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)).

Rounding points (every backend): the gate/up products accumulate in float32; ``act(gate) *
up`` is computed in float32 and rounded to x's dtype (the intermediate activations); the down
product accumulates in float32, is scaled by the routing weight and summed over the top-k in
float32, and the sum is rounded once to x's dtype. FP8 experts (float8_e4m3fn, 128x128 block
scales, DeepSeek-V3's format) multiply activations quantised to e4m3 per token in 1x128
blocks (``quantize_fp8(x, "block")``), the intermediate too after its rounding. INT4 experts
use ``int4_gemm``'s layout per expert and are dequantised exactly as it does.

Two registry ops: ``moe_route`` and ``fused_moe``. Backends: ``cuda`` / ``hip`` (csrc/moe, one
source; routing is a warp per token, the experts mma.sync grouped GEMMs on CUDA and a SIMT
path on HIP; bf16/fp16, fp8 and int4 experts), ``triton`` (``_triton.py``: bf16/fp16, fp8 and int4
experts; on the CPU under ``TRITON_INTERPRET=1``) and ``reference`` (any device).

Training: ``moe_route``'s weights are differentiable with respect to ``logits``;
``fused_moe`` has a backward for bf16/fp16/fp32 experts (x, w13, w2 and the routing weights):
Triton kernels (``_triton_backward.py``: no host sync, deterministic) for bf16/fp16 on NVIDIA
GPUs of sm_80+ or when the forward is forced to ``backend="triton"``, else a recomputation in
PyTorch (``_backward.py``: per-expert matmuls, one host sync); see ``backward_impl``.
Quantised experts are inference only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kpt.backends.xla import xla_backend
from kpt.backends.xpu import xpu_backend
from kpt.ops._common import (
    check_tensor,
    dtype_name,
    lazy,
    native_backends,
    plain_eager,
    read_content,
    reference_backend,
    triton_backend,
    triton_unavailable,
)
from kpt.ops._registry import Backend, Op, Problem, Tuning

from . import _tuning
from . import reference as _reference
from .reference import FP8_BLOCK, Alignment, capacity

OP_ROUTE = "moe_route"
OP = "fused_moe"

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
INT4_GROUPS = (32, 64, 128, 256)
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32})
_HALF = frozenset({torch.float16, torch.bfloat16})
_FP8 = getattr(torch, "float8_e4m3fn", None)
_INDEX = (torch.int32, torch.int64)


@dataclass
class RouteCall:
    """A validated ``moe_route`` call: logits (T, E); correction_bias (E,) float32 contiguous
    or None; groups 1 when not grouped; weights (T, top_k) float32 and ids (T, top_k) int32,
    contiguous, written by the backend."""

    logits: Tensor
    top_k: int
    scoring: str
    renormalize: bool
    groups: int
    topk_groups: int
    correction_bias: Tensor | None
    scaling: float
    weights: Tensor
    ids: Tensor


@dataclass
class FusedCall:
    """A validated ``fused_moe`` call (see the module docstring and ``reference.fused``).

    quant "none": w13 (E, 2I, H), w2 (E, H, I) of x's dtype. "fp8": float8_e4m3fn, same
    shapes, w13_scale (E, ceil(2I/128), ceil(H/128)), w2_scale (E, ceil(H/128), ceil(I/128))
    float32. "int4": w13 (E, H//8, 2I), w2 (E, I//8, H) int32 (int4_gemm's packing), scales
    (E, H//group13, 2I) / (E, I//group2, H), zeros uint8 of the same shapes or None.
    ids (T, k) int32 global expert ids; expert_map (E_global,) int32 or None. out (T, H)."""

    x: Tensor
    w13: Tensor
    w2: Tensor
    weights: Tensor
    ids: Tensor
    activation: str
    quant: str
    w13_scale: Tensor | None
    w2_scale: Tensor | None
    w13_zeros: Tensor | None
    w2_zeros: Tensor | None
    group13: int
    group2: int
    expert_map: Tensor | None
    out: Tensor

    @property
    def t(self) -> int:
        return self.x.shape[0]

    @property
    def h(self) -> int:
        return self.x.shape[1]

    @property
    def i(self) -> int:
        return self.w2.shape[2] if self.quant != "int4" else self.w13.shape[2] // 2

    @property
    def e(self) -> int:
        return self.w13.shape[0]

    @property
    def e_global(self) -> int:
        return self.e if self.expert_map is None else self.expert_map.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def route_problem(call: RouteCall) -> Problem:
    t, e = call.logits.shape
    return Problem.of(call.logits.device, call.logits.dtype, t=t, e=e, top_k=call.top_k,
                      scoring=call.scoring, renormalize=call.renormalize, groups=call.groups,
                      topk_groups=call.topk_groups, bias=call.correction_bias is not None)


def problem_of(call: FusedCall) -> Problem:
    return Problem.of(call.x.device, call.x.dtype, t=call.t, h=call.h, i=call.i, e=call.e,
                      e_global=call.e_global, top_k=call.top_k, quant=call.quant,
                      activation=call.activation, ep=call.expert_map is not None)


def _route_bucket(p: Problem) -> str:
    group = f"-g{p['groups']}of{p['topk_groups']}" if p["groups"] > 1 else ""
    return (f"t{_pow2(p['t'])}-e{p['e']}-k{p['top_k']}-{p['scoring']}{group}"
            f"{'-bias' if p['bias'] else ''}")


def _bucket(p: Problem) -> str:
    return (f"t{_pow2(p['t'] * p['top_k'])}-e{p['e']}-h{p['h']}-i{p['i']}-k{p['top_k']}-"
            f"{p['quant']}{'-ep' if p['ep'] else ''}")


# ---- backends ------------------------------------------------------------------------------

_TRITON = f"{__name__}._triton"
ROUTE_BACKENDS = (
    # One kernel source for nvcc and hipcc (csrc/moe); supports() and configs() in _cuda.py.
    *native_backends(f"{__name__}._cuda", dtypes=frozenset(_LOGIT_DTYPES),
                     run_cuda="run_route_cuda", run_hip="run_route_hip",
                     supports="route_supports", configs="route_configs"),
    Backend(name="triton", device_types=frozenset({"cuda", "cpu"}),
            dtypes=frozenset(_LOGIT_DTYPES), run=lazy(_TRITON, "run_route"),
            available=triton_unavailable, supports=lazy(_TRITON, "route_supports"),
            configs=lazy(_TRITON, "route_configs")),
    reference_backend(_reference.run_route, frozenset(_LOGIT_DTYPES)),
    xla_backend("moe", dtypes=frozenset(_LOGIT_DTYPES), entry="run_route"),
    xpu_backend(_TRITON, dtypes=frozenset(_LOGIT_DTYPES),
                supports=lazy(_TRITON, "route_supports"), configs="route_configs",
                entry="run_route"),
)
BACKENDS = (
    triton_backend(_TRITON, dtypes=_HALF, supports=lazy(_TRITON, "supports"),
                   configs="configs"),
    *native_backends(f"{__name__}._cuda", dtypes=_HALF, run_cuda="run_cuda", run_hip="run_hip"),
    reference_backend(_reference.run, _FLOATS),
    xla_backend("moe", dtypes=_FLOATS),
    xpu_backend(_TRITON, dtypes=_HALF, supports=lazy(_TRITON, "supports"), configs="configs"),
)


def _route_example(device: torch.device, dtype: torch.dtype) -> Problem:
    """DeepSeek-V3's router for 16 tokens: 256 experts, sigmoid, 8 of 8 groups' top 4."""
    dtype = dtype if dtype in _LOGIT_DTYPES else torch.float32
    return Problem.of(device, dtype, t=16, e=256, top_k=8, scoring="sigmoid", renormalize=True,
                      groups=8, topk_groups=4, bias=True)


def _example(device: torch.device, dtype: torch.dtype) -> Problem:
    """A Qwen3-30B-A3B expert layer for 16 tokens: 128 experts, top 8, H 2048, I 768."""
    dtype = dtype if dtype in _FLOATS else torch.bfloat16
    return Problem.of(device, dtype, t=16, h=2048, i=768, e=128, e_global=128, top_k=8,
                      quant="none", activation="silu", ep=False)


ROUTE_SPEC = Op(
    name=OP_ROUTE,
    backends=ROUTE_BACKENDS,
    priority={"cuda": ("cuda", "hip", "triton", "reference"), "cpu": ("reference",),
              "xla": ("xla", "reference"), "xpu": ("xpu", "reference")},
    bucket=_route_bucket,
    example=_route_example,
    tuning=Tuning(shapes=_tuning.shapes_from_hf_config, make_call=_tuning.make_route_call,
                  problem=_tuning.route_problem, check=_tuning.check_route,
                  poison=_tuning.poison_route, clone_outputs=_tuning.clone_route_outputs),
)
SPEC = Op(
    name=OP,
    backends=BACKENDS,
    priority={"cuda": ("triton", "cuda", "hip", "reference"), "cpu": ("reference",),
              "xla": ("xla", "reference"), "xpu": ("xpu", "reference")},
    bucket=_bucket,
    example=_example,
    tuning=Tuning(shapes=_tuning.shapes_from_hf_config, make_call=_tuning.make_call,
                  problem=_tuning.problem, check=_tuning.check, poison=_tuning.poison,
                  clone_outputs=_tuning.clone_outputs),
)


# ---- validation ----------------------------------------------------------------------------


def _int_arg(op: str, name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        bound = f"{low} .. {high}" if high is not None else f">= {low}"
        raise ValueError(f"{op}: {name} must be an int in {bound}, got {value!r}")
    return int(value)


def _route_args(logits: Any, top_k: Any, scoring: Any, renormalize: Any, groups: Any,
                topk_groups: Any, bias: Any, scaling: Any) -> tuple[int, int, int,
                                                                     Tensor | None, float]:
    op = OP_ROUTE
    check_tensor(op, "logits", logits, ndim=2, dtypes=_LOGIT_DTYPES)
    e = logits.shape[1]
    if e == 0:
        raise ValueError(f"{op}: logits must have at least one expert column, got shape "
                         f"{tuple(logits.shape)}")
    top_k = _int_arg(op, "top_k", top_k, 1, e)
    if scoring not in SCORINGS:
        raise ValueError(f"{op}: scoring must be one of {SCORINGS}, got {scoring!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"{op}: renormalize must be a bool, got {type(renormalize).__name__}")
    if (groups is None) != (topk_groups is None):
        raise ValueError(f"{op}: num_expert_groups and topk_groups go together (grouped "
                         f"top-k), got {groups!r} and {topk_groups!r}")
    if groups is None:
        groups = topk_groups = 1
    else:
        groups = _int_arg(op, "num_expert_groups", groups, 1, e)
        if e % groups:
            raise ValueError(f"{op}: num_expert_groups = {groups} must divide the {e} experts")
        topk_groups = _int_arg(op, "topk_groups", topk_groups, 1, groups)
        if top_k > topk_groups * (e // groups):
            raise ValueError(f"{op}: top_k = {top_k} exceeds the {topk_groups * (e // groups)} "
                             f"experts of the {topk_groups} kept groups")
    if bias is not None:
        check_tensor(op, "correction_bias", bias, ndim=1, dtypes=tuple(_FLOATS),
                     device=logits.device)
        if bias.shape[0] != e:
            raise ValueError(f"{op}: correction_bias has {bias.shape[0]} elements for {e} "
                             f"experts")
        bias = bias.to(torch.float32).contiguous()
    if (isinstance(scaling, bool) or not isinstance(scaling, (int, float))
            or not math.isfinite(scaling)):
        raise ValueError(f"{op}: routed_scaling_factor must be a finite number, got "
                         f"{scaling!r}")
    return top_k, groups, topk_groups, bias, float(scaling)


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{OP}: {name} has shape {tuple(t.shape)}, expected {shape}")


def _int4_scales(name: str, scale: Any, zeros: Any, e: int, k: int, n: int,
                 dev: torch.device) -> int:
    """The group size an int4 expert weight's scales say (k when per channel)."""
    check_tensor(OP, name, scale, ndim=3, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                 device=dev)
    groups = scale.shape[1]
    if scale.shape[0] != e or scale.shape[2] != n or groups == 0 or k % groups:
        raise ValueError(f"{OP}: {name} of shape {tuple(scale.shape)} must be (E={e}, K / "
                         f"group_size, N={n}) with the group size dividing K = {k}")
    group = k // groups
    if group != k and group not in INT4_GROUPS:
        raise ValueError(f"{OP}: {name} implies group size {group}; int4 experts take "
                         f"{INT4_GROUPS} or per channel (one group)")
    zname = name.replace("scale", "zeros")
    if zeros is not None:
        check_tensor(OP, zname, zeros, ndim=3, dtypes=(torch.uint8,), device=dev)
        _check_shape(zname, zeros, tuple(scale.shape))
    return group


def _fused_args(x: Any, w13: Any, w2: Any, weights: Any, ids: Any, activation: Any,
                w13_scale: Any, w2_scale: Any, w13_zeros: Any, w2_zeros: Any,
                expert_map: Any) -> dict[str, Any]:
    """Checks everything (before any launch) and returns the FusedCall fields but out."""
    check_tensor(OP, "x", x, ndim=2, dtypes=tuple(_FLOATS))
    dev = x.device
    t, h = x.shape
    check_tensor(OP, "w13", w13, ndim=3, device=dev)
    check_tensor(OP, "w2", w2, ndim=3, device=dev)
    if w13.dtype == x.dtype:
        quant = "none"
    elif _FP8 is not None and w13.dtype == _FP8:
        quant = "fp8"
    elif w13.dtype == torch.int32:
        quant = "int4"
    else:
        raise TypeError(f"{OP}: w13 must be x's dtype ({dtype_name(x.dtype)}), float8_e4m3fn "
                        f"(fp8 block-scaled experts) or int32 (int4 experts), got "
                        f"{dtype_name(w13.dtype)}")
    if w2.dtype != w13.dtype:
        raise TypeError(f"{OP}: w2 ({dtype_name(w2.dtype)}) must have w13's dtype "
                        f"({dtype_name(w13.dtype)})")
    e = w13.shape[0]
    if e == 0:
        raise ValueError(f"{OP}: w13 holds no experts")
    group13 = group2 = 0
    if quant == "int4":
        if x.dtype not in _HALF and x.dtype != torch.float32:
            raise TypeError(f"{OP}: int4 experts need float x")
        if w13.shape[1] * 8 != h or w13.shape[2] % 2:
            raise ValueError(f"{OP}: int4 w13 of shape {tuple(w13.shape)} must be (E, H/8 = "
                             f"{h // 8}, 2I) for x's H = {h}")
        i = w13.shape[2] // 2
        if i % 8:
            raise ValueError(f"{OP}: int4 experts need I = {i} to be a multiple of 8")
        _check_shape("w2", w2, (e, i // 8, h))
        for name, t_ in (("w13_scale", w13_scale), ("w2_scale", w2_scale)):
            if t_ is None:
                raise ValueError(f"{OP}: int4 experts need {name}")
        group13 = _int4_scales("w13_scale", w13_scale, w13_zeros, e, h, 2 * i, dev)
        group2 = _int4_scales("w2_scale", w2_scale, w2_zeros, e, i, h, dev)
    else:
        if w13.shape[1] % 2 or w13.shape[1] == 0 or w13.shape[2] != h:
            raise ValueError(f"{OP}: w13 of shape {tuple(w13.shape)} must be (E, 2I, H = {h})")
        i = w13.shape[1] // 2
        _check_shape("w2", w2, (e, h, i))
        if quant == "fp8":
            if i % FP8_BLOCK or h % 16:
                raise ValueError(f"{OP}: fp8 experts need I = {i} to be a multiple of "
                                 f"{FP8_BLOCK} (gate and up rows in separate scale blocks) "
                                 f"and H = {h} of 16")
            for name, scale, rows, cols in (("w13_scale", w13_scale, 2 * i, h),
                                            ("w2_scale", w2_scale, h, i)):
                if scale is None:
                    raise ValueError(f"{OP}: fp8 experts need {name} (128x128 blocks)")
                check_tensor(OP, name, scale, ndim=3, dtypes=(torch.float32,), device=dev)
                _check_shape(name, scale, (e, -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)))
        for name, t_ in (("w13_scale", w13_scale), ("w2_scale", w2_scale)):
            if quant == "none" and t_ is not None:
                raise ValueError(f"{OP}: {name} is for fp8 or int4 experts; w13 is "
                                 f"{dtype_name(w13.dtype)}")
        for name, t_ in (("w13_zeros", w13_zeros), ("w2_zeros", w2_zeros)):
            if t_ is not None:
                raise ValueError(f"{OP}: {name} is for int4 experts")
    check_tensor(OP, "ids", ids, ndim=2, dtypes=_INDEX, device=dev)
    if ids.shape[0] != t or ids.shape[1] == 0:
        raise ValueError(f"{OP}: ids of shape {tuple(ids.shape)} must be (T = {t}, top_k >= 1)")
    check_tensor(OP, "weights", weights, ndim=2, dtypes=tuple(_FLOATS), device=dev)
    _check_shape("weights", weights, tuple(ids.shape))
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    e_global = e
    if expert_map is not None:
        check_tensor(OP, "expert_map", expert_map, ndim=1, dtypes=_INDEX, device=dev)
        e_global = expert_map.shape[0]
        if read_content(expert_map) and expert_map.numel():
            low, high = expert_map.min().item(), expert_map.max().item()
            if low < -1 or high >= e:
                raise ValueError(f"{OP}: expert_map values must be -1 (not local) or local "
                                 f"experts 0..{e - 1}, got {low} .. {high}")
        expert_map = expert_map.to(torch.int32).contiguous()
    if read_content(ids) and ids.numel():
        low, high = ids.min().item(), ids.max().item()
        if low < 0 or high >= e_global:
            raise ValueError(f"{OP}: ids must be experts 0..{e_global - 1}, got {low} .. {high}"
                             f" (on a GPU this is checked only with KPT_CHECK=1)")
    return dict(quant=quant, group13=group13, group2=group2, expert_map=expert_map)


# ---- moe_route -----------------------------------------------------------------------------


def _route_impl(logits: Tensor, top_k: int, scoring: str, renormalize: bool, groups: int,
                topk_groups: int, bias: Tensor | None, scaling: float,
                backend: str) -> tuple[Tensor, Tensor]:
    t = logits.shape[0]
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    call = RouteCall(logits, top_k, scoring, renormalize, groups, topk_groups, bias, scaling,
                     weights, ids)
    key = (logits.device, logits.dtype, t, logits.shape[1], top_k, scoring, renormalize,
           groups, topk_groups, bias is not None)
    ROUTE_SPEC.launch_keyed(key, lambda: route_problem(call), call, backend or None)
    return weights, ids


@torch.library.custom_op("kpt::moe_route", mutates_args=())
def _route_op(logits: Tensor, top_k: int, scoring: str, renormalize: bool, groups: int,
              topk_groups: int, bias: Tensor | None, scaling: float,
              backend: str) -> tuple[Tensor, Tensor]:
    return _route_impl(logits, top_k, scoring, renormalize, groups, topk_groups, bias, scaling,
                       backend)


@_route_op.register_fake
def _(logits, top_k, scoring, renormalize, groups, topk_groups, bias, scaling, backend):
    t = logits.shape[0]
    return (logits.new_empty((t, top_k), dtype=torch.float32),
            logits.new_empty((t, top_k), dtype=torch.int32))


def _route_backward_impl(dweights: Tensor, logits: Tensor, ids: Tensor, scoring: str,
                         renormalize: bool, scaling: float) -> Tensor:
    """d logits: the weights recomputed from the scores at the chosen ids (PyTorch)."""
    with torch.enable_grad():
        z = logits.detach().requires_grad_(True)
        w = _reference.route_weights(_reference.scores(z, scoring), ids, renormalize, scaling)
        (grad,) = torch.autograd.grad(w, z, dweights.to(w.dtype))
    return grad.to(logits.dtype)


def _route_setup(ctx, inputs, output) -> None:
    logits, _top_k, scoring, renormalize, _g, _tg, _bias, scaling, _backend = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.options = (scoring, renormalize, scaling)


def _route_backward(ctx, dweights, _dids):
    logits, ids = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and dweights is not None:
        grad = _route_backward_impl(dweights, logits, ids, *ctx.options)
    return grad, None, None, None, None, None, None, None, None


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


def moe_route(
    logits: Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    num_expert_groups: int | None = None,
    topk_groups: int | None = None,
    correction_bias: Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick ``top_k`` experts per token: ``(weights (T, top_k) float32, ids (T, top_k)
    int32)``, ids in descending order of selection score, ties to the lower expert id.

    Args:
        logits: (T, E) router logits, float32/bf16/fp16 (T may be 0).
        top_k: experts per token, 1..E.
        scoring: ``"softmax"`` over the experts (Mixtral, Qwen-MoE) or ``"sigmoid"`` per
            expert (DeepSeek-V3).
        renormalize: divide the chosen scores by their sum (Qwen3's ``norm_topk_prob``).
        num_expert_groups, topk_groups: grouped top-k (DeepSeek-V3: 8 and 4): a group's score
            is the sum of its two best selection scores, the ``topk_groups`` best groups are
            kept (ties: lower group id) and the experts come from those only.
        correction_bias: (E,) added to the scores for selection only (DeepSeek-V3's
            ``e_score_correction_bias``); the weights are the unbiased scores.
        routed_scaling_factor: multiplies the final weights.
        backend: a backend name; None chooses.

    NaN scores never win a selection (the ids stay valid experts) but propagate into the
    weights. ``weights`` is differentiable with respect to ``logits`` (the ids are not).
    """
    top_k, groups, topk_groups, bias, scaling = _route_args(
        logits, top_k, scoring, renormalize, num_expert_groups, topk_groups, correction_bias,
        routed_scaling_factor)
    if backend is not None:
        ROUTE_SPEC.backend(backend)
    args = (logits, top_k, scoring, renormalize, groups, topk_groups, bias, scaling,
            backend or "")
    if plain_eager(logits, bias) and not (torch.is_grad_enabled() and logits.requires_grad):
        return _route_impl(*args)
    return torch.ops.kpt.moe_route(*args)


# ---- fused_moe -----------------------------------------------------------------------------


def _impl(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor, activation: str,
          quant: str, w13_scale: Tensor | None, w2_scale: Tensor | None,
          w13_zeros: Tensor | None, w2_zeros: Tensor | None, group13: int, group2: int,
          expert_map: Tensor | None, backend: str) -> Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    call = FusedCall(
        x if x.stride(-1) == 1 else x.contiguous(), w13.contiguous(), w2.contiguous(),
        weights.to(torch.float32).contiguous(), ids.to(torch.int32).contiguous(), activation,
        quant, None if w13_scale is None else w13_scale.contiguous(),
        None if w2_scale is None else w2_scale.contiguous(),
        None if w13_zeros is None else w13_zeros.contiguous(),
        None if w2_zeros is None else w2_zeros.contiguous(), group13, group2, expert_map, out)
    key = (x.device, x.dtype, x.shape[0], x.shape[1], tuple(w13.shape), w13.dtype,
           ids.shape[1], activation, group13, group2,
           -1 if expert_map is None else expert_map.shape[0])
    SPEC.launch_keyed(key, lambda: problem_of(call), call, backend or None)
    return out


@torch.library.custom_op("kpt::fused_moe", mutates_args=())
def _fused_op(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor,
              activation: str, quant: str, w13_scale: Tensor | None, w2_scale: Tensor | None,
              w13_zeros: Tensor | None, w2_zeros: Tensor | None, group13: int, group2: int,
              expert_map: Tensor | None, backend: str) -> Tensor:
    return _impl(x, w13, w2, weights, ids, activation, quant, w13_scale, w2_scale, w13_zeros,
                 w2_zeros, group13, group2, expert_map, backend)


@_fused_op.register_fake
def _(x, w13, w2, weights, ids, activation, quant, w13_scale, w2_scale, w13_zeros, w2_zeros,
      group13, group2, expert_map, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fused_setup(ctx, inputs, output) -> None:
    x, w13, w2, weights, ids, activation = inputs[:6]
    expert_map = inputs[13]
    ctx.save_for_backward(x, w13, w2, weights, ids, expert_map)
    ctx.activation = activation
    ctx.backend = inputs[14]


def backward_impl(x: Tensor, backend: str = "") -> str:
    """Which backward ``fused_moe`` runs for experts like ``x``: ``"triton"`` (the kernels of
    ``_triton_backward.py``) for bf16/fp16 on an NVIDIA GPU of sm_80 or newer with a usable
    Triton, or when the forward was forced to the triton backend; else ``"recompute"`` (the
    PyTorch recompute of ``_backward.py``: float32, the CPU, ROCm, where the kernels were not
    run, and a forward forced to the reference backend)."""
    if x.dtype not in _HALF or triton_unavailable() is not None or backend == "reference":
        return "recompute"
    if backend == "triton":
        return "triton"
    if (x.device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(x.device) >= (8, 0)):
        return "triton"
    return "recompute"


def _fused_backward(ctx, dout):
    x, w13, w2, weights, ids, expert_map = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if backward_impl(x, ctx.backend) == "triton":
        from ._triton_backward import backward
    else:
        from ._backward import backward
    dx, dw13, dw2, dweights = backward(dout, x, w13, w2, weights, ids, expert_map,
                                       ctx.activation, needs[:4])
    return (dx, dw13, dw2, dweights) + (None,) * 11


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def fused_moe(
    x: Tensor,
    w13: Tensor,
    w2: Tensor,
    weights: Tensor,
    ids: Tensor,
    *,
    activation: str = "silu",
    w13_scale: Tensor | None = None,
    w2_scale: Tensor | None = None,
    w13_zeros: Tensor | None = None,
    w2_zeros: Tensor | None = None,
    expert_map: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """``y[t] = sum_j weights[t, j] * W2[e] @ (act(W1[e] @ x[t]) * (W3[e] @ x[t]))``, e =
    ``ids[t, j]``: (T, H) of x's dtype.

    Args:
        x: (T, H) bf16/fp16/fp32 tokens (T may be 0). A non-contiguous last dim is copied.
        w13: (E, 2I, H) gate rows then up rows (transformers' ``gate_up_proj``), x's dtype;
            float8_e4m3fn for fp8 experts; int32 (E, H/8, 2I) for int4 experts
            (``pack_int4`` of each expert's (2I, H) weight).
        w2: (E, H, I) (``down_proj``); fp8: same shape; int4: int32 (E, I/8, H).
        weights: (T, top_k) routing weights (``moe_route``'s), any float dtype (read as
            float32).
        ids: (T, top_k) int32/int64 expert ids in 0..E_global-1. Their content is checked on
            the CPU, and on a GPU only with ``KPT_CHECK=1`` (a host sync); unchecked, an id
            out of range counts as an expert not on this rank (the pair adds zero), never as
            an index.
        activation: ``"silu"`` (SwiGLU), ``"gelu"`` (erf) or ``"gelu_tanh"`` (GeGLU).
        w13_scale, w2_scale: fp8: float32 (E, ceil(2I/128), ceil(H/128)) and (E, ceil(H/128),
            ceil(I/128)) 128x128 block scales (I must be a multiple of 128); int4: (E, H/g,
            2I) and (E, I/g, H), g in 32/64/128/256 or one group (per channel).
        w13_zeros, w2_zeros: int4 zero points (uint8, the scales' shapes), None: symmetric.
        expert_map: (E_global,) int ids of this rank's experts (row of w13/w2) or -1; pairs
            routed to other ranks contribute zero (expert parallelism).
        backend: a backend name; None chooses.

    Differentiable (x, w13, w2, weights) for bf16/fp16/fp32 experts; see the module
    docstring for how the backward is computed.
    """
    fields = _fused_args(x, w13, w2, weights, ids, activation, w13_scale, w2_scale, w13_zeros,
                         w2_zeros, expert_map)
    quant = fields["quant"]
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, w13, w2, weights) if t.is_floating_point())
    if grad and quant != "none":
        raise ValueError(f"{OP}: {quant} experts are inference only (no backward); call it "
                         f"under torch.no_grad() or detach the inputs")
    if backend is not None:
        SPEC.backend(backend)
    args = (x, w13, w2, weights, ids, activation, quant, w13_scale, w2_scale, w13_zeros,
            w2_zeros, fields["group13"], fields["group2"], fields["expert_map"], backend or "")
    if not grad and plain_eager(x, w13, w2, weights, ids, w13_scale, w2_scale, expert_map):
        return _impl(*args)
    return torch.ops.kpt.fused_moe(*args)


def align(ids: Tensor, num_experts: int, block_m: int,
          expert_map: Tensor | None = None) -> Alignment:
    """Pairs ``t * top_k + j`` of ``ids`` (T, top_k) grouped by local expert, each expert's
    run padded to a multiple of ``block_m`` (the row tile of a grouped GEMM):
    ``Alignment(sorted_pairs (P,) int32, block_expert (P // block_m,) int32, num_padded (1,)
    int32)`` with P = ``capacity(T * top_k, num_experts, block_m)``. Padding and unused
    entries hold the sentinel ``T * top_k``; blocks past ``num_padded`` have expert -1;
    pairs whose expert ``expert_map`` maps to -1 are dropped. Graph-safe: static shapes, no
    host sync."""
    op = "moe.align"
    check_tensor(op, "ids", ids, ndim=2, dtypes=_INDEX)
    num_experts = _int_arg(op, "num_experts", num_experts, 1)
    block_m = _int_arg(op, "block_m", block_m, 1)
    # int32 entries index the pairs and the padded rows: a capacity past that range (an absurd
    # block_m or expert count) is refused here rather than by the allocator
    cap = capacity(ids.numel(), num_experts, block_m)
    if cap >= 2**31:
        raise ValueError(f"{op}: {ids.numel()} pairs over {num_experts} experts padded to "
                         f"block_m = {block_m} need {cap} entries, past int32")
    e_global = num_experts
    if expert_map is not None:
        check_tensor(op, "expert_map", expert_map, ndim=1, dtypes=_INDEX, device=ids.device)
        e_global = expert_map.shape[0]
        if read_content(expert_map) and expert_map.numel():
            low, high = expert_map.min().item(), expert_map.max().item()
            if low < -1 or high >= num_experts:
                raise ValueError(f"{op}: expert_map values must be -1 (not local) or local "
                                 f"experts 0..{num_experts - 1}, got {low} .. {high}")
    if read_content(ids) and ids.numel():
        low, high = ids.min().item(), ids.max().item()
        if low < 0 or high >= e_global:
            raise ValueError(f"{op}: ids must be experts 0..{e_global - 1}, got {low} .. {high}"
                             f" (on a GPU this is checked only with KPT_CHECK=1)")
    return _reference.align(ids, num_experts, block_m, expert_map)


__all__ = ["moe_route", "fused_moe", "align", "Alignment", "capacity", "RouteCall",
           "FusedCall", "SPEC", "ROUTE_SPEC"]
