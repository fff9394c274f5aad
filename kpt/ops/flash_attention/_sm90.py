"""Hopper (sm_90a) forward and backward of ``flash_attention``: JIT build of
``csrc/flash_attention_sm90``.

The ``cuda`` backend offers these kernels as config ``{"impl": "sm90"}``: it calls
:func:`supports` / :func:`supports_backward` (problem-level reasons, no build) and, per call,
:func:`call_reasons` / :func:`backward_call_reasons` (strides and alignment, which the problem
does not carry) before :func:`run` / :func:`run_backward`. The kernels are TMA + wgmma with a
producer warpgroup and two or three consumer warpgroups; see ``SM90_NOTES.md``. The backward
accumulates dq with fp32 atomics, so it is not offered when the call asks for determinism.

Everything the kernel cannot do is a reason here, checked before any launch: a TMA descriptor
for a misaligned tensor would fault inside the kernel, and the kernel's mbarrier waits would
then only end at their time limit (the launch fails with a CUDA error).
"""

from __future__ import annotations

import functools

import torch

from kpt.jit import JitSpec
from kpt.ops._common import MAX_GRID_YZ as _MAX_GRID_YZ
from kpt.ops._common import on_device, raw_stream
from kpt.ops._registry import Config, Problem

from . import problem_of

OP = "flash_attention"

SPEC = JitSpec(
    name="flash_attention_sm90",
    sources=("flash_attention_sm90/kernels.cu", "flash_attention_sm90/kernels_overlap.cu",
             "flash_attention_sm90/kernels_bwd.cu", "flash_attention_sm90/binding.cpp"),
)

# config["variant"] -> KPT_FA90_VARIANT_* (flash_attention_sm90.h): "base" (the default when
# the key is absent), "overlap" (the FA3 schedule), "persistent" (the overlap kernel with one
# CTA per SM walking the query tiles with a static stride) and "dynamic" (persistent, each CTA
# taking the next untaken tile from a counter); all pass the GPU tests.
VARIANTS = {"base": 0, "overlap": 1, "persistent": 2, "dynamic": 3}
# Varlen (cu_seqlens) runs in the overlap kernel only: every variant but "base".
VARLEN_VARIANTS = ("overlap", "persistent", "dynamic")

HEAD_DIMS = (64, 128)
_HALF = (torch.float16, torch.bfloat16)
# Grid y/z are heads and batch (_MAX_GRID_YZ at most); int32 index arithmetic in the kernel
# stays in range with sequences below 2^28 (see kMaxSeqlen in kernels.cu).
_MAX_SEQLEN = 1 << 28
# TMA: global address and every stride 16-byte aligned (8 elements of 16 bits).
_ALIGN_BYTES = 16


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def build_reason() -> str | None:
    """Why the extension cannot be built or loaded here (never compiles), or None."""
    return SPEC.unavailable_reason()


def supports(problem: Problem, backward: bool = False) -> list[str]:
    """Reasons this kernel (the forward, or with ``backward`` the backward) cannot run
    ``problem``; empty when it can."""
    reasons = []
    if problem.device_type != "cuda" or torch.version.hip is not None:
        reasons.append("sm90 kernel needs an NVIDIA CUDA device")
    elif not torch.cuda.is_available():
        reasons.append("sm90 kernel: torch.cuda is not available")
    else:
        cap = _capability(problem.device_index)
        if cap != (9, 0):
            reasons.append(f"sm90 kernel needs compute capability 9.0, device has "
                           f"{cap[0]}.{cap[1]}")
    if problem.dtype not in _HALF:
        reasons.append(f"sm90 kernel: dtype {problem.dtype} is not float16/bfloat16")
    if problem["head_dim"] not in HEAD_DIMS:
        reasons.append(f"sm90 kernel: head_dim {problem['head_dim']} not in {HEAD_DIMS}")
    if problem["varlen"] and backward:
        reasons.append("sm90 backward: varlen (cu_seqlens) is not implemented")
    if problem["batch"] > _MAX_GRID_YZ or problem["heads_q"] > _MAX_GRID_YZ:
        reasons.append(f"sm90 kernel: batch and heads must be <= {_MAX_GRID_YZ}")
    if max(problem["seqlen_q"], problem["seqlen_k"]) >= _MAX_SEQLEN:
        reasons.append(f"sm90 kernel: sequence lengths must be < {_MAX_SEQLEN}")
    if not reasons:
        reason = build_reason()
        if reason:
            reasons.append(reason)
    return reasons


def _layout_ok(call) -> bool:
    """The common case of :func:`call_reasons`, tested cheaply (it runs on every call): 16-bit
    q, k, v with 16-byte aligned starts and strides (8 elements) and a unit last stride, out
    with even strides, lse contiguous float32 (and, varlen, fewer than 2^28 tokens). False
    sends the call to the full check."""
    if call.q.dtype not in _HALF:
        return False
    dims = 3 if call.varlen else 4
    if call.varlen and max(call.q.shape[0], call.k.shape[0]) >= _MAX_SEQLEN:
        return False
    for t in (call.q, call.k, call.v):
        s = t.stride()
        if len(s) != dims or s[-1] != 1 or (s[0] | s[1] | s[dims - 2]) & 7 or t.data_ptr() & 15:
            return False
    s = call.out.stride()
    if len(s) != dims or s[-1] != 1 or (s[0] | s[1] | s[dims - 2]) & 1 or call.out.data_ptr() & 3:
        return False
    return call.lse.dtype == torch.float32 and call.lse.is_contiguous()


def call_reasons(call) -> list[str]:
    """Reasons from the tensors themselves (layout), which ``Problem`` does not describe."""
    if _layout_ok(call):
        return []
    reasons = []
    dims, layout = (3, "(tokens, H, D)") if call.varlen else (4, "(B, S, H, D)")
    if call.varlen and max(call.q.shape[0], call.k.shape[0]) >= _MAX_SEQLEN:
        reasons.append(f"sm90 kernel: varlen q and k must hold fewer than {_MAX_SEQLEN} tokens")
    tensors = (("q", call.q), ("k", call.k), ("v", call.v), ("out", call.out))
    for name, t in tensors:
        if t.dim() != dims:
            reasons.append(f"sm90 kernel: {name} must be {layout}")
            continue
        if t.stride(-1) != 1:
            reasons.append(f"sm90 kernel: {name} needs a contiguous last dim")
        elif name != "out":
            reasons += _tma_reasons(name, t)
        else:
            # out is stored by TMA when its rows allow it, else two elements at a time.
            reasons += _pair_reasons(name, t)
    lse = call.lse
    if lse.dtype != torch.float32 or not lse.is_contiguous():
        reasons.append("sm90 kernel: lse must be contiguous float32 "
                       + ("(H, tokens)" if call.varlen else "(B, H, Sq)"))
    return reasons


def run(call, config: Config, layout_checked: bool = False) -> None:
    """Write ``call.out`` and ``call.lse``. ``config`` may name a ``variant`` (``VARIANTS``,
    default ``"base"``); any other key is rejected. ``layout_checked``: the caller has just
    found no :func:`call_reasons` (the cuda backend does, to choose between this kernel and its
    mma kernels), so they are not computed again."""
    unknown = set(config) - {"impl", "variant"}
    if unknown:
        raise ValueError(f"{OP}[sm90]: unknown config keys {sorted(unknown)}")
    variant = config.get("variant", "base")
    if variant not in VARIANTS:
        raise ValueError(f"{OP}[sm90]: unknown variant {variant!r}, expected one of "
                         f"{sorted(VARIANTS)}")
    reasons = list(_call_supports(call))
    if call.varlen and variant not in VARLEN_VARIANTS:
        reasons.append(f"varlen runs in the overlap kernel only: variant {variant!r} is not one "
                       f"of {VARLEN_VARIANTS}")
    if not layout_checked:
        reasons += call_reasons(call)
    if reasons:
        raise ValueError(f"{OP}[sm90]: cannot run this call: " + "; ".join(reasons))
    if call.varlen:
        _run_varlen(call, VARIANTS[variant])
        return
    q, k = call.q, call.k
    batch, seqlen_q, heads = q.shape[:3]
    seqlen_k = k.shape[1]
    if batch == 0 or seqlen_q == 0 or heads == 0:
        return
    if seqlen_k == 0:  # no key at all: every row sees nothing
        call.out.zero_()
        call.lse.fill_(float("-inf"))
        return
    module = SPEC.load()
    with on_device(q.device):
        stream = raw_stream(q.device)
        module.forward(q, k, call.v, call.out, call.lse, float(call.scale), float(call.softcap),
                       int(call.window_left), int(call.window_right), VARIANTS[variant],
                       stream)


def _run_varlen(call, variant: int) -> None:
    """The varlen launch: rows outside every sequence are not written (the op's outputs hold
    0 and -inf there already)."""
    q = call.q
    if q.shape[0] == 0 or q.shape[1] == 0 or call.batch == 0 or call.max_seqlen_q == 0:
        return
    if call.k.shape[0] == 0 or call.max_seqlen_k == 0:  # no sequence has a key
        call.out.zero_()
        call.lse.fill_(float("-inf"))
        return
    module = SPEC.load()
    with on_device(q.device):
        module.forward_varlen(q, call.k, call.v, call.out, call.lse, call.cu_seqlens_q,
                              call.cu_seqlens_k, int(call.max_seqlen_q), int(call.max_seqlen_k),
                              float(call.scale), float(call.softcap), int(call.window_left),
                              int(call.window_right), variant, raw_stream(q.device))


def fast_forward(call, config: Config):
    """``run``'s launch for repeats of ``call`` (see ``Backend.fast``): inputs of the same
    signature need no check, and the binding allocates out and lse itself; None for calls
    that ``run`` handles without the kernel (empty sizes)."""
    q, k = call.q, call.k
    if 0 in q.shape or k.shape[1] == 0 or call_reasons(call) or _call_supports(call):
        return None
    new = getattr(SPEC.load(), "forward_new", None)
    if new is None:
        return None
    options = (float(call.scale), float(call.softcap), int(call.window_left),
               int(call.window_right), VARIANTS[config.get("variant", "base")])
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if stream is None:
        return None

    def launch(q, k, v):
        if torch.cuda.current_device() != index:
            with torch.cuda.device(index):
                return new(q, k, v, *options, stream(index))
        return new(q, k, v, *options, stream(index))

    return launch


_SUPPORTS: dict[tuple, tuple[str, ...]] = {}


def _call_supports(call, backward: bool = False) -> tuple[str, ...]:
    """:func:`supports` of the call's problem, remembered by what it reads (run() checks it on
    every call; building the Problem would cost more than the check)."""
    q = call.q
    key = (q.device.index, q.dtype, q.shape[-1], call.varlen,
           call.batch > _MAX_GRID_YZ or q.shape[-2] > _MAX_GRID_YZ,
           max(call.max_seqlen_q, call.max_seqlen_k) >= _MAX_SEQLEN, backward)
    found = _SUPPORTS.get(key)
    if found is None:
        found = _SUPPORTS[key] = tuple(supports(problem_of(call), backward))
    return found


_NOT_DETERMINISTIC = "sm90 backward adds dq with fp32 atomics: not deterministic"


def supports_backward(problem: Problem) -> list[str]:
    """Reasons the sm90 backward cannot run ``problem``; empty when it can."""
    reasons = supports(problem, backward=True)
    if problem.get("deterministic", False):
        reasons.append(_NOT_DETERMINISTIC)
    return reasons


def _tma_reasons(name: str, t: torch.Tensor) -> list[str]:
    elem = t.element_size()
    misaligned = [s for s, n in zip(t.stride()[:-1], t.shape[:-1], strict=True)
                  if n > 1 and (s * elem) % _ALIGN_BYTES]
    if misaligned or t.data_ptr() % _ALIGN_BYTES:
        return [f"sm90 kernel: {name} needs a 16-byte aligned address and 16-byte multiple "
                f"strides (TMA), got strides {tuple(t.stride())}"]
    return []


def _pair_reasons(name: str, t: torch.Tensor) -> list[str]:
    """An output (or out, read by the backward) accessed two elements at a time where its rows
    are not TMA-aligned: a 4-byte aligned address and even strides."""
    if t.data_ptr() % 4 or any(s % 2 for s in t.stride()[:-1]):
        return [f"sm90 kernel: {name} needs a 4-byte aligned address and even strides, got "
                f"strides {tuple(t.stride())}"]
    return []


def backward_call_reasons(call) -> list[str]:
    """Layout reasons of a backward call: q, k, v and dout are read by TMA (16-byte aligned);
    out is read and dq, dk, dv written either with TMA / 16-byte accesses where their rows
    allow it or two elements at a time (4-byte aligned)."""
    reasons = []
    for name in ("q", "k", "v", "dout", "out", "dq", "dk", "dv"):
        t = getattr(call, name)
        if t.dim() != 4:
            reasons.append(f"sm90 kernel: {name} must be (B, S, H, D)")
            continue
        if t.stride(-1) != 1:
            reasons.append(f"sm90 kernel: {name} needs a contiguous last dim")
        elif name in ("q", "k", "v", "dout"):
            reasons += _tma_reasons(name, t)
        else:
            reasons += _pair_reasons(name, t)
    return reasons


def run_backward(call, config: Config, layout_checked: bool = False) -> None:
    """Write ``call.dq``, ``call.dk`` and ``call.dv``; ``config`` has no options but ``impl``.
    ``layout_checked``: as for :func:`run` (the caller has just found no
    :func:`backward_call_reasons`)."""
    unknown = set(config) - {"impl"}
    if unknown:
        raise ValueError(f"{OP}[sm90]: unknown backward config keys {sorted(unknown)}")
    reasons = list(_call_supports(call, backward=True))
    if call.deterministic:
        reasons.append(_NOT_DETERMINISTIC)
    if not layout_checked:
        reasons += backward_call_reasons(call)
    if reasons:
        raise ValueError(f"{OP}[sm90]: cannot run this backward call: " + "; ".join(reasons))
    q, k = call.q, call.k
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    if seqlen_q == 0 or seqlen_k == 0 or batch == 0 or heads == 0:
        # No score at all: every gradient is 0.
        for t in (call.dq, call.dk, call.dv):
            t.zero_()
        return
    lse = call.lse.float().contiguous()
    dlse = None if call.dlse is None else call.dlse.float().contiguous()
    module = SPEC.load()
    with on_device(q.device):
        workspace = torch.empty(module.backward_workspace(batch, seqlen_q, heads, head_dim),
                                dtype=torch.float32, device=q.device)
        stream = raw_stream(q.device)
        module.backward(call.dout, dlse, q, k, call.v, call.out, lse, call.dq, call.dk, call.dv,
                        workspace, float(call.scale), float(call.softcap),
                        int(call.window_left), int(call.window_right), stream)
