"""Exact attention (FlashAttention-style): causal / sliding window / soft-cap, GQA, varlen.

Equivalent PyTorch for one sequence and query head ``h`` (see ``reference.py``)::

    s = scale * q[:, h] @ k[:, h // group].T                  # (Sq, Sk), float32
    s = softcap * tanh(s / softcap)                           # if softcap > 0
    s[~visible] = -inf                                        # causal / window, bottom-right
    lse = logsumexp(s, -1);  out[:, h] = softmax(s) @ v[:, h // group]

Logits are formed in log2 units (``scale * log2(e)``), which fixes where they overflow float32
and what overflowed rows give (lse +inf and out NaN; lse -inf and out 0): ``reference.py``.

Two registry ops: ``flash_attention`` (forward: out and lse) and ``flash_attention_backward``
(dq, dk, dv), each with declared backends; autograd joins them through ``torch.library``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kpt.backends.xla import xla_backend
from kpt.backends.xpu import xpu_backend
from kpt.ops._common import (
    REFERENCE_DEVICES,
    _mode_active,
    attention_options,
    check_tensor,
    compare,
    grid_yz_reasons,
    lazy,
    native_backends,
    plain_eager,
    read_content,
    triton_interpreting,
    triton_unavailable,
)
from kpt.ops._registry import Backend, Op, Problem, Tuning, _env_backend

from . import reference as _reference

OP = "flash_attention"
OP_BACKWARD = "flash_attention_backward"
_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32})
MAX_HEAD_DIM = 256


@dataclass
class Call:
    """A validated forward call. q (B, Sq, H, D) or varlen (Tq, H, D); k, v likewise with Hkv
    heads; any strides with a contiguous last dim. ``window_right`` is 0 for causal."""

    q: Tensor
    k: Tensor
    v: Tensor
    cu_seqlens_q: Tensor | None
    cu_seqlens_k: Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float
    window_left: int
    window_right: int
    softcap: float
    out: Tensor
    lse: Tensor

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1 if self.varlen else self.q.shape[0]


@dataclass
class BackwardCall:
    """A validated backward call: the forward's inputs, its out and lse, the gradients of out
    (like out) and, optionally, of lse; outputs dq, dk, dv shaped like q, k, v."""

    dout: Tensor
    dlse: Tensor | None
    q: Tensor
    k: Tensor
    v: Tensor
    out: Tensor
    lse: Tensor
    cu_seqlens_q: Tensor | None
    cu_seqlens_k: Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float
    window_left: int
    window_right: int
    softcap: float
    deterministic: bool
    dq: Tensor
    dk: Tensor
    dv: Tensor

    varlen = Call.varlen
    batch = Call.batch


# ---- backends ------------------------------------------------------------------------------


def _grid_reasons(p: Problem) -> list[str]:
    """The GPU kernels' grids put heads in y and batch (varlen: sequences) in z."""
    return grid_yz_reasons(heads=p.get("heads_q", 0), batch=p.get("batch", 0))


def _triton_supports(p: Problem) -> list[str]:
    reasons = [] if p.device_type == "cpu" else _grid_reasons(p)
    if p["head_dim"] > MAX_HEAD_DIM:
        reasons.append(f"head_dim {p['head_dim']} > {MAX_HEAD_DIM}")
    if p.device_type == "cpu" and not triton_interpreting():
        reasons.append("on cpu, triton runs only under TRITON_INTERPRET=1")
    return reasons


_REFERENCE_DEVICES = REFERENCE_DEVICES


BACKENDS = (
    Backend(
        name="triton",
        device_types=frozenset({"cuda", "cpu"}),
        dtypes=_HALF,
        run=lazy(f"{__name__}._triton", "run"),
        available=triton_unavailable,
        supports=_triton_supports,
        configs=lazy(f"{__name__}._triton", "configs"),
    ),
    *native_backends(f"{__name__}._cuda", dtypes=_HALF, run_cuda="run", run_hip="run",
                     fast="fast"),
    Backend(name="reference", device_types=_REFERENCE_DEVICES, dtypes=_FLOATS,
            run=_reference.run),
    xla_backend("flash_attention", dtypes=_FLOATS),
    xpu_backend(f"{__name__}._triton", dtypes=_FLOATS, triton_dtypes=_HALF,
                supports=_triton_supports, configs="configs", ipex="flash_attention", cpu=True),
)

BACKWARD_BACKENDS = (
    Backend(
        name="triton",
        device_types=frozenset({"cuda", "cpu"}),
        dtypes=_HALF,
        run=lazy(f"{__name__}._triton", "run_backward"),
        available=triton_unavailable,
        supports=_triton_supports,  # two kernels, no atomics: deterministic either way
        configs=lazy(f"{__name__}._triton", "backward_configs"),
    ),
    *native_backends(f"{__name__}._cuda", dtypes=_HALF, run_cuda="run_backward",
                     run_hip="run_backward", configs="backward_configs"),
    Backend(name="reference", device_types=_REFERENCE_DEVICES, dtypes=_FLOATS,
            run=_reference.run_backward),
    xla_backend("flash_attention", dtypes=_FLOATS, entry="run_backward"),
    xpu_backend(f"{__name__}._triton", dtypes=_HALF, supports=_triton_supports,
                configs="backward_configs", entry="run_backward"),
)


def _pow2_bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _mask_kind(left: int, right: int) -> str:
    if left < 0 and right < 0:
        return "full"
    return "causal" if left < 0 and right == 0 else "window"


def _bucket(p: Problem) -> str:
    # A deterministic backward is its own bucket: rows tuned without the flag may name a
    # kernel that adds with atomics (the sm90 backward), which such a call must not get.
    flags = "".join(f"-{tag}" for tag, on in (("softcap", p["softcap"]), ("varlen", p["varlen"]),
                                              ("det", p.get("deterministic", False))) if on)
    return (f"b{_pow2_bucket(p['batch'])}-sq{_pow2_bucket(p['seqlen_q'])}"
            f"-sk{_pow2_bucket(p['seqlen_k'])}-h{p['heads_q']}-kv{p['heads_kv']}"
            f"-d{p['head_dim']}-{p['mask']}{flags}")


def _problem(call: Call | BackwardCall, **extra: Any) -> Problem:
    return Problem.of(
        call.q.device,
        call.q.dtype,
        batch=call.batch,
        seqlen_q=call.max_seqlen_q,
        seqlen_k=call.max_seqlen_k,
        heads_q=call.q.shape[-2],
        heads_kv=call.k.shape[-2],
        head_dim=call.q.shape[-1],
        mask=_mask_kind(call.window_left, call.window_right),
        softcap=call.softcap > 0,
        varlen=call.varlen,
        **extra,
    )


def problem_of(call: Call) -> Problem:
    return _problem(call)


def backward_problem_of(call: BackwardCall) -> Problem:
    return _problem(call, deterministic=call.deterministic)


# ---- tuning and testing hooks -------------------------------------------------------------

# Kernels differ from the reference in rounding the probabilities to the input dtype before
# the P @ V product (as every flash kernel does) and in the fp32 summation order. Measured on
# random inputs: norm-wise ~1/3 of a unit in the last place (u) of the output; the bound is
# 2u (bf16 u = 2^-8, fp16 u = 2^-11), fp32 (reference only) 1e-5.
TOLERANCE = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}
# lse is computed in fp32 from the same rounded inputs; only summation order differs.
LSE_TOLERANCE = 1e-5
# Gradients also round dS and P to the input dtype before the dK, dQ, dV products, and
# dS = P * (dP - delta) cancels: measured norm-wise ~1u, bound 4u.
BACKWARD_TOLERANCE = {torch.bfloat16: 2**-6, torch.float16: 2**-9, torch.float32: 1e-5}


def compare_lse(name: str, out: Tensor, ref: Tensor, rel_tol: float = LSE_TOLERANCE) -> str | None:
    """Like ``compare`` on the finite entries; -inf (no visible key) must match exactly."""
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if o.shape != r.shape:
        return f"{name}: shape {tuple(o.shape)} != reference {tuple(r.shape)}"
    empty = r == float("-inf")
    if not torch.equal(o == float("-inf"), empty):
        return f"{name}: -inf (rows without visible keys) differs from the reference"
    return compare(name, o.masked_fill(empty, 0.0), r.masked_fill(empty, 0.0), rel_tol)


def shapes_from_hf_config(config: Mapping[str, Any], tokens: list[int]) -> list[dict]:
    """Causal prefill shapes (batch 1, Sq = Sk = each token count) of a HF model config, with
    its sliding window (plus the full-attention variant: Gemma alternates), soft-cap and
    ``query_pre_attn_scalar``."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    pre = config.get("query_pre_attn_scalar")
    base = {
        "batch": 1,
        "heads_q": heads,
        "heads_kv": int(config.get("num_key_value_heads") or heads),
        "head_dim": head_dim,
        "causal": True,
        "window_left": -1,
        "softcap": float(config.get("attn_logit_softcapping") or 0.0),
        "scale": float(pre) ** -0.5 if pre else None,
    }
    window = config.get("sliding_window")
    variants = [base]
    if window and config.get("use_sliding_window", True):
        variants.append(dict(base, window_left=int(window) - 1))
    return [dict(v, seqlen_q=t, seqlen_k=t) for t in tokens for v in variants]


def _random_qkv(shape: Mapping[str, Any], dtype: torch.dtype, device: torch.device,
                seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, sq, sk = shape["batch"], shape["seqlen_q"], shape["seqlen_k"]
    hq, hkv, d = shape["heads_q"], shape["heads_kv"], shape["head_dim"]

    def rand(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    return rand(b, sq, hq, d), rand(b, sk, hkv, d), rand(b, sk, hkv, d)


def _params(shape: Mapping[str, Any]) -> dict:
    scale = shape.get("scale") or shape["head_dim"] ** -0.5
    return dict(scale=float(scale), window_left=int(shape.get("window_left", -1)),
                window_right=0 if shape.get("causal") else int(shape.get("window_right", -1)),
                softcap=float(shape.get("softcap", 0.0)))


def make_call(shape: Mapping[str, Any], dtype: torch.dtype, device: torch.device,
              seed: int = 0) -> Call:
    """A forward call on fresh random inputs (never zeros) with outputs allocated."""
    q, k, v = _random_qkv(shape, dtype, device, seed)
    return Call(q, k, v, None, None, q.shape[1], k.shape[1], **_params(shape),
                out=torch.empty_like(q),
                lse=torch.empty(q.shape[0], q.shape[2], q.shape[1], device=device))


def make_backward_call(shape: Mapping[str, Any], dtype: torch.dtype, device: torch.device,
                       seed: int = 0) -> BackwardCall:
    """A backward call: random inputs and output gradient, out/lse from the reference."""
    fwd = make_call(shape, dtype, device, seed)
    _reference.run(fwd, {})
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(fwd.q.shape, generator=gen).to(device=device, dtype=dtype)
    return BackwardCall(dout, None, fwd.q, fwd.k, fwd.v, fwd.out, fwd.lse, None, None,
                        fwd.max_seqlen_q, fwd.max_seqlen_k, fwd.scale, fwd.window_left,
                        fwd.window_right, fwd.softcap, False, torch.empty_like(fwd.q),
                        torch.empty_like(fwd.k), torch.empty_like(fwd.v))


def clone_outputs(call: Call) -> Call:
    return dataclasses.replace(call, out=torch.empty_like(call.out),
                               lse=torch.empty_like(call.lse))


def clone_backward_outputs(call: BackwardCall) -> BackwardCall:
    return dataclasses.replace(call, dq=torch.empty_like(call.dq), dk=torch.empty_like(call.dk),
                               dv=torch.empty_like(call.dv))


def poison(call: Call) -> None:
    call.out.fill_(float("nan"))
    call.lse.fill_(float("nan"))


def poison_backward(call: BackwardCall) -> None:
    for t in (call.dq, call.dk, call.dv):
        t.fill_(float("nan"))


def check(call: Call, expected: Call) -> str | None:
    return (compare(f"{OP}.out", call.out, expected.out, TOLERANCE[call.q.dtype])
            or compare_lse(f"{OP}.lse", call.lse, expected.lse))


def check_backward(call: BackwardCall, expected: BackwardCall) -> str | None:
    tol = BACKWARD_TOLERANCE[call.q.dtype]
    for name in ("dq", "dk", "dv"):
        reason = compare(f"{OP_BACKWARD}.{name}", getattr(call, name), getattr(expected, name),
                         tol)
        if reason:
            return reason
    return None


# Triton first, except where a prefer hook puts the sm90 kernels ahead (Hopper). On the CPU,
# xpu is IPEX's flash kernel where installed (measured 3-15x the reference's speed).
_PRIORITY = {"cuda": ("triton", "cuda", "hip", "reference"), "cpu": ("xpu", "reference"),
             "xla": ("xla", "reference"), "xpu": ("xpu", "reference"), "mps": ("reference",)}

SPEC = Op(
    name=OP,
    backends=BACKENDS,
    priority=_PRIORITY,
    bucket=_bucket,
    tuning=Tuning(shapes=shapes_from_hf_config, make_call=make_call, problem=problem_of,
                  check=check, poison=poison, clone_outputs=clone_outputs),
    prefer=lazy(f"{__name__}._cuda", "prefer"),
)

SPEC_BACKWARD = Op(
    name=OP_BACKWARD,
    backends=BACKWARD_BACKENDS,
    priority=_PRIORITY,
    bucket=_bucket,
    tuning=Tuning(shapes=shapes_from_hf_config, make_call=make_backward_call,
                  problem=backward_problem_of, check=check_backward, poison=poison_backward,
                  clone_outputs=clone_backward_outputs),
    prefer=lazy(f"{__name__}._cuda", "prefer_backward"),
)


# ---- validation ----------------------------------------------------------------------------


def _validate(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None,
              window: tuple[int, int], softcap: float, cu_seqlens_q: Tensor | None,
              cu_seqlens_k: Tensor | None, max_seqlen_q: int | None, max_seqlen_k: int | None,
              flags: dict[str, Any]) -> tuple[float, int, int, int, int]:
    """Check every argument; returns (scale, window_left, window_right, max_q, max_k)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{OP}: {name} must be a bool, got {value!r}")
    check_tensor(OP, "q", q, ndim=(3, 4), dtypes=tuple(_FLOATS))
    dev, dtype = q.device, q.dtype
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    ndim = 3 if varlen else 4
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seq, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, dtypes=(dtype,), device=dev)
        if t.dim() != ndim:
            raise ValueError(f"{OP}: {name} must be {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"{OP}: q has batch {q.shape[0]}, k and v have {k.shape[0]}")
    heads, kv_heads, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"{OP}: head_dim of q ({d}) and k, v ({k.shape[-1]}) differ")
    if d == 0 or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{OP}: q heads ({heads}) must be a positive multiple of k/v heads "
                         f"({kv_heads}) and head_dim ({d}) positive")
    scale, left, right, softcap = attention_options(OP, causal, window, scale, softcap, d)
    if not varlen:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError(f"{OP}: max_seqlen_q/k are for varlen calls (with cu_seqlens)")
        return float(scale), *_unbounded(left, right, q.shape[1], k.shape[1]), q.shape[1], \
            k.shape[1]
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError(f"{OP}: varlen needs both cu_seqlens_q and cu_seqlens_k")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(OP, name, cu, ndim=1, dtypes=(torch.int32,), device=dev)
        if cu.shape[0] < 1 or cu.stride(0) != 1:
            raise ValueError(f"{OP}: {name} must be contiguous (batch + 1,), got "
                             f"{tuple(cu.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"{OP}: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_seqlens_k.shape)} must have the same length")
    maxes = []
    for name, given, cu, t in (("max_seqlen_q", max_seqlen_q, cu_seqlens_q, q),
                               ("max_seqlen_k", max_seqlen_k, cu_seqlens_k, k)):
        if isinstance(given, bool) or not (given is None or isinstance(given, int)) or (
                given is not None and given < 0):
            raise ValueError(f"{OP}: {name} must be an int >= 0, got {given!r}")
        if given is None or read_content(cu):
            # The boundaries are read on the host (a sync on a GPU; pass max_seqlen to avoid
            # it, and for graph capture): well-formed, inside the tensor, and the hint true.
            given = _check_boundaries(name, cu, t.shape[0], given)
        # Never more than the tokens there are: the grid is sized by it, so a huge hint
        # cannot launch (or loop over) blocks past the tensor.
        maxes.append(min(given, t.shape[0]))
    return float(scale), *_unbounded(left, right, *maxes), maxes[0], maxes[1]


def _unbounded(left: int, right: int, max_q: int, max_k: int) -> tuple[int, int]:
    """The window sides with every side wider than any row can reach made unbounded (-1):
    the same mask (a row sees keys [row + diag - left, row + diag + right] with |diag| below
    max_q + max_k), and the kernels' int32 arithmetic on row + diag + side never meets a side
    near 2**31 (Triton's key and query ranges overflowed there)."""
    reach = max_q + max_k
    return (-1 if left > reach else left), (-1 if right > reach else right)


def _check_boundaries(name: str, cu: Tensor, total: int, hint: int | None) -> int:
    """The longest sequence of ``cu`` after checking it: starts at >= 0, never decreases, ends
    within the ``total`` tokens of its tensor, and is not longer than ``hint`` when given."""
    which = name.removeprefix("max_seqlen_")
    if cu.shape[0] < 2:
        return 0
    values = cu.tolist()
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] < 0 or min(lengths) < 0:
        raise ValueError(f"{OP}: cu_seqlens_{which} must start at >= 0 and never decrease, "
                         f"got {values[:8]}{' ...' if len(values) > 8 else ''}")
    if values[-1] > total:
        raise ValueError(f"{OP}: cu_seqlens_{which} ends at {values[-1]}, past the {total} "
                         f"tokens of {which}")
    longest = max(lengths)
    if hint is not None and hint < longest:
        raise ValueError(f"{OP}: {name}={hint} is below the longest sequence ({longest}) in "
                         f"cu_seqlens_{which}")
    return longest


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- custom ops ----------------------------------------------------------------------------


def _outputs(q: Tensor, varlen: bool) -> tuple[Tensor, Tensor]:
    heads = q.shape[-2]
    if varlen:  # tokens outside every sequence keep out = 0, lse = -inf
        lse = torch.full((heads, q.shape[0]), float("-inf"), device=q.device)
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device), lse
    return q.new_empty(q.shape), torch.empty(q.shape[0], heads, q.shape[1], device=q.device)


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor | None,
                  cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                  window_left: int, window_right: int, softcap: float, return_lse: bool,
                  deterministic: bool, backend: str,
                  signature: tuple | None = None) -> tuple[Tensor, Tensor]:
    out, lse = _outputs(q, cu_seqlens_q is not None)
    call = Call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                window_left, window_right, softcap, out, lse)
    SPEC.launch_keyed(_key(call), lambda: problem_of(call), call, backend or None, signature)
    return out, lse


def _key(call: Call | BackwardCall, *extra: Any) -> tuple:
    """The dispatch key: plain values that determine ``_problem(call)`` (device, dtype, sizes,
    mask kind, soft cap, varlen), built without a Problem."""
    q = call.q
    return (q.device, q.dtype, call.batch, call.max_seqlen_q, call.max_seqlen_k, q.shape[-2],
            call.k.shape[-2], q.shape[-1], call.window_left, call.window_right,
            call.softcap > 0, call.cu_seqlens_q is not None, *extra)


@torch.library.custom_op("kpt::flash_attention", mutates_args=())
def _flash_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    return_lse: bool,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _forward_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                         window_left, window_right, softcap, return_lse, deterministic, backend)


@_flash_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right, softcap, return_lse, deterministic, backend):
    heads = q.shape[-2]
    if cu_seqlens_q is not None:
        return q.new_empty(q.shape), q.new_empty((heads, q.shape[0]), dtype=torch.float32)
    return q.new_empty(q.shape), q.new_empty((q.shape[0], heads, q.shape[1]),
                                             dtype=torch.float32)


def _backward_impl(dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                   out: Tensor, lse: Tensor, cu_seqlens_q: Tensor | None,
                   cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                   scale: float, window_left: int, window_right: int, softcap: float,
                   deterministic: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    varlen = cu_seqlens_q is not None
    # Varlen tokens outside every sequence get zero gradients; batched ones are all written.
    alloc = torch.zeros if varlen else torch.empty
    dq, dk, dv = (alloc(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    call = BackwardCall(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, scale, window_left, window_right, softcap, deterministic,
                        dq, dk, dv)
    SPEC_BACKWARD.launch_keyed(_key(call, deterministic), lambda: backward_problem_of(call),
                               call, backend or None)
    return dq, dk, dv


@torch.library.custom_op("kpt::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                          max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap,
                          deterministic, backend)


@_flash_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      scale, window_left, window_right, softcap, deterministic, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k = inputs[:5]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.params = inputs[5:]


def _backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    (max_q, max_k, scale, left, right, softcap, return_lse, deterministic,
     backend) = ctx.params
    dout = torch.zeros_like(out) if dout is None else _last_dim_contiguous(dout)
    if not return_lse:  # lse was never handed out: its gradient is zero, skip reading it
        dlse = None
    args = (dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right, softcap,
            deterministic, backend)
    if not _eager(dout, dlse, q, k, v, out, lse, cu_q, cu_k):
        dq, dk, dv = torch.ops.kpt.flash_attention_backward(*args)
    elif torch.is_grad_enabled():  # create_graph=True: gradients that refuse to differentiate
        dq, dk, dv = _BackwardFunction.apply(*args)
    else:
        dq, dk, dv = _backward_impl(*args)
    return (dq, dk, dv) + (None,) * 11


def _no_double_backward(ctx, *grads):
    raise RuntimeError(f"{OP}: second derivatives (double backward) are not implemented")


_flash_attention_op.register_autograd(_backward, setup_context=_setup_context)
_flash_attention_backward_op.register_autograd(_no_double_backward,
                                               setup_context=lambda ctx, inputs, output: None)


# ---- eager fast path -----------------------------------------------------------------------
#
# The custom op's Python layers (dispatcher, autograd wrapper, alias checks) cost about as
# much host time per call as everything kpt does itself (2026-11-24, H200 host: ~155 us per
# public call against ~50 us for the sm90 launch alone). Where nothing but plain eager
# execution can see the call (``kpt.ops._common.plain_eager``), the public function runs the
# same implementation directly, with autograd through an equivalent autograd.Function.

_eager = plain_eager


# The fast path's autograd.Functions define ``forward(ctx, ...)`` rather than a separate
# ``setup_context``: with ``setup_context``, ``Function.apply`` binds the arguments through
# ``inspect.signature`` on every call (tens of microseconds of host time). The fast path never
# runs under functorch transforms, which are what need the ``setup_context`` form.


class _FlashAttentionFunction(torch.autograd.Function):
    """The custom op's autograd, for the eager fast path: same forward, context and backward."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> tuple[Tensor, Tensor]:
        output = _forward_impl(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple:
        return _backward(ctx, dout, dlse)


class _BackwardFunction(torch.autograd.Function):
    """The backward under ``create_graph=True`` on the eager path: the backward op's autograd
    (an error on differentiating it again)."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
        return _backward_impl(*args)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple:
        _no_double_backward(ctx, *grads)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention without materialising the score matrix; differentiable.

    For each sequence, query head ``h`` and kv head ``h // (H // Hkv)``::

        s[i, j] = scale * q[i] . k[j];  s = softcap * tanh(s / softcap) if softcap > 0
        out[i] = sum_j softmax_j(s[i, j] over visible j) v[j];  lse[i] = log sum_j exp(s[i, j])

    Masks align to the bottom-right: with ``diag = Sk - Sq``, query ``i`` sees key ``j`` iff
    ``j <= i + diag + right`` (when ``right >= 0``) and ``j >= i + diag - left`` (when
    ``left >= 0``); ``causal=True`` means ``right = 0``. A query that sees no key (possible when
    Sq > Sk with causal, or with a window) gets ``out = 0`` and ``lse = -inf``, and zero
    gradients.

    Args:
        q: (B, Sq, H, D), or (Tq, H, D) with ``cu_seqlens_q`` (varlen). fp16/bf16 on every
            backend; fp32 on the reference. Any strides with a contiguous last dim (transposed
            (B, H, S, D) views are read in place).
        k, v: (B, Sk, Hkv, D) or (Tk, Hkv, D); H must be a multiple of Hkv (GQA/MQA).
        causal: bottom-right causal mask.
        scale: logit scale, default ``D ** -0.5``.
        window: (left, right) sliding window in keys around the diagonal; -1 is unbounded.
        softcap: if > 0, Gemma-2 style ``softcap * tanh(s / softcap)``, applied before masking.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) prefix sums of the sequence lengths
            (varlen); tokens past ``cu_seqlens[-1]`` are ignored (out 0, zero gradients).
        max_seqlen_q, max_seqlen_k: the longest sequence (varlen only); computed with a host
            sync when omitted. A value below the true maximum gives undefined results.
        return_lse: also return the natural-log logsumexp, float32, (B, H, Sq) or (H, Tq);
            it is differentiable too.
        deterministic: bitwise-reproducible gradients. Triton's backward always is; the
            cuda backend's sm90 backward (Hopper; dispatch's choice at head dim 128 for long
            sequences and soft caps) adds dq with fp32 reductions, so ``True`` makes dispatch
            keep Triton and the cuda backend fall back to its deterministic mma kernels.
        backend: force ``"triton"``, ``"cuda"``, ``"hip"`` or ``"reference"`` (also used for
            the backward). Default: the tuned choice, else triton, cuda, hip, reference.

    Returns:
        out, shaped like q in q's dtype (contiguous), and lse when ``return_lse``.
        ``reference.py`` is the specification.
    """
    signature = None
    if cu_seqlens_q is None and cu_seqlens_k is None and not torch.compiler.is_compiling():
        # A repeat of a call validated and dispatched before (same types, shapes, strides,
        # dtypes, devices, alignment and options) runs the launcher stored for it (see
        # Op.launch_keyed); anything else, or a call that needs autograd, takes the full path.
        try:
            signature = (
                type(q), type(k), type(v), q.shape, k.shape, v.shape, q.stride(), k.stride(),
                v.stride(), q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15, type(causal), causal,
                type(scale), scale, window, type(softcap), softcap, type(return_lse),
                return_lse, type(deterministic), deterministic, max_seqlen_q, max_seqlen_k,
                backend, _env_backend(OP))
            fast = SPEC.fast.get(signature)
        except (AttributeError, TypeError, RuntimeError):  # not tensors, unhashable options
            signature = fast = None
        if fast is not None and not (torch.is_grad_enabled() and (
                q.requires_grad or k.requires_grad or v.requires_grad)) and not _mode_active():
            out, lse = fast(q, k, v)
            return (out, lse) if return_lse else out
    scale, left, right, max_q, max_k = _validate(
        q, k, v, causal, scale, window, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, {"causal": causal, "return_lse": return_lse,
                       "deterministic": deterministic})
    if backend is not None:
        SPEC.backend(backend)
    given_q, given_k, given_v = q, k, v
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if q is not given_q or k is not given_k or v is not given_v:
        signature = None  # copies: the signature describes the given tensors, not these
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, left, right, float(softcap),
            return_lse, deterministic, backend or "")
    if not _eager(q, k, v, cu_seqlens_q, cu_seqlens_k):
        out, lse = torch.ops.kpt.flash_attention(*args)
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _FlashAttentionFunction.apply(*args)
    else:
        out, lse = _forward_impl(*args, signature=signature)
    return (out, lse) if return_lse else out


__all__ = ["flash_attention", "Call", "BackwardCall", "SPEC", "SPEC_BACKWARD", "BACKENDS",
           "BACKWARD_BACKENDS"]
