"""Fused (residual add +) RMSNorm -> QKV projection -> per-head q/k RMSNorm -> RoPE.

Equivalent PyTorch (HF eager Llama / Qwen2 / Qwen3 attention input path), see ``reference.py``::

    h = x + residual                       # if residual is given; h is the new residual
    xn = norm_weight * rms_norm(h)         # float32 statistics, cast, then weight multiply
    q, k, v = split(xn @ qkv_weight.T + qkv_bias)
    q, k = q_norm_weight * rms_norm(q), k_norm_weight * rms_norm(k)   # per head, if given
    q, k = rope(q, positions), rope(k, positions)                     # first rotary_dim dims

Differentiable in every floating input; the backward (``_backward.py``) is one PyTorch
implementation, whichever backend ran the forward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kpt.backends.xla import xla_backend
from kpt.backends.xpu import xpu_backend
from kpt.ops._common import (
    _mode_active,
    check_tensor,
    compare,
    lazy,
    native_backends,
    plain_eager,
    triton_interpreting,
    triton_unavailable,
)
from kpt.ops._registry import Backend, Op, Problem, Tuning, _env_backend

from . import reference as _reference
from ._backward import rmsnorm_qkv_rope_backward

OP = "rmsnorm_qkv_rope"
_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32})


@dataclass
class Call:
    """A validated call: 2-D inputs (last dim contiguous), parameters and allocated outputs."""

    x: Tensor
    residual: Tensor | None
    norm_weight: Tensor
    qkv_weight: Tensor
    qkv_bias: Tensor | None
    q_norm_weight: Tensor | None
    k_norm_weight: Tensor | None
    positions: Tensor
    inv_freq: Tensor
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    eps: float
    neox: bool
    q: Tensor
    k: Tensor
    v: Tensor
    residual_out: Tensor | None

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    @property
    def hidden(self) -> int:
        return self.x.shape[1]


# ---- backends ------------------------------------------------------------------------------


def _common_kernel_limits(p: Problem) -> list[str]:
    reasons = []
    if p["head_dim"] % 2 or p["head_dim"] > 256:
        reasons.append(f"head_dim {p['head_dim']} must be even and <= 256")
    return reasons


def _triton_supports(p: Problem) -> list[str]:
    reasons = _common_kernel_limits(p)
    if p.device_type == "cpu" and not triton_interpreting():
        reasons.append("on cpu, triton runs only under TRITON_INTERPRET=1")
    return reasons


def _triton_available() -> str | None:
    return triton_unavailable()


def _cuda_supports(p: Problem) -> list[str]:
    reasons = _common_kernel_limits(p)
    if p["hidden"] % 8:
        reasons.append(f"hidden size {p['hidden']} must be a multiple of 8 (16-byte loads)")
    if p["head_dim"] % 8:
        reasons.append(f"head_dim {p['head_dim']} must be a multiple of 8 (16-byte loads)")
    from ._cuda import MAX_HIDDEN  # plain Python: importing it builds nothing

    if p["hidden"] > MAX_HIDDEN:
        reasons.append(f"hidden size {p['hidden']} > {MAX_HIDDEN} (a row is held in registers)")
    return reasons


BACKENDS = (
    *native_backends(f"{__name__}._cuda", dtypes=_HALF, run_cuda="run_cuda",
                     run_hip="run_hip", supports=_cuda_supports,
                     fast=("fast_cuda", "fast_hip")),
    Backend(
        name="triton",
        device_types=frozenset({"cuda", "cpu"}),
        dtypes=_FLOATS,
        run=lazy(f"{__name__}._triton", "run"),
        available=_triton_available,
        supports=_triton_supports,
        configs=lazy(f"{__name__}._triton", "configs"),
    ),
    Backend(
        name="reference",
        device_types=frozenset({"cuda", "cpu", "xla", "xpu", "mps"}),
        dtypes=_FLOATS,
        run=_reference.run,
    ),
    xla_backend("rmsnorm_qkv_rope", dtypes=_FLOATS),
    xpu_backend(f"{__name__}._triton", dtypes=_FLOATS, supports=_triton_supports,
                configs="configs", ipex="rmsnorm_qkv_rope", cpu=True),
)


def _pow2_bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _bucket(p: Problem) -> str:
    flags = "".join(
        tag for tag, on in (("r", p["residual"]), ("b", p["bias"]), ("n", p["qk_norm"])) if on
    )
    return (
        f"T{_pow2_bucket(p['tokens'])}-h{p['hidden']}-q{p['num_q_heads']}-kv{p['num_kv_heads']}"
        f"-d{p['head_dim']}-rd{p['rotary_dim']}-{'neox' if p['neox'] else 'gptj'}"
        f"-{flags or 'plain'}"
    )


# ---- tuning and testing hooks -------------------------------------------------------------

# Kernels keep the reference's rounding points; they differ from it only in the GEMM's summation
# order, which can flip the rounding of a projected value by one unit in the last place (u).
# Norm-wise that stays well under one u, so the tolerance is one u of the dtype: bf16 2^-8,
# fp16 2^-11; fp32 runs Triton's dot in tf32 (u = 2^-11) summed over thousands of terms.
TOLERANCE = {torch.bfloat16: 2**-8, torch.float16: 2**-10, torch.float32: 4e-3}


def rope_from_hf_config(config: Mapping[str, Any]) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling, partial_rotary_factor) from a HF config dict, v4 or v5 style.

    transformers v5 keeps them in ``rope_parameters``; v4 configs (and most config.json files
    on the hub) have top-level ``rope_theta`` and ``rope_scaling``.
    """
    params = dict(config.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    partial = float(params.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    scaling = params or config.get("rope_scaling") or None
    return theta, scaling, partial


def shapes_from_hf_config(config: Mapping[str, Any], tokens: list[int]) -> list[dict]:
    """The shapes one decoder layer of a HF model config runs, for each token count."""
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    qk_norm = config.get("model_type") in ("qwen3", "qwen3_moe")
    theta, scaling, partial = rope_from_hf_config(config)
    base = {
        "hidden": hidden,
        "num_q_heads": heads,
        "num_kv_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": head_dim,
        "rotary_dim": int(head_dim * partial),
        "bias": bool(config.get("attention_bias", False)),
        "qk_norm": qk_norm,
        "residual": True,
        "neox": True,
        "eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
    }
    return [dict(base, tokens=t) for t in tokens]


def make_call(shape: Mapping[str, Any], dtype: torch.dtype, device: torch.device,
              seed: int = 0) -> Call:
    """A call on fresh random inputs (never zeros) with outputs allocated."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        t = torch.randn(*size, generator=gen) * scale + shift
        return t.to(device=device, dtype=dtype)

    tokens, hidden, d = shape["tokens"], shape["hidden"], shape["head_dim"]
    nq, nkv = shape["num_q_heads"], shape["num_kv_heads"]
    n_out = (nq + 2 * nkv) * d
    x = rand(tokens, hidden)
    residual = rand(tokens, hidden) if shape.get("residual") else None
    qk = shape.get("qk_norm")
    rotary_dim = shape.get("rotary_dim", d)
    positions = torch.randint(0, 8192, (tokens,), generator=gen).to(device)
    return Call(
        x=x,
        residual=residual,
        norm_weight=rand(hidden, scale=0.1, shift=1.0),
        qkv_weight=rand(n_out, hidden, scale=hidden**-0.5),
        qkv_bias=rand(n_out, scale=0.1) if shape.get("bias") else None,
        q_norm_weight=rand(d, scale=0.1, shift=1.0) if qk else None,
        k_norm_weight=rand(d, scale=0.1, shift=1.0) if qk else None,
        positions=positions,
        inv_freq=rope_inv_freq(rotary_dim, shape.get("rope_theta", 10000.0),
                               shape.get("rope_scaling"), device),
        num_q_heads=nq,
        num_kv_heads=nkv,
        head_dim=d,
        rotary_dim=rotary_dim,
        eps=float(shape.get("eps", 1e-6)),
        neox=bool(shape.get("neox", True)),
        q=x.new_empty(tokens, nq, d),
        k=x.new_empty(tokens, nkv, d),
        v=x.new_empty(tokens, nkv, d),
        residual_out=x.new_empty(tokens, hidden) if residual is not None else None,
    )


def clone_outputs(call: Call) -> Call:
    """The same inputs with freshly allocated outputs."""
    return dataclasses.replace(
        call,
        q=torch.empty_like(call.q),
        k=torch.empty_like(call.k),
        v=torch.empty_like(call.v),
        residual_out=None if call.residual_out is None else torch.empty_like(call.residual_out),
    )


def _outputs(call: Call) -> list[tuple[str, Tensor]]:
    outs = [("q", call.q), ("k", call.k), ("v", call.v)]
    if call.residual_out is not None:
        outs.append(("residual", call.residual_out))
    return outs


def poison(call: Call) -> None:
    for _, t in _outputs(call):
        t.fill_(float("nan"))


def check(call: Call, expected: Call) -> str | None:
    tol = TOLERANCE[call.x.dtype]
    for (name, out), (_, ref) in zip(_outputs(call), _outputs(expected)):
        reason = compare(f"{OP}.{name}", out, ref, tol)
        if reason:
            return reason
    return None


SPEC = Op(
    name=OP,
    backends=BACKENDS,
    priority={
        "cuda": ("cuda", "hip", "triton", "reference"),
        "cpu": ("xpu", "reference"),  # xpu: IPEX's kernels where installed (bf16: 2-13x)
        "xla": ("xla", "reference"),
        "xpu": ("xpu", "reference"),
        "mps": ("reference",),
    },
    bucket=_bucket,
    tuning=Tuning(
        shapes=shapes_from_hf_config,
        make_call=make_call,
        problem=lambda call: problem_of(call),
        check=check,
        poison=poison,
        clone_outputs=clone_outputs,
    ),
)


def problem_of(call: Call) -> Problem:
    return Problem.of(
        call.x.device,
        call.x.dtype,
        tokens=call.tokens,
        hidden=call.hidden,
        num_q_heads=call.num_q_heads,
        num_kv_heads=call.num_kv_heads,
        head_dim=call.head_dim,
        rotary_dim=call.rotary_dim,
        neox=call.neox,
        residual=call.residual is not None,
        bias=call.qkv_bias is not None,
        qk_norm=call.q_norm_weight is not None,
    )


# ---- RoPE frequencies ----------------------------------------------------------------------

_ROPE_TYPES = ("default", "linear", "llama3")


def _scaling_key(rope_scaling: Mapping[str, Any] | None) -> tuple:
    if rope_scaling is None:
        return ("default",)
    if not isinstance(rope_scaling, Mapping):
        raise TypeError(f"{OP}: rope_scaling must be a dict (HF's rope_scaling) or None, got "
                        f"{type(rope_scaling).__name__}")
    if not rope_scaling:
        return ("default",)
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind == "default":
        return ("default",)
    if kind == "linear":
        return ("linear", _positive(rope_scaling, kind, "factor"))
    if kind == "llama3":
        key = ("llama3", *(_positive(rope_scaling, kind, name) for name in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")))
        if key[2] >= key[3]:
            raise ValueError(f"{OP}: rope_scaling llama3 needs low_freq_factor < "
                             f"high_freq_factor, got {key[2]} and {key[3]}")
        return key
    raise ValueError(f"{OP}: rope_scaling type {kind!r} is not supported (one of {_ROPE_TYPES})")


def _positive(rope_scaling: Mapping[str, Any], kind: str, name: str) -> float:
    """``rope_scaling[name]`` as a finite float > 0, else a ValueError naming the key."""
    if name not in rope_scaling:
        raise ValueError(f"{OP}: rope_scaling of type {kind!r} needs {name!r}")
    value = rope_scaling[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{OP}: rope_scaling[{name!r}] must be a finite number > 0, got "
                         f"{value!r}")
    return float(value)


@functools.lru_cache(maxsize=64)
def _inv_freq_cpu(rotary_dim: int, theta: float, scaling: tuple) -> Tensor:
    # Same float32 expression as HF's default RoPE init, so the frequencies match bit for bit.
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling[0] == "linear":
        inv_freq = inv_freq / scaling[1]
    elif scaling[0] == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band in
        # between interpolated linearly in 1/wavelength.
        factor, low, high, original = scaling[1:]
        wavelen = 2 * math.pi / inv_freq
        slowed = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * slowed / factor + smooth * slowed
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = torch.where(medium, blended, slowed)
    return inv_freq


_INV_FREQ_DEVICE: dict[tuple, Tensor] = {}


def rope_inv_freq(
    rotary_dim: int,
    theta: float,
    rope_scaling: Mapping[str, Any] | None,
    device: torch.device,
) -> Tensor:
    """float32 inverse frequencies (rotary_dim/2,), cached per device (warm up before capture)."""
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim <= 0 \
            or rotary_dim % 2:
        raise ValueError(f"{OP}: rotary_dim must be a positive even int, got {rotary_dim!r}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ValueError(f"{OP}: rope_theta must be a finite number > 0, got {theta!r}")
    key = (rotary_dim, theta, _scaling_key(rope_scaling), device)
    cached = _INV_FREQ_DEVICE.get(key)
    if cached is None:  # a NaN theta never matches a key: it always lands here, and fails
        if not (math.isfinite(theta) and theta > 0):
            raise ValueError(f"{OP}: rope_theta must be a finite number > 0, got {theta!r}")
        key = (rotary_dim, float(theta), key[2], device)
        cached = _inv_freq_cpu(rotary_dim, float(theta), key[2]).to(device)
        _INV_FREQ_DEVICE[key] = cached
    return cached


# ---- validation ----------------------------------------------------------------------------


def _validate(
    x: Tensor,
    norm_weight: Tensor,
    qkv_weight: tuple[Tensor, ...],
    positions: Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    eps: float,
    qkv_bias: tuple[Tensor, ...],
    q_norm_weight: Tensor | None,
    k_norm_weight: Tensor | None,
    residual: Tensor | None,
    rope_style: str,
) -> None:
    check_tensor(OP, "x", x, dtypes=tuple(_FLOATS))
    if x.dim() < 2:
        raise ValueError(f"{OP}: x must be (..., hidden) with at least 2 dims, "
                         f"got {tuple(x.shape)}")
    dev, dtype, hidden = x.device, x.dtype, x.shape[-1]
    for name, value in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("rotary_dim", rotary_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{OP}: {name} must be a positive int, got {value!r}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{OP}: num_q_heads ({num_q_heads}) must be a multiple of "
                         f"num_kv_heads ({num_kv_heads})")
    if rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"{OP}: rotary_dim ({rotary_dim}) must be even and <= head_dim "
                         f"({head_dim})")
    if x.shape[-1] == 0:
        raise ValueError(f"{OP}: x must have a hidden size > 0, got shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps > 0
                                     and math.isfinite(eps)):
        raise ValueError(f"{OP}: eps must be a positive finite number, got {eps!r}")
    if rope_style not in ("neox", "gptj"):
        raise ValueError(f"{OP}: rope_style must be 'neox' or 'gptj', got {rope_style!r}")
    n_out = (num_q_heads + 2 * num_kv_heads) * head_dim
    check_tensor(OP, "norm_weight", norm_weight, ndim=1, dtypes=(dtype,), device=dev)
    if norm_weight.shape[0] != hidden:
        raise ValueError(f"{OP}: norm_weight has {norm_weight.shape[0]} elements, x has hidden "
                         f"size {hidden}")
    if not qkv_weight:
        raise ValueError(f"{OP}: qkv_weight is an empty sequence")
    for part in qkv_weight:
        check_tensor(OP, "qkv_weight", part, ndim=2, dtypes=(dtype,), device=dev)
        if part.shape[1] != hidden:
            raise ValueError(f"{OP}: qkv_weight rows must have hidden={hidden} columns, got "
                             f"{tuple(part.shape)}")
    rows = sum(part.shape[0] for part in qkv_weight)
    if rows != n_out:
        raise ValueError(f"{OP}: qkv_weight must be ((num_q_heads + 2*num_kv_heads)*head_dim, "
                         f"hidden) = {(n_out, hidden)}, got {rows} rows")
    for part in qkv_bias:
        check_tensor(OP, "qkv_bias", part, ndim=1, dtypes=(dtype,), device=dev)
    if qkv_bias and sum(part.shape[0] for part in qkv_bias) != n_out:
        raise ValueError(f"{OP}: qkv_bias must have {n_out} elements, got "
                         f"{sum(part.shape[0] for part in qkv_bias)}")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None:
            check_tensor(OP, name, w, ndim=1, dtypes=(dtype,), device=dev)
            if w.shape[0] != head_dim:
                raise ValueError(f"{OP}: {name} must have head_dim={head_dim} elements, got "
                                 f"{w.shape[0]}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError(f"{OP}: pass both q_norm_weight and k_norm_weight, or neither")
    if residual is not None:
        check_tensor(OP, "residual", residual, dtypes=(dtype,), device=dev)
        if residual.shape != x.shape:
            raise ValueError(f"{OP}: residual shape {tuple(residual.shape)} differs from x "
                             f"{tuple(x.shape)}")
    check_tensor(OP, "positions", positions, dtypes=(torch.int32, torch.int64), device=dev)
    lead, pos_shape = x.shape[:-1], positions.shape
    # Broadcast rule checked by hand: torch.broadcast_shapes costs ~30 us of host time per call.
    if len(pos_shape) > len(lead) or any(
        p not in (1, t) for p, t in zip(reversed(pos_shape), reversed(lead))
    ):
        raise ValueError(f"{OP}: positions shape {tuple(pos_shape)} does not broadcast to "
                         f"the token shape {tuple(lead)}")


def _rows(t: Tensor, hidden: int) -> Tensor:
    """(..., hidden) -> (T, hidden) with a contiguous last dim; a view whenever possible."""
    flat = t.reshape(-1, hidden)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


# ---- custom op -----------------------------------------------------------------------------


def _join_rows(parts: list[Tensor]) -> Tensor:
    """The rows of ``parts`` stacked: a view when they are adjacent, in order, in one storage
    (``kpt.integrations.hf`` lays a layer's q/k/v weights out so), else a copy."""
    first = parts[0]
    if len(parts) == 1:
        return first if first.is_contiguous() else first.contiguous()
    storage, step = first.untyped_storage().data_ptr(), first.element_size()
    end = first.data_ptr()
    for part in parts:
        if (part.data_ptr() != end or not part.is_contiguous() or part.dtype != first.dtype
                or part.untyped_storage().data_ptr() != storage):
            return torch.cat(parts)
        end += part.numel() * step
    rows = sum(part.shape[0] for part in parts)
    shape = (rows, *first.shape[1:])
    return first.as_strided(shape, torch.empty(shape, device="meta").stride())


def _join_rows_again(parts: list[Tensor]) -> Tensor:
    """``_join_rows`` for a repeat call (the fast path, whose signature fixes the parts' shapes,
    strides, dtype and device): the view made for the same addresses last time is reused. It
    is kept on the first part (``_kpt_rows``), so it lives exactly as long as that tensor; it
    reads the parts' memory, so in-place updates show through. Copies are never kept."""
    if len(parts) == 1:
        return _join_rows(parts)
    first = parts[0]
    ptrs = tuple(part.data_ptr() for part in parts)
    kept = getattr(first, "_kpt_rows", None)
    if kept is not None and kept[0] == ptrs:
        return kept[1]
    joined = _join_rows(parts)
    if joined.data_ptr() == ptrs[0] and joined._base is not None:  # a view, not a copy
        first._kpt_rows = (ptrs, joined)
    return joined


class _JoinRows(torch.autograd.Function):
    """``_join_rows`` on the eager path, with the gradient split back into the parts."""

    @staticmethod
    def forward(ctx: Any, *parts: Tensor) -> Tensor:
        ctx.sizes = [part.shape[0] for part in parts]
        # A fresh tensor object: a view of the parts' storage, but not of an input.
        return _join_rows([part.detach() for part in parts]).detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return tuple(grad.split(ctx.sizes))


def _impl(
    x: Tensor,
    residual: Tensor | None,
    norm_weight: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    q_norm_weight: Tensor | None,
    k_norm_weight: Tensor | None,
    positions: Tensor,
    inv_freq: Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    eps: float,
    neox: bool,
    backend: str,
    signature: tuple | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    tokens, hidden = x.shape
    q = x.new_empty(tokens, num_q_heads, head_dim)
    k = x.new_empty(tokens, num_kv_heads, head_dim)
    v = x.new_empty(tokens, num_kv_heads, head_dim)
    residual_out = x.new_empty(tokens, hidden) if residual is not None else x.new_empty(0)
    call = Call(x, residual, norm_weight, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight,
                positions, inv_freq, num_q_heads, num_kv_heads, head_dim, rotary_dim, eps, neox,
                q, k, v, residual_out if residual is not None else None)
    # The dispatch key holds exactly what problem_of(call) reads (device, dtype, dims).
    key = (x.device, x.dtype, tokens, hidden, num_q_heads, num_kv_heads, head_dim, rotary_dim,
           neox, residual is not None, qkv_bias is not None, q_norm_weight is not None)
    SPEC.launch_keyed(key, lambda: problem_of(call), call, backend or None, signature)
    return q, k, v, residual_out


def _run(
    x: Tensor,
    residual: Tensor | None,
    norm_weight: Tensor,
    qkv_weight: list[Tensor],
    qkv_bias: list[Tensor],
    q_norm_weight: Tensor | None,
    k_norm_weight: Tensor | None,
    positions: Tensor,
    inv_freq: Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    eps: float,
    neox: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op on weights and biases given as row blocks (joined here, at run time, so that
    the zero-copy test also holds under torch.compile); an empty ``qkv_bias`` is no bias."""
    return _run_signed(x, residual, norm_weight, qkv_weight, qkv_bias, q_norm_weight,
                       k_norm_weight, positions, inv_freq, num_q_heads, num_kv_heads, head_dim,
                       rotary_dim, eps, neox, backend)


def _run_signed(x, residual, norm_weight, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight,
                positions, inv_freq, num_q_heads, num_kv_heads, head_dim, rotary_dim, eps, neox,
                backend, signature: tuple | None = None):
    """``_run`` of a plain eager call, with its ``signature`` (see ``Op.launch_keyed``)."""
    return _impl(x, residual, norm_weight, _join_rows(qkv_weight),
                 _join_rows(qkv_bias) if qkv_bias else None, q_norm_weight, k_norm_weight,
                 positions, inv_freq, num_q_heads, num_kv_heads, head_dim, rotary_dim, eps, neox,
                 backend, signature)


# The custom op is what torch.compile sees; eager calls skip its dispatch (~50 us of host time
# per call, more than the decode kernels take) and run the same function directly.
_custom_op = torch.library.custom_op("kpt::rmsnorm_qkv_rope", _run, mutates_args=())


@_custom_op.register_fake
def _(x, residual, norm_weight, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight, positions,
      inv_freq, num_q_heads, num_kv_heads, head_dim, rotary_dim, eps, neox, backend):
    tokens, hidden = x.shape
    q = x.new_empty(tokens, num_q_heads, head_dim)
    k = x.new_empty(tokens, num_kv_heads, head_dim)
    v = x.new_empty(tokens, num_kv_heads, head_dim)
    residual_out = x.new_empty(tokens, hidden) if residual is not None else x.new_empty(0)
    return q, k, v, residual_out


# ---- autograd ------------------------------------------------------------------------------


def _blocks(value: Tensor | list[Tensor] | None) -> list[Tensor]:
    if isinstance(value, list):
        return value
    return [] if value is None else [value]


def _setup_context(ctx, inputs, output) -> None:
    """Shared by the custom op (weight and bias as lists of row blocks) and the eager Function
    (single tensors)."""
    x, residual, norm_weight, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight = inputs[:7]
    weights, biases = _blocks(qkv_weight), _blocks(qkv_bias)
    if q_norm_weight is None:  # the bias is read back only to recompute the pre-norm q/k
        biases = []
    # Gradients go back in the form the inputs came: row blocks for a list.
    ctx.weight_rows = [w.shape[0] for w in weights] if isinstance(qkv_weight, list) else None
    ctx.bias_rows = [b.shape[0] for b in qkv_bias] if isinstance(qkv_bias, list) else None
    ctx.blocks = (len(weights), len(biases))
    # h is x itself or the new residual (an output): saving either costs no memory.
    ctx.save_for_backward(x if residual is None else output[3], norm_weight, *weights, *biases,
                          q_norm_weight, k_norm_weight, inputs[7], inputs[8])
    ctx.residual = residual is not None
    ctx.params = inputs[9:15]


def _needed(flag: bool | list[bool]) -> bool:
    return any(flag) if isinstance(flag, list) else bool(flag)


def _backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor, dres: Tensor) -> tuple:
    needs = [_needed(flag) for flag in ctx.needs_input_grad[:7]]
    h, norm_weight, *rest = ctx.saved_tensors
    n_weights, n_biases = ctx.blocks
    weights, biases, rest = rest[:n_weights], rest[n_weights:n_weights + n_biases], \
        rest[n_weights + n_biases:]
    # Inside the backward (and under torch.compile) blocks are concatenated: one copy.
    weight = weights[0] if n_weights == 1 else torch.cat(weights)
    bias = None if not biases else biases[0] if n_biases == 1 else torch.cat(biases)
    grads = rmsnorm_qkv_rope_backward(
        dq, dk, dv, dres if ctx.residual else None, h, norm_weight, weight, bias, *rest,
        *ctx.params, needs=(needs[0] or needs[1], *needs[2:7]))
    # h = x + residual: its gradient is both inputs'. One tensor handed out for both would end
    # up as both x.grad and residual.grad, and the next accumulation would add to it twice.
    dh, d_norm, d_weight, d_bias = grads[:4]
    dres = dh.clone() if needs[0] and needs[1] else dh
    if ctx.weight_rows is not None:
        d_weight = None if d_weight is None else list(d_weight.split(ctx.weight_rows))
    if ctx.bias_rows is not None:
        d_bias = [] if not ctx.bias_rows else (
            None if d_bias is None else list(d_bias.split(ctx.bias_rows)))
    return (dh if needs[0] else None, dres if needs[1] else None, d_norm, d_weight, d_bias,
            *grads[4:]) + (None,) * 9


_custom_op.register_autograd(_backward, setup_context=_setup_context)


# The eager path's autograd.Function defines ``forward(ctx, ...)`` rather than a separate
# ``setup_context``: with ``setup_context``, ``Function.apply`` binds the arguments through
# ``inspect.signature`` on every call (tens of microseconds of host time). It runs only in
# plain eager code (``plain_eager``); functorch transforms, modes and subclasses get the op.
class _RMSNormQKVRoPEFunction(torch.autograd.Function):
    """The custom op's autograd for the eager path: same forward, context and backward."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        output = _impl(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        return _backward(ctx, *grads)


def _requires_grad(*tensors: Tensor | None) -> bool:
    for t in tensors:  # a loop, not any(<generator>): this runs on every call under grad mode
        if t is not None and t.requires_grad:
            return True
    return False


def rmsnorm_qkv_rope(
    x: Tensor,
    norm_weight: Tensor,
    qkv_weight: Tensor | Sequence[Tensor],
    positions: Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float = 1e-6,
    qkv_bias: Tensor | Sequence[Tensor] | None = None,
    q_norm_weight: Tensor | None = None,
    k_norm_weight: Tensor | None = None,
    rope_theta: float = 10000.0,
    rope_scaling: Mapping[str, Any] | None = None,
    rotary_dim: int | None = None,
    rope_style: str = "neox",
    residual: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Residual add +) RMSNorm -> QKV projection -> optional q/k RMSNorm -> RoPE, fused.

    Args:
        x: (..., hidden) activations, fp16/bf16 (fp32 runs on the reference and Triton).
        norm_weight: (hidden,) RMSNorm weight.
        qkv_weight: ((num_q_heads + 2*num_kv_heads)*head_dim, hidden): q, k, v projections
            stacked along the output dim (``torch.cat([q_proj.weight, k_proj.weight,
            v_proj.weight])``), or a sequence of row blocks (e.g. the three weights) that
            are stacked: without a copy when they are adjacent in one storage, as
            ``kpt.integrations.hf.patch`` lays them out; gradients go to each block.
        positions: integer positions broadcastable to ``x.shape[:-1]``.
        qkv_bias: optional ((num_q_heads + 2*num_kv_heads)*head_dim,) bias (Qwen2), or its
            blocks.
        q_norm_weight, k_norm_weight: optional (head_dim,) per-head RMSNorm weights (Qwen3).
        rope_theta, rope_scaling: RoPE base and HF-style scaling dict (``linear``, ``llama3``).
        rotary_dim: features rotated per head (default ``head_dim``); the rest pass through.
        rope_style: ``"neox"`` (rotate halves, Llama) or ``"gptj"`` (rotate adjacent pairs).
        residual: optional (..., hidden); then ``x + residual`` is normalised and returned.
        backend: force ``"cuda"``, ``"hip"``, ``"triton"`` or ``"reference"``.

    Returns:
        q (..., num_q_heads, head_dim), k and v (..., num_kv_heads, head_dim), and the new
        residual (..., hidden) when ``residual`` was given. Rounding follows HF eager modules;
        ``reference.py`` is the specification. Differentiable in x, residual and every weight
        and bias (a gradient on the new residual reaches x and residual directly); the
        backward is ``_backward.py``, the same on every backend. Double backward works in eager
        mode.
    """
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    weights = list(qkv_weight) if isinstance(qkv_weight, (list, tuple)) else [qkv_weight]
    biases = ([] if qkv_bias is None else
              list(qkv_bias) if isinstance(qkv_bias, (list, tuple)) else [qkv_bias])
    signature = None
    if not torch.compiler.is_compiling():
        # A repeat of a call validated and dispatched before runs the launcher stored for it
        # (see Op.launch_keyed); anything else, or a call that needs autograd, runs in full.
        try:
            signature = _signature(x, norm_weight, weights, positions, num_q_heads,
                                   num_kv_heads, head_dim, eps, biases, q_norm_weight,
                                   k_norm_weight, rope_theta, rope_scaling, rotary_dim,
                                   rope_style, residual, backend)
            fast = SPEC.fast.get(signature)
        except (AttributeError, TypeError, ValueError):  # not tensors, unhashable options
            signature = fast = None
        if fast is not None and not (torch.is_grad_enabled() and _requires_grad(
                x, residual, norm_weight, q_norm_weight, k_norm_weight, *weights,
                *biases)) and not _mode_active():
            lead, hidden = x.shape[:-1], x.shape[-1]
            q, k, v, res = fast(
                _rows(x, hidden), None if residual is None else _rows(residual, hidden),
                norm_weight.contiguous(), _join_rows_again(weights),
                _join_rows_again(biases) if biases else None,
                None if q_norm_weight is None else q_norm_weight.contiguous(),
                None if k_norm_weight is None else k_norm_weight.contiguous(),
                positions.reshape(-1) if positions.shape == lead else
                positions.expand(lead).reshape(-1))
            return _shaped(q, k, v, res, lead, hidden, num_q_heads, num_kv_heads, head_dim,
                           residual is not None)
    _validate(x, norm_weight, weights, positions, num_q_heads, num_kv_heads, head_dim,
              rotary_dim, eps, biases, q_norm_weight, k_norm_weight, residual, rope_style)
    if backend is not None:
        SPEC.backend(backend)
    lead, hidden = x.shape[:-1], x.shape[-1]
    inv_freq = rope_inv_freq(rotary_dim, rope_theta, rope_scaling, x.device)
    pos = positions.reshape(-1) if positions.shape == lead else positions.expand(lead).reshape(-1)
    # Eager calls with no gradient to track run the implementation as before the autograd
    # existed: no autograd.Function, no saved tensors.
    weight, bias = weights, biases
    if torch.compiler.is_compiling():
        op = torch.ops.kpt.rmsnorm_qkv_rope
    elif not (torch.is_grad_enabled() and (_requires_grad(
            x, residual, norm_weight, q_norm_weight, k_norm_weight, *weights, *biases))):
        op = _run
        if signature is not None and plain_eager(x, residual, norm_weight, q_norm_weight,
                                                 k_norm_weight, *weights, *biases):
            op = functools.partial(_run_signed, signature=signature)
    elif plain_eager(x, residual, norm_weight, q_norm_weight, k_norm_weight, *weights,
                     *biases):
        op = _RMSNormQKVRoPEFunction.apply
        weight = weights[0] if len(weights) == 1 else _JoinRows.apply(*weights)
        bias = None if not biases else biases[0] if len(biases) == 1 else \
            _JoinRows.apply(*biases)
        weight = weight if weight.is_contiguous() else weight.contiguous()
    else:
        op = torch.ops.kpt.rmsnorm_qkv_rope
    q, k, v, res = op(
        _rows(x, hidden),
        None if residual is None else _rows(residual, hidden),
        norm_weight.contiguous(),
        weight,
        bias,
        None if q_norm_weight is None else q_norm_weight.contiguous(),
        None if k_norm_weight is None else k_norm_weight.contiguous(),
        pos,
        inv_freq,
        num_q_heads,
        num_kv_heads,
        head_dim,
        rotary_dim,
        float(eps),
        rope_style == "neox",
        backend or "",
    )
    return _shaped(q, k, v, res, lead, hidden, num_q_heads, num_kv_heads, head_dim,
                   residual is not None)


def _shaped(q: Tensor, k: Tensor, v: Tensor, res: Tensor, lead: tuple, hidden: int,
            num_q_heads: int, num_kv_heads: int, head_dim: int, has_residual: bool) -> tuple:
    q = q.view(*lead, num_q_heads, head_dim)
    k = k.view(*lead, num_kv_heads, head_dim)
    v = v.view(*lead, num_kv_heads, head_dim)
    if not has_residual:
        return q, k, v
    return q, k, v, res.view(*lead, hidden)


def _described(t: Tensor | None) -> tuple | None:
    return None if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device)


def _signature(x, norm_weight, weights, positions, num_q_heads, num_kv_heads, head_dim, eps,
               biases, q_norm_weight, k_norm_weight, rope_theta, rope_scaling, rotary_dim,
               rope_style, residual, backend) -> tuple:
    """Everything validation and dispatch read of a call: each tensor's type, shape, strides,
    dtype and device, and every option with its type (``True`` is not a head count).
    Alignment is not part of it: the binding copies what it cannot read in place."""
    return (tuple(map(_described, weights)), tuple(map(_described, biases)), _described(x),
            _described(norm_weight), _described(positions), _described(residual),
            _described(q_norm_weight), _described(k_norm_weight), type(num_q_heads),
            num_q_heads, type(num_kv_heads), num_kv_heads, type(head_dim), head_dim,
            type(rotary_dim), rotary_dim, type(eps), eps, type(rope_theta), rope_theta,
            None if rope_scaling is None else tuple(rope_scaling.items()), rope_style, backend,
            _env_backend(OP))


__all__ = ["rmsnorm_qkv_rope", "rope_inv_freq", "Call", "SPEC", "BACKENDS"]
