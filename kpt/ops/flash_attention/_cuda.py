"""CUDA and HIP backends of ``flash_attention`` (forward and backward): JIT build of
``csrc/flash_attention`` and the launchers that serve both (one kernel source for nvcc and
hipcc). See ``CUDA_NOTES.md`` for the kernel design.

Besides the registry's ``run``/``run_backward``, :func:`forward` and :func:`backward` are public
launchers with the flex hooks (ALiBi slopes, prefix length, document ids, per-query-block key
ranges) that ``flex_attention``'s CUDA backend builds on.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor

from kpt.jit import BuildError, JitSpec
from kpt.ops._common import grid_yz_reasons, is_rocm, jit_unavailable, on_device, raw_stream
from kpt.ops._registry import BackendUnavailable, Config, Problem

OP = "flash_attention"

SPEC = JitSpec(
    name="flash_attention",
    sources=(
        "flash_attention/api.cu",
        "flash_attention/simt.cu",
        "flash_attention/fwd_d64.cu",
        "flash_attention/fwd_d128.cu",
        "flash_attention/fwd_d256.cu",
        "flash_attention/bwd_d64.cu",
        "flash_attention/bwd_d128.cu",
        "flash_attention/binding.cpp",
    ),
)

# The query block kv_block_range refers to (KPT_FA_Q_BLOCK in kpt/flash_attention.h): row qb
# of the range covers queries [qb * Q_BLOCK, (qb + 1) * Q_BLOCK) of its sequence.
Q_BLOCK = 128
MAX_HEAD_DIM = 256
# The tensor-core dK/dV kernel keeps dK and dV (head_dim fp32 values a thread) in registers:
# at 256 they would spill, so larger head dims take the SIMT backward (CUDA_NOTES.md).
MMA_BACKWARD_MAX_HEAD_DIM = 128
_HALF = (torch.float16, torch.bfloat16)
_IMPLS = {"mma": 0, "simt": 1}


# Why the CUDA / HIP backend cannot run here (the build's prerequisites, checked once without
# building), or None; the CUDA-vs-ROCm torch check is the registry's (``rocm=`` flags).
cuda_unavailable = hip_unavailable = jit_unavailable(lambda: SPEC)


def supports(problem: Problem) -> list[str]:
    """Problem-level reasons; pointer/stride alignment is handled per call (copies)."""
    d = problem["head_dim"]
    # Grids: heads in y, batch (varlen: sequences) in z.
    reasons = grid_yz_reasons(heads=problem.get("heads_q", 0), batch=problem.get("batch", 0))
    if d > MAX_HEAD_DIM:
        reasons.append(f"head_dim {d} > {MAX_HEAD_DIM}")
    if d % 8:
        reasons.append(f"head_dim {d} is not a multiple of 8 (16-byte cp.async rows)")
    return reasons


def _sm90_module() -> Any | None:
    """The sm90 (wgmma) forward, when it imports; it is optional and owned elsewhere."""
    try:
        return importlib.import_module(f"{__package__}._sm90")
    except Exception:  # noqa: BLE001 - any import failure just means "not offered"
        return None


def _sm90_offered(problem: Problem, backward: bool = False) -> bool:
    """Whether the sm90 kernel (forward, or backward) can run ``problem`` on this device."""
    if is_rocm() or problem.device_type != "cuda":
        return False
    # supports() checks availability and the (cached) compute capability.
    module = _sm90_module()
    if module is None:
        return False
    return not (module.supports_backward(problem) if backward else module.supports(problem))


def _sm90_config(problem: Problem) -> list[Config]:
    if not _sm90_offered(problem):
        return []
    # "dynamic" (the overlap kernel's FA3 schedule in persistent CTAs that take query tiles from
    # a counter, longest first) leads for every mask: in one interleaved run on the H200
    # (scripts/forward_variants_ab.py) it matched the one-CTA-per-tile "overlap" launch within
    # 2% without a mask and beat it by 5-13% with causal and window masks, where the static
    # stride of "persistent" had lost up to 23% (SM90_NOTES.md, "Tile scheduling").
    # Varlen batches run in the overlap kernel only (no "base").
    if problem["varlen"]:
        return [{"impl": "sm90", "variant": "dynamic"}, {"impl": "sm90", "variant": "overlap"}]
    return [{"impl": "sm90", "variant": "dynamic"}, {"impl": "sm90", "variant": "overlap"},
            {"impl": "sm90"}]


def prefer(problem: Problem) -> tuple[str, ...]:
    """The forward's ``prefer`` hook: on Hopper, the cuda backend (its sm90 kernels) before
    Triton. With dynamic tile scheduling the sm90 forward measured faster than Triton's in every
    benchmarked case, head dim 64 with a causal mask included (332 vs 314 TFLOP/s at B8 H16
    S2048, 2026-11-24, H200; SM90_NOTES.md, "Tile scheduling")."""
    return ("cuda",) if _sm90_config(problem) else ()


# From this length on (queries and keys) the sm90 backward is dispatch's first choice: it beat
# Triton's on the H200 in every case measured, 512 to 16384 tokens, head dims 64 and 128, full,
# causal and sliding-window masks (1.01-1.41x; a tie at D = 64 causal, 1024 tokens;
# SM90_NOTES.md, "Backward"). Shorter sequences were not measured and keep Triton's.
SM90_BACKWARD_MIN_SEQLEN = 512


def prefer_backward(problem: Problem) -> tuple[str, ...]:
    """The backward's ``prefer`` hook: on Hopper, the cuda backend (its sm90 kernel) before
    Triton from ``SM90_BACKWARD_MIN_SEQLEN`` tokens, and for a soft cap without a mask at any
    length; Triton keeps shorter sequences and deterministic problems (the sm90 kernel adds dq
    with fp32 reductions, so ``_sm90_offered`` declines those)."""
    shortest = min(problem["seqlen_q"], problem["seqlen_k"])
    wanted = shortest >= SM90_BACKWARD_MIN_SEQLEN or (problem["softcap"]
                                                      and problem["mask"] == "full")
    if not wanted:
        return ()
    return ("cuda",) if _sm90_offered(problem, backward=True) else ()


def configs(problem: Problem) -> list[Config]:
    """Forward variants; the first is the default. HIP has only the SIMT kernels."""
    if is_rocm():
        return [{"impl": "simt"}]
    # On Hopper the wgmma kernel leads: it passed every test on the H200 (SM90_NOTES.md);
    # the tuner times all three where it has run.
    return [*_sm90_config(problem), {"impl": "mma"}, {"impl": "simt"}]


def backward_configs(problem: Problem) -> list[Config]:
    """Backward variants; the first is the default. On Hopper the sm90 wgmma kernel leads where
    it runs (3-6x the mma kernel; it adds dq with fp32 reductions, so a ``deterministic``
    problem never gets it); mma and simt are deterministic (no atomics). The dispatcher puts
    this backend ahead of Triton only where ``prefer_backward`` says."""
    if is_rocm() or problem["head_dim"] > MMA_BACKWARD_MAX_HEAD_DIM:
        return [{"impl": "simt"}]
    sm90 = [{"impl": "sm90"}] if _sm90_offered(problem, backward=True) else []
    return [*sm90, {"impl": "mma"}, {"impl": "simt"}]


def _misaligned(t: Tensor) -> str | None:
    """Why the kernels cannot address ``t`` in place, or None."""
    if t.stride(-1) != 1:
        return "its last dim is not contiguous"
    if t.data_ptr() % 16:
        return "its data pointer is not 16-byte aligned"
    if any(st % 8 and size > 1 for st, size in zip(t.stride()[:-1], t.shape[:-1])):
        return "a stride is not a multiple of 8 elements (16 bytes)"
    return None


def _aligned(t: Tensor) -> Tensor:
    return t if _misaligned(t) is None else t.clone(memory_format=torch.contiguous_format)


def _module(device: torch.device):
    try:
        return SPEC.load()
    except BuildError as err:
        raise BackendUnavailable(f"{OP}: {err}") from err


def _impl(config: Config | None) -> int:
    """The kernel family; the default is mma on NVIDIA (for the backward the C side runs SIMT
    where mma has no bucket: head_dim > MMA_BACKWARD_MAX_HEAD_DIM)."""
    impl = (config or {}).get("impl", "simt" if is_rocm() else "mma")
    if impl not in _IMPLS:
        raise ValueError(f"{OP}: unknown cuda/hip impl {impl!r}")
    if is_rocm():
        impl = "simt"
    return _IMPLS[impl]


def _check(name: str, t: Tensor | None, q: Tensor, dtype: torch.dtype | None,
           ndim: int | None) -> None:
    if t is None:
        return
    if t.device != q.device:
        raise ValueError(f"{OP}: {name} is on {t.device}, expected {q.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{OP}: {name} must be {dtype}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{OP}: {name} must have {ndim} dims, got {tuple(t.shape)}")


def _validate(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor | None, cu_k: Tensor | None,
              max_q: int | None, max_k: int | None, hooks: dict[str, Tensor | None],
              tensors: dict[str, Tensor]) -> tuple[int, int, int]:
    """Checks for the public launchers; returns (batch, max_seqlen_q, max_seqlen_k)."""
    if q.device.type != "cuda":
        raise ValueError(f"{OP}: the cuda/hip launcher needs GPU tensors, got {q.device}")
    if q.dtype not in _HALF:
        raise TypeError(f"{OP}: the cuda/hip launcher takes float16/bfloat16, got {q.dtype}")
    varlen = cu_q is not None
    if varlen != (cu_k is not None):
        raise ValueError(f"{OP}: cu_seqlens_q and cu_seqlens_k come together")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM or d % 8:
        raise ValueError(f"{OP}: head_dim {d} must be a multiple of 8 and <= {MAX_HEAD_DIM}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"{OP}: q heads {q.shape[-2]} not a multiple of kv heads "
                         f"{k.shape[-2]}")
    for name, t in tensors.items():
        _check(name, t, q, q.dtype, 3 if varlen else 4)
        reason = _misaligned(t)
        if reason:
            raise ValueError(f"{OP}: {name} cannot be read in place: {reason}")
    if varlen:
        _check("cu_seqlens_q", cu_q, q, torch.int32, 1)
        _check("cu_seqlens_k", cu_k, q, torch.int32, 1)
        if max_q is None or max_k is None:
            raise ValueError(f"{OP}: varlen calls need max_seqlen_q and max_seqlen_k")
        batch = cu_q.shape[0] - 1
    else:
        batch = q.shape[0]
        max_q = q.shape[1] if max_q is None else max_q
        max_k = k.shape[1] if max_k is None else max_k
    heads = q.shape[-2]
    _check("alibi_slopes", hooks["alibi_slopes"], q, torch.float32, 1)
    for name in ("prefix_len", "doc_q", "doc_k", "kv_block_range"):
        _check(name, hooks[name], q, torch.int32, None)
    if (hooks["doc_q"] is None) != (hooks["doc_k"] is None):
        raise ValueError(f"{OP}: doc_q and doc_k come together")
    rng = hooks["kv_block_range"]
    if rng is not None:
        blocks = -(-max_q // Q_BLOCK)
        if (rng.dim() != 4 or rng.shape[0] != batch or rng.shape[1] not in (1, heads)
                or rng.shape[2] < blocks or rng.shape[3] != 2):
            raise ValueError(f"{OP}: kv_block_range must be (batch={batch}, {heads} or 1, "
                             f">= {blocks} query blocks of {Q_BLOCK}, 2), got "
                             f"{tuple(rng.shape)}")
    return batch, max_q, max_k


def _hooks(alibi_slopes, prefix_len, doc_q, doc_k, kv_block_range) -> dict:
    def dense(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.contiguous()

    return {"alibi_slopes": dense(alibi_slopes), "prefix_len": dense(prefix_len),
            "doc_q": None if doc_q is None else doc_q if doc_q.stride(-1) == 1
            else doc_q.contiguous(),
            "doc_k": None if doc_k is None else doc_k if doc_k.stride(-1) == 1
            else doc_k.contiguous(),
            "kv_block_range": dense(kv_block_range)}


def forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
            cu_seqlens_q: Tensor | None = None, cu_seqlens_k: Tensor | None = None,
            max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
            scale: float, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
            alibi_slopes: Tensor | None = None, prefix_len: Tensor | None = None,
            doc_q: Tensor | None = None, doc_k: Tensor | None = None,
            kv_block_range: Tensor | None = None, config: Config | None = None) -> None:
    """Write ``out`` (like q) and ``lse`` (fp32 (B, H, Sq) or (H, Tq), unit token stride).

    q/k/v/out: (B, S, H, D) with any 16-byte aligned strides and a contiguous last dim, or
    varlen (T, H, D) with int32 ``cu_seqlens_q/k`` and ``max_seqlen_q/k``. Masks are those of
    ``flash_attention`` (bottom-right band, -1 unbounded); the flex hooks, all optional:

    * ``alibi_slopes`` fp32 (H,): ``s += slope[h] * (kv_idx - q_idx)`` after the soft-cap;
    * ``prefix_len`` int32 (B,): key j is also visible when ``j < prefix_len[b]``;
    * ``doc_q`` int32 (B, >= Sq), ``doc_k`` (B, >= Sk): visible only if the ids are equal;
    * ``kv_block_range`` int32 (B, H or 1, ceil(Sq / Q_BLOCK), 2): keys ``[lo, hi)`` of the
      query block ``[qb * Q_BLOCK, (qb + 1) * Q_BLOCK)``; other keys are masked and whole key
      tiles outside are skipped.

    Indices are in-sequence positions. Varlen rows outside every sequence are not written.
    """
    hooks = _hooks(alibi_slopes, prefix_len, doc_q, doc_k, kv_block_range)
    batch, max_q, max_k = _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, hooks, {"q": q, "k": k, "v": v, "out": out})
    if (config or {}).get("impl") == "sm90":
        raise ValueError(f"{OP}: the sm90 impl is reached through the registry only")
    module = _module(q.device)
    with on_device(q.device):
        stream = raw_stream(q.device)
        module.forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_q, max_k,
                       float(scale), int(window_left), int(window_right), float(softcap),
                       hooks["alibi_slopes"], hooks["prefix_len"], hooks["doc_q"],
                       hooks["doc_k"], hooks["kv_block_range"], _impl(config), stream)


def backward(dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
             lse: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, *,
             cu_seqlens_q: Tensor | None = None, cu_seqlens_k: Tensor | None = None,
             max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, scale: float,
             window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
             alibi_slopes: Tensor | None = None, prefix_len: Tensor | None = None,
             doc_q: Tensor | None = None, doc_k: Tensor | None = None,
             kv_block_range: Tensor | None = None, deterministic: bool = False,
             config: Config | None = None) -> None:
    """Write ``dq``, ``dk``, ``dv`` (like q, k, v) from the forward's ``out`` and ``lse`` and
    the gradients ``dout`` (like out) and optional ``dlse`` (like lse). Same layouts and hooks
    as :func:`forward` (ALiBi slopes and the masks get no gradient). ``config`` picks the
    kernels: ``{"impl": "mma"}`` (tensor cores, the default on NVIDIA; head_dim above
    ``MMA_BACKWARD_MAX_HEAD_DIM`` runs SIMT) or ``{"impl": "simt"}``. Every config is
    deterministic (no atomics), so ``deterministic`` changes nothing today. Varlen rows
    outside every sequence are not written."""
    hooks = _hooks(alibi_slopes, prefix_len, doc_q, doc_k, kv_block_range)
    batch, max_q, max_k = _validate(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, hooks,
        {"q": q, "k": k, "v": v, "out": out, "dout": dout, "dq": dq, "dk": dk, "dv": dv})
    lse_dense = lse if lse.stride(-1) == 1 else lse.contiguous()
    delta = torch.empty_strided(lse_dense.shape, lse_dense.stride(), dtype=torch.float32,
                                device=q.device)
    if dlse is not None and dlse.stride() != lse_dense.stride():
        dlse = torch.empty_strided(lse_dense.shape, lse_dense.stride(), dtype=torch.float32,
                                   device=q.device).copy_(dlse)
    module = _module(q.device)
    with on_device(q.device):
        stream = raw_stream(q.device)
        module.backward(dout, None if dlse is None else dlse.float(), q, k, v, out, lse_dense,
                        delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_q, max_k,
                        float(scale), int(window_left), int(window_right), float(softcap),
                        hooks["alibi_slopes"], hooks["prefix_len"], hooks["doc_q"],
                        hooks["doc_k"], hooks["kv_block_range"],
                        _impl(config), stream)


def _into(dst: Tensor) -> tuple[Tensor, bool]:
    """``dst`` itself when the kernels can write it in place, else an aligned scratch copy."""
    if _misaligned(dst) is None:
        return dst, False
    return torch.empty(dst.shape, dtype=dst.dtype, device=dst.device), True


def _shared(call) -> dict:
    return dict(cu_seqlens_q=call.cu_seqlens_q, cu_seqlens_k=call.cu_seqlens_k,
                max_seqlen_q=call.max_seqlen_q, max_seqlen_k=call.max_seqlen_k,
                scale=call.scale, window_left=call.window_left,
                window_right=call.window_right, softcap=call.softcap)


def _sm90_ran(call, config: Config, backward: bool) -> bool:
    """Run the sm90 kernel named by ``config``. The Problem has no strides: a call whose
    layout TMA cannot address (misaligned strides) returns False and runs the mma kernels,
    which copy what they cannot read in place."""
    module = _sm90_module()
    if module is None:
        raise BackendUnavailable(f"{OP}: the sm90 kernels do not import")
    if (module.backward_call_reasons if backward else module.call_reasons)(call):
        return False
    if backward:
        module.run_backward(call, config, layout_checked=True)
    else:
        module.run(call, config, layout_checked=True)
    return True


def run(call, config: Config) -> None:
    """Registry entry of the forward (``cuda`` and ``hip``): write call.out and call.lse."""
    if config.get("impl") == "sm90":
        if _sm90_ran(call, config, backward=False):
            return
        config = {"impl": "mma"}
    out, copy = _into(call.out)
    if copy and call.varlen:
        out.zero_()  # rows outside every sequence are not written by the kernel
    forward(_aligned(call.q), _aligned(call.k), _aligned(call.v), out, call.lse,
            config=config, **_shared(call))
    if copy:
        call.out.copy_(out)


def fast(call, config: Config):
    """``Backend.fast`` of the forward: the sm90 kernel's own launcher for repeats of a call it
    ran (dense, TMA-addressable layout); the mma kernels have none (None)."""
    if config.get("impl") != "sm90" or call.varlen:
        return None
    module = _sm90_module()
    if module is None or module.call_reasons(call):
        return None
    return module.fast_forward(call, config)


def run_backward(call, config: Config) -> None:
    """Registry entry of the backward: write call.dq, call.dk, call.dv."""
    if config.get("impl") == "sm90":
        if _sm90_ran(call, config, backward=True):
            return
        config = {"impl": "mma"}
    grads = [_into(t) for t in (call.dq, call.dk, call.dv)]
    for (t, copy) in grads:
        if copy and call.varlen:
            t.zero_()
    (dq, _), (dk, _), (dv, _) = grads
    backward(_aligned(call.dout), call.dlse, _aligned(call.q), _aligned(call.k),
             _aligned(call.v), _aligned(call.out), call.lse, dq, dk, dv,
             deterministic=call.deterministic, config=config, **_shared(call))
    for dst, (t, copy) in zip((call.dq, call.dk, call.dv), grads):
        if copy:
            dst.copy_(t)
