"""Edge cases of every kpt op with a native CUDA backend, for NVIDIA compute-sanitizer.

Each case runs one op with ``backend="cuda"`` (the csrc kernels) on small edge-case inputs
(fresh random data, never zeros, a fixed seed per case) and compares every output, and for the
differentiable ops every gradient, with ``backend="reference"`` on the same inputs, at the
tolerances of the op's GPU tests. Under memcheck an out-of-bounds access is the sanitizer's
report; a wrong value is this script's. The device is synchronised after every case, so a
fault is reported under the case that caused it.

Ops and what their cases stress (``--list`` prints every case):

* ``flash_attention``: forward and backward through autograd (gradients through lse too);
  lengths 1, tile remainders, causal with Sq > Sk (rows that see nothing) and Sq < Sk, sliding
  windows, soft-cap, GQA/MQA, head dims 8 to 256 (80 included), transposed, padded and
  misaligned q/k/v; varlen with empty sequences, queries without keys, NaN padding rows.
* ``flex_attention``: the named mods the cuda backend lowers to kernel hooks (document ids,
  prefix lengths, ALiBi slopes, block-mask key ranges), forward and backward.
* ``rmsnorm_qkv_rope``: T = 0, 1, odd T, both projection paths (GEMV up to 16 tokens, GEMM
  above), hidden sizes that are multiples of 8 only, head dims 8 to 256, partial rotary, bias,
  q/k norm, broadcast positions, strided and misaligned activations, an autograd call.
* ``paged_attention`` (caches written with ``append_paged_kv``, a reference-only op):
  decode and chunked prefill, page sizes 1, 16, odd and 256, both layouts, empty sequences,
  queries without keys, split-KV lengths, GQA groups that are not a power of two, windows,
  soft-cap, fp8 caches (e4m3 and e5m2, per-tensor and per-head scales); every page and slot no
  sequence owns holds NaN (16-bit caches) and unused table entries an invalid page id.
* ``cascade_attention`` (levels of ``paged_attention`` merged) and ``merge_attention_states``.
* ``fp8_gemm``: M = 0, 1, 3, 17, 65, 129, every pair of scale granularities, partial 128-blocks
  of K, bias, every output dtype, e4m3 and e5m2, a K split, strided operands.
* ``int4_gemm``: M = 0, 1, 3, 17, 65; group sizes 32, 64, 128 and -1; symmetric and zero
  point; act-order ``g_idx``; 16-bit scales; bias; strided, misaligned and 3-D activations.
* ``moe_route``: 1 to 257 tokens, 8 to 512 experts, softmax and sigmoid, grouped top-k,
  correction bias. ``fused_moe``: T = 0, 1, 3, 257; top-k 1, 2 and 8; an expert map with -1s;
  experts without tokens; every activation; fp8 and int4 experts.

Usage, from the repository root on a GPU machine. Build the JIT extensions with one plain run
first (it also checks every value quickly), so that nvcc never runs under the sanitizer::

    python3 scripts/sanitize.py
    compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize.py \
        [--ops flash_attention,fp8_gemm] [--only TEXT] [--all-configs]
    python3 scripts/sanitize.py --backend reference --device cpu     # smoke test, any machine
    python3 scripts/sanitize.py --list

``--ops`` keeps the named ops (comma-separated, as in the list above), ``--only`` the cases
whose ``op/name`` contains TEXT. ``--all-configs`` runs each case once per config of the
backend's ``configs(problem)`` (the kernel variants and tiles the autotuner chooses from; the
default run gets only the first, e.g. the sm90 kernels on Hopper). ``--backend reference``
compares the reference with itself: it proves the cases build and run, and checks that every
problem they make is one the cuda backend's ``supports()`` accepts.

The script sets ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (unless it is set already): with torch's
caching allocator a read past a tensor usually lands in the same cached segment, where
memcheck cannot see it. cudaMalloc still rounds allocations up, so small overreads inside that
rounding go unseen; the NaN in unused pages, padding rows and padding columns catches some of
those as wrong values. ``--tool initcheck`` and ``--tool racecheck`` take the same command.

Each case prints one line: op, case, PASS or FAIL, the largest absolute difference from the
reference over every compared tensor, its wall time and the config each kernel ran with (a
FAIL adds a line saying why). A CUDA error leaves the context unusable, so the run stops at
the case that raised it and says how many cases did not run. A summary comes last. Exit
status: 0 when every case passed, 1 when one failed (a value beyond tolerance, or an
exception), 2 for bad arguments or a missing device; memcheck's errors give the sanitizer's
``--error-exitcode``.

Standing: on an H100 (2026-12-07, torch 2.11.0+cu130), all 126 cases the script had then
passed, plain and under ``compute-sanitizer --tool memcheck`` (0 errors), in two runs split by
op. Of the five overflow cases added since (the end-of-softmax rule of
``csrc/include/kpt/softmax.h``), the four of ``--only overflow`` ran on an H100 on 2026-12-08
under memcheck: 0 errors; the two paged ones failed on values (the CUDA paged kernel folded the
scale into q, so one feature's product overflowed to inf - inf = NaN where the reference's
logit is +-inf). The kernel now scales each dot product instead; that fix, and
``--only nan-key``, have run on the CPU only (reference and Triton under the interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")  # before torch allocates

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # kpt from this checkout

from kpt.ops import (  # noqa: E402
    append_paged_kv,
    cascade_attention,
    flash_attention,
    flex_attention,
    fp8_gemm,
    fused_moe,
    int4_gemm,
    merge_attention_states,
    merge_attention_states_,
    moe_route,
    pack_int4,
    paged_attention,
    quantize_fp8,
    rmsnorm_qkv_rope,
)
from kpt.ops._common import compare  # noqa: E402
from kpt.ops._registry import Config, Op, Problem, all_ops  # noqa: E402
from kpt.ops.flash_attention import BACKWARD_TOLERANCE, TOLERANCE, compare_lse  # noqa: E402
from kpt.ops.flex_attention import create_block_mask, mods  # noqa: E402
from kpt.ops.moe import reference as moe_reference  # noqa: E402
from kpt.ops.rmsnorm_qkv_rope import TOLERANCE as ROPE_TOLERANCE  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
NEG_INF = float("-inf")

# ---- tolerances (those of the ops' GPU tests, whose comments give the derivations) ---------

# Attention (flash, flex, paged, cascade): P rounded to the input dtype before P @ V and fp32
# sums in another order: bound 2 units in the last place (bf16 u = 2^-8, fp16 2^-11); lse is
# fp32 from the same inputs (1e-5); gradients also round dS and P: 4u.
ATTN_TOL = TOLERANCE
ATTN_BWD_TOL = BACKWARD_TOLERANCE
# rmsnorm_qkv_rope: the reference's rounding points, the projection summed in another order:
# one unit. Its backward is one PyTorch implementation whichever backend ran the forward, from
# the inputs and the new residual: equal up to summation order; 4u is the backward tests'
# same-dtype bound (tests/ops/test_rmsnorm_qkv_rope_backward.py).
ROPE_TOL = ROPE_TOLERANCE
ROPE_BWD_TOL = {BF16: 4 * 2**-8, FP16: 4 * 2**-11, FP32: 1e-5}
# merge_attention_states of two parts each rounded to bf16/fp16 once: within ~1 unit of the
# whole, norm-wise (tests/ops/test_cascade_attention.py), plus the parts' own kernel error.
MERGE_TOL = {BF16: 2**-6, FP16: 2**-9}
# fp8_gemm: exact fp8 products summed in float32 in another order (1e-5 for float32 out), then
# one rounding of the output (one unit of bf16 / fp16). Hopper's wgmma (the default above 64
# rows there) keeps ~14 mantissa bits inside an instruction chain: 2^-10 norm-wise for float32
# and fp16 out (tests/ops/test_fp8_gemm_cuda.py).
FP8_GEMM_TOL = {FP32: 1e-5, BF16: 2**-8, FP16: 2**-11}
FP8_GEMM_SM90_TOL = {FP32: 2**-10, BF16: 2**-8, FP16: 2**-10}
# int4_gemm: the same dequantised weight, float32 sums in another order, one final rounding:
# one unit (tests/ops/test_int4_gemm_cuda.py).
INT4_TOL = {BF16: 2**-8, FP16: 2**-11}
# fused_moe: two GEMMs and an intermediate rounding, sums reordered: one unit norm-wise (fp16
# 2^-9 for its headroom); int4 experts dequantise exactly, so the same. fp8 experts: a value
# one unit off can cross an e4m3 rounding boundary (~1.3% norm-wise at worst, measured 0.95%).
MOE_TOL = {BF16: 2**-7, FP16: 2**-9}
MOE_FP8_TOL = 2**-6
# moe_route: float32 softmax / sigmoid in another order and a sum of <= 8 weights.
ROUTE_RTOL, ROUTE_ATOL = 1e-5, 1e-7


# ---- cases and their context -----------------------------------------------------------------


@dataclass
class Ctx:
    """What a case gets: the backend under test, the device, the case's seeded generator, and
    the comparisons' results so far (failure reasons, the largest absolute difference)."""

    backend: str
    device: torch.device
    gen: torch.Generator
    failures: list[str] = field(default_factory=list)
    max_abs: float = 0.0

    def randn(self, *shape: int, dtype: torch.dtype = BF16, scale: float = 1.0,
              shift: float = 0.0) -> Tensor:
        """Normal values made on the CPU (the same on every device), then moved."""
        t = torch.randn(*shape, generator=self.gen) * scale + shift
        return t.to(device=self.device, dtype=dtype)

    def randint(self, low: int, high: int, *shape: int, dtype: torch.dtype = torch.int32
                ) -> Tensor:
        return torch.randint(low, high, shape, generator=self.gen).to(self.device, dtype)

    def perm(self, n: int) -> Tensor:
        return torch.randperm(n, generator=self.gen)

    def record(self, got: Tensor, want: Tensor) -> None:
        if got.shape != want.shape or got.numel() == 0:
            return
        diff = (got.detach().double().cpu() - want.detach().double().cpu()).abs()
        diff = diff[torch.isfinite(diff)]
        if diff.numel():
            self.max_abs = max(self.max_abs, diff.max().item())

    def _fail(self, reason: str | None) -> None:
        if reason is not None:
            self.failures.append(reason)

    def close(self, name: str, got: Tensor, want: Tensor, tol: float) -> None:
        """``kpt.ops._common.compare``: finite where the reference is, norm-wise relative error
        within ``tol`` and no element off by more than 4 tol max|ref|."""
        self.record(got, want)
        self._fail(compare(name, got, want, tol))

    def lse(self, name: str, got: Tensor, want: Tensor) -> None:
        """A logsumexp: -inf (no visible key) exactly where the reference has it."""
        self.record(got, want)
        self._fail(compare_lse(name, got, want))

    def specials(self, name: str, got: Tensor, want: Tensor, tol: float) -> None:
        """NaN, +inf and -inf exactly where the reference has them (the overflow rule of
        kpt/ops/flash_attention/reference.py, csrc/include/kpt/softmax.h), and ``close`` on
        the rest (non-finite entries compared as 0)."""
        g, w = got.detach().cpu(), want.detach().cpu()
        for what, of in (("NaN", torch.isnan), ("+inf", torch.isposinf),
                         ("-inf", torch.isneginf)):
            if not torch.equal(of(g), of(w)):
                self._fail(f"{name}: {what} at {int((of(g) != of(w)).sum())} places where the "
                           "reference differs")
        zero = lambda t: t.float().nan_to_num(0.0, 0.0, 0.0)  # noqa: E731
        self.close(name, zero(g), zero(w), tol)

    def grad(self, name: str, got: Tensor, want: Tensor, tol: float, noise: float) -> None:
        """``close``, except for a gradient the reference finds within ``noise`` of zero
        everywhere (dq, dk when every query sees one key: the exact gradient is 0 and both
        sides keep rounding noise): there every element must be within ``noise``."""
        if want.detach().abs().max().item() > noise:
            return self.close(name, got, want, tol)
        self.record(got, want)
        worst = got.detach().float().abs().max().item() if got.numel() else 0.0
        if worst > noise:
            self._fail(f"{name}: max |grad| {worst:.3e} where the exact gradient is 0 "
                       f"(noise bound {noise:.3e})")


@dataclass(frozen=True)
class Case:
    """One edge case: ``run(ctx)`` calls the op on ``ctx.backend`` and on the reference."""

    op: str
    name: str
    run: Callable[[Ctx], None]

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}"


CASES: list[Case] = []


def add(op: str, name: str, fn: Callable[..., None], **params: Any) -> None:
    """Register ``fn(ctx, **params)`` as case ``op/name``."""
    case = Case(op, name, lambda ctx: fn(ctx, **params))
    if any(c.key == case.key for c in CASES):
        raise ValueError(f"duplicate case {case.key}")
    CASES.append(case)


def cu_seqlens(lengths: Sequence[int], device: torch.device) -> Tensor:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


# ---- flash_attention -------------------------------------------------------------------------


def _leaf(ctx: Ctx, shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> Tensor:
    """A (B, S, H, D) tensor that requires grad, in one of the layouts the op reads:
    ``dense``; ``bhsd`` (a transposed (B, H, S, D) tensor, read in place); ``padded`` (a view
    of rows 8 elements wider, whose padding is NaN); ``offset`` (one element past a 16-byte
    boundary: the kernels read a copy)."""
    b, s, h, d = shape
    if layout == "bhsd":
        return ctx.randn(b, h, s, d, dtype=dtype).requires_grad_().transpose(1, 2)
    if layout == "padded":
        buf = torch.full((b, s, h, d + 8), float("nan"))
        buf[..., :d] = torch.randn(b, s, h, d, generator=ctx.gen)
        return buf.to(ctx.device, dtype).requires_grad_()[..., :d]
    if layout == "offset":
        n = b * s * h * d
        return ctx.randn(n + 1, dtype=dtype).requires_grad_()[1:].view(b, s, h, d)
    return ctx.randn(b, s, h, d, dtype=dtype).requires_grad_()


def _attention_grads(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, dlse: Tensor | None,
                     **kw: Any) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """out, lse and the gradients of sum(out * dout) + sum(lse * dlse) w.r.t. q, k, v."""
    out, lse = flash_attention(q, k, v, return_lse=True, **kw)
    loss = (out.float() * dout).sum()
    if dlse is not None:
        loss = loss + (lse.masked_fill(lse == NEG_INF, 0.0) * dlse).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, (q, k, v))


def _zero_grad_noise(dtype: torch.dtype, scale: float, dout: Tensor, v: Tensor,
                     other: Tensor) -> float:
    """Rounding noise of a gradient that is exactly zero (tests/ops/grad_checks.py): |ds| <=
    u |dO| |v| per score, times scale |other| (k for dq, q for dk)."""
    norm = lambda t: t.detach().float().nan_to_num().norm(dim=-1).max().item()  # noqa: E731
    return ATTN_BWD_TOL[dtype] * scale * norm(dout) * norm(v) * norm(other)


def _check_attention(ctx: Ctx, got: tuple, want: tuple, q: Tensor, k: Tensor, v: Tensor,
                     dout: Tensor, scale: float) -> None:
    dtype = q.dtype
    ctx.close("out", got[0], want[0], ATTN_TOL[dtype])
    ctx.lse("lse", got[1], want[1])
    for name, g, w, other in zip(("dq", "dk", "dv"), got[2], want[2], (k, q, q)):
        ctx.grad(name, g, w, ATTN_BWD_TOL[dtype], _zero_grad_noise(dtype, scale, dout, v, other))


def flash_dense(ctx: Ctx, *, b: int, sq: int, sk: int, h: int, hkv: int, d: int,
                dtype: torch.dtype = BF16, layout: str = "dense", with_dlse: bool = True,
                **options: Any) -> None:
    q = _leaf(ctx, (b, sq, h, d), dtype, layout)
    k = _leaf(ctx, (b, sk, hkv, d), dtype, layout)
    v = _leaf(ctx, (b, sk, hkv, d), dtype, layout)
    dout = ctx.randn(b, sq, h, d, dtype=FP32)
    dlse = ctx.randn(b, h, sq, dtype=FP32) if with_dlse else None
    got = _attention_grads(q, k, v, dout, dlse, backend=ctx.backend, **options)
    want = _attention_grads(q, k, v, dout, dlse, backend="reference", **options)
    _check_attention(ctx, got, want, q, k, v, dout, options.get("scale") or d**-0.5)


def flash_varlen(ctx: Ctx, *, lq: list[int], lk: list[int], h: int, hkv: int, d: int,
                 dtype: torch.dtype = BF16, give_max: bool = True, **options: Any) -> None:
    """Packed sequences followed by 5 NaN rows past the last sequence (never read, out 0 and
    zero gradients there), in buffers 8 columns wider whose padding is NaN too."""

    def packed(lengths: list[int], heads: int) -> Tensor:
        total = sum(lengths)
        buf = torch.full((total + 5, heads, d + 8), float("nan"))
        buf[:total, :, :d] = torch.randn(total, heads, d, generator=ctx.gen)
        return buf.to(ctx.device, dtype).requires_grad_()[:, :, :d]

    q, k, v = packed(lq, h), packed(lk, hkv), packed(lk, hkv)
    kw = dict(options, cu_seqlens_q=cu_seqlens(lq, ctx.device),
              cu_seqlens_k=cu_seqlens(lk, ctx.device))
    if give_max:
        kw.update(max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    dout = ctx.randn(*q.shape, dtype=FP32)
    dlse = ctx.randn(h, q.shape[0], dtype=FP32)
    got = _attention_grads(q, k, v, dout, dlse, backend=ctx.backend, **kw)
    want = _attention_grads(q, k, v, dout, dlse, backend="reference", **kw)
    _check_attention(ctx, got, want, q, k, v, dout, options.get("scale") or d**-0.5)


def flash_overflow(ctx: Ctx, *, b: int, sq: int, sk: int, h: int, hkv: int, d: int,
                   scale: float, nan_key: bool = False, **options: Any) -> None:
    """Forward only, logits past float32's range: kv head 0's keys all negative and its query
    rows of either sign (every logit -inf: out 0, lse -inf; or +inf: out NaN, lse +inf), the
    other kv heads mixed; optionally a NaN in one key (NaN rows where it is visible)."""
    q = ctx.randn(b, sq, h, d)
    k = ctx.randn(b, sk, hkv, d)
    v = ctx.randn(b, sk, hkv, d)
    k[:, :, 0] = -k[:, :, 0].abs()
    sign = torch.where(torch.arange(sq) % 3 == 0, -1.0, 1.0).to(ctx.device, q.dtype)
    group = h // hkv
    q[:, :, :group] = q[:, :, :group].abs() * sign[None, :, None, None]
    if nan_key:
        k[0, sk // 2, hkv - 1, 1] = float("nan")
    got = flash_attention(q, k, v, return_lse=True, backend=ctx.backend, scale=scale, **options)
    want = flash_attention(q, k, v, return_lse=True, backend="reference", scale=scale, **options)
    for name, g, w in zip(("out", "lse"), got, want):
        ctx.specials(name, g, w, ATTN_TOL[q.dtype])


FLASH = "flash_attention"
# name: (b, sq, sk, h, hkv, d, options); tiles are 64 / 128 rows, so 1, 33, 65, 129, 300 end
# inside one.
FLASH_DENSE = {
    "len1": (2, 1, 1, 4, 4, 64, {}),
    "len1-causal-d128": (1, 1, 1, 2, 1, 128, dict(causal=True)),
    "q1-k300-causal": (2, 1, 300, 4, 2, 128, dict(causal=True)),
    "causal-sq77>sk33-gqa": (2, 77, 33, 4, 2, 64, dict(causal=True)),
    "causal-sq33<sk150": (1, 33, 150, 2, 2, 128, dict(causal=True)),
    "causal-300-d128": (1, 300, 300, 2, 1, 128, dict(causal=True)),
    "full-sq65-sk129": (1, 65, 129, 4, 4, 64, {}),
    "full-sq129-sk17": (1, 129, 17, 2, 2, 64, {}),
    "window-31-7": (1, 200, 200, 2, 2, 64, dict(window=(31, 7))),
    "window-causal-16-sq129-sk257": (1, 129, 257, 4, 2, 128, dict(causal=True, window=(16, 0))),
    "window-sq>sk-nothing-visible": (1, 90, 20, 2, 2, 64, dict(window=(3, 2))),
    "softcap-65-fp16": (2, 65, 65, 2, 2, 128, dict(softcap=5.0, dtype=FP16)),
    "softcap-causal-mqa": (1, 100, 100, 8, 1, 64, dict(causal=True, softcap=2.0)),
    "combined-scale": (2, 17, 40, 4, 2, 64, dict(causal=True, window=(9, 0), softcap=3.0,
                                                 scale=0.3)),
    "d256-causal": (1, 70, 70, 2, 1, 256, dict(causal=True)),
    "d256-full-fp16": (1, 33, 97, 2, 2, 256, dict(dtype=FP16)),
    "d80-causal": (1, 45, 97, 4, 2, 80, dict(causal=True)),
    "d80-window": (2, 64, 64, 2, 2, 80, dict(window=(10, 10))),
    "d40-fp16": (1, 50, 50, 3, 1, 40, dict(dtype=FP16)),
    "d8": (1, 19, 23, 2, 2, 8, dict(causal=True)),
    "d192-softcap": (1, 40, 40, 2, 1, 192, dict(softcap=30.0)),
    "layout-bhsd": (2, 77, 77, 4, 2, 64, dict(layout="bhsd", causal=True)),
    "layout-padded": (1, 65, 40, 4, 2, 64, dict(layout="padded")),
    "layout-offset": (1, 33, 50, 2, 2, 128, dict(layout="offset", causal=True)),
    "layout-bhsd-d80-fp16": (1, 50, 50, 2, 2, 80, dict(layout="bhsd", dtype=FP16)),
    "no-dlse": (2, 17, 17, 2, 2, 64, dict(with_dlse=False)),
}
for _name, (_b, _sq, _sk, _h, _hkv, _d, _opts) in FLASH_DENSE.items():
    add(FLASH, _name, flash_dense, b=_b, sq=_sq, sk=_sk, h=_h, hkv=_hkv, d=_d, **_opts)
# Empty sequences, queries without keys (out 0, lse -inf), keys without queries, one token.
add(FLASH, "varlen-empty-seqs-causal", flash_varlen, lq=[0, 5, 0, 130, 1, 7],
    lk=[3, 0, 0, 200, 1, 7], h=4, hkv=2, d=64, causal=True)
add(FLASH, "varlen-window-softcap-d128", flash_varlen, lq=[17, 0, 3, 40], lk=[9, 0, 33, 40],
    h=4, hkv=2, d=128, causal=True, window=(6, 0), softcap=4.0)
add(FLASH, "varlen-full-d256-host-max", flash_varlen, lq=[1, 65, 0], lk=[70, 1, 5], h=2,
    hkv=1, d=256, give_max=False)
# The end-of-softmax rule (csrc/include/kpt/softmax.h) on every kernel: +inf / -inf rows.
add(FLASH, "overflow-d64", flash_overflow, b=2, sq=37, sk=150, h=4, hkv=2, d=64, scale=1e38)
add(FLASH, "overflow-d128-causal", flash_overflow, b=1, sq=130, sk=300, h=4, hkv=2, d=128,
    scale=1e38, causal=True)
add(FLASH, "nan-key-d128", flash_overflow, b=1, sq=70, sk=200, h=4, hkv=2, d=128, scale=0.1,
    nan_key=True, window=(50, 0))
add(FLASH, "varlen-d80-fp16", flash_varlen, lq=[33, 2], lk=[33, 129], h=2, hkv=2, d=80,
    dtype=FP16, window=(20, 20))


# ---- flex_attention --------------------------------------------------------------------------


def _flex_mods(name: str, sq: int, sk: int, h: int, b: int,
               device: torch.device) -> tuple[Callable | None, Callable | None]:
    if name == "plain":
        return None, None
    if name == "causal":
        return None, mods.causal()
    if name == "window":
        return None, mods.sliding_window(8)
    if name == "softcap":
        return mods.softcap(2.0), None
    pos = torch.arange(max(sq, sk), device=device)
    if name == "document-causal":  # uneven documents, one of a single token
        ids = torch.bucketize(pos, torch.tensor([40, 41, 97], device=device), right=True)
        return None, mods.and_masks(mods.document(ids.int()), mods.causal())
    if name == "document-batched":
        ids = torch.stack([(pos * 3 // pos.numel()), (pos * pos // 900)]).int()[:b]
        return None, mods.document(ids)
    if name == "prefix-lm":
        return None, mods.prefix_lm(torch.tensor([5, 100][:b], device=device))
    slopes = mods.alibi_slopes(h, device)
    if name == "alibi-causal":
        return mods.alibi(slopes), mods.causal()
    if name == "softcap-alibi-window":
        return mods.compose(mods.softcap(2.0), mods.alibi(slopes)), mods.sliding_window(8)
    if name == "alibi":
        return mods.alibi(slopes), None
    raise ValueError(f"unknown flex mods {name!r}")


def flex_case(ctx: Ctx, *, mod: str, sq: int, sk: int, h: int, hkv: int, d: int, b: int = 2,
              dtype: torch.dtype = BF16) -> None:
    score, mask = _flex_mods(mod, sq, sk, h, b, ctx.device)
    block = None if mask is None else create_block_mask(mask, b, None, sq, sk, ctx.device, 128)
    q = ctx.randn(b, h, sq, d, dtype=dtype).requires_grad_()
    k = ctx.randn(b, hkv, sk, d, dtype=dtype).requires_grad_()
    v = ctx.randn(b, hkv, sk, d, dtype=dtype).requires_grad_()
    dout = ctx.randn(b, h, sq, d, dtype=FP32)

    def run(backend: str) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        out, lse = flex_attention(q, k, v, score, block, enable_gqa=True, return_lse=True,
                                  backend=backend)
        grads = torch.autograd.grad((out.float() * dout).sum(), (q, k, v))
        return out.detach(), lse.detach(), grads

    got, want = run(ctx.backend), run("reference")
    ctx.close("out", got[0], want[0], ATTN_TOL[dtype])
    ctx.lse("lse", got[1], want[1])
    for name, g, w, other in zip(("dq", "dk", "dv"), got[2], want[2], (k, q, q)):
        noise = _zero_grad_noise(dtype, d**-0.5, dout, v, other)
        ctx.grad(name, g, w, ATTN_BWD_TOL[dtype], noise)


FLEX = {  # name: (mods, sq, sk, h, hkv, d)
    "causal-77": ("causal", 77, 77, 4, 2, 64),
    "causal-block-mask-300": ("causal", 300, 300, 2, 1, 64),
    "window-sq1-sk1": ("window", 1, 1, 2, 2, 64),
    "document-causal-150": ("document-causal", 150, 150, 4, 2, 64),
    "document-batched-sq130-sk200": ("document-batched", 130, 200, 2, 2, 128),
    "prefix-lm-130": ("prefix-lm", 130, 130, 4, 4, 64),
    "alibi-causal-sq33-sk90": ("alibi-causal", 33, 90, 4, 2, 64),
    "alibi-q1-k200": ("alibi", 1, 200, 4, 1, 64),
    "softcap-alibi-window-65": ("softcap-alibi-window", 65, 65, 2, 2, 128),
    "softcap-d256": ("softcap", 40, 70, 2, 1, 256),
    "plain-d80": ("plain", 50, 33, 2, 2, 80),
}
for _name, (_mod, _sq, _sk, _h, _hkv, _d) in FLEX.items():
    add("flex_attention", _name, flex_case, mod=_mod, sq=_sq, sk=_sk, h=_h, hkv=_hkv, d=_d)


# ---- rmsnorm_qkv_rope ------------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _activations(ctx: Ctx, lead: tuple[int, ...], hidden: int, dtype: torch.dtype,
                 layout: str) -> Tensor:
    """``dense``; ``strided`` (rows of a buffer 24 wider, NaN past each row); ``offset``
    (one element past a 16-byte boundary: the binding copies it)."""
    if layout == "strided":
        buf = torch.full((*lead, hidden + 24), float("nan"))
        buf[..., :hidden] = torch.randn(*lead, hidden, generator=ctx.gen)
        return buf.to(ctx.device, dtype)[..., :hidden]
    if layout == "offset":
        n = math.prod(lead) * hidden
        return ctx.randn(n + 1, dtype=dtype)[1:].view(*lead, hidden)
    return ctx.randn(*lead, hidden, dtype=dtype)


def rope_case(ctx: Ctx, *, lead: tuple[int, ...], hidden: int, nq: int, nkv: int, d: int,
              rotary: int | None = None, residual: bool = True, bias: bool = False,
              qk_norm: bool = False, style: str = "neox", scaling: dict | None = None,
              positions: str = "full", layout: str = "dense", grad: bool = False,
              dtype: torch.dtype = BF16) -> None:
    n_out = (nq + 2 * nkv) * d
    x = _activations(ctx, lead, hidden, dtype, layout)
    args: dict[str, Any] = dict(
        norm_weight=ctx.randn(hidden, dtype=dtype, scale=0.2, shift=1.0),
        qkv_weight=ctx.randn(n_out, hidden, dtype=dtype, scale=hidden**-0.5),
        qkv_bias=ctx.randn(n_out, dtype=dtype, scale=0.5) if bias else None,
        q_norm_weight=ctx.randn(d, dtype=dtype, scale=0.2, shift=1.0) if qk_norm else None,
        k_norm_weight=ctx.randn(d, dtype=dtype, scale=0.2, shift=1.0) if qk_norm else None,
        residual=_activations(ctx, lead, hidden, dtype, layout) if residual else None)
    pos_shape = {"full": lead, "broadcast": (1, *lead[1:]), "scalar": ()}[positions]
    pos = ctx.randint(0, 100_000, *pos_shape, dtype=torch.int64 if positions != "full"
                      else torch.int32)
    kw = dict(num_q_heads=nq, num_kv_heads=nkv, head_dim=d, rotary_dim=rotary,
              rope_style=style, rope_theta=10000.0 if scaling is None else 500000.0,
              rope_scaling=scaling)
    inputs = {"x": x, **{n: t for n, t in args.items() if t is not None}}
    if grad:
        inputs = {n: t.detach().requires_grad_() for n, t in inputs.items()}

    def run(backend: str) -> tuple[Tensor, ...]:
        call = dict(inputs)
        outs = rmsnorm_qkv_rope(call.pop("x"), call.pop("norm_weight"), call.pop("qkv_weight"),
                                pos, backend=backend, **call, **kw)
        return tuple(outs)

    got, want = run(ctx.backend), run("reference")
    for name, g, w in zip(("q", "k", "v", "residual"), got, want):
        ctx.close(name, g, w, ROPE_TOL[dtype])
    if grad:
        upstream = [ctx.randn(*t.shape, dtype=dtype) for t in want]
        leaves = list(inputs.values())
        got_g = torch.autograd.grad(got, leaves, upstream)
        want_g = torch.autograd.grad(want, leaves, upstream)
        for name, g, w in zip(inputs, got_g, want_g):
            ctx.close(f"d{name}", g, w, ROPE_BWD_TOL[dtype])


ROPE = "rmsnorm_qkv_rope"
ROPE_CASES = {  # name: (lead, hidden, nq, nkv, d, options); GEMV up to 16 tokens, GEMM above
    "T0": ((0,), 256, 4, 2, 64, {}),
    "T1": ((1,), 512, 8, 2, 64, {}),
    "T1-qknorm-bias-gptj-partial": ((1,), 256, 4, 1, 64, dict(qk_norm=True, bias=True,
                                                             style="gptj", rotary=32)),
    "T1-d256-fp16": ((1,), 512, 2, 1, 256, dict(dtype=FP16, residual=False)),
    "T3-hidden264-d24": ((3,), 264, 6, 2, 24, dict(rotary=16)),
    "T5-d8-no-residual": ((5,), 64, 4, 4, 8, dict(residual=False, bias=True)),
    "T16-llama3": ((16,), 512, 8, 2, 64, dict(scaling=LLAMA3)),
    "T17-qknorm-d128": ((17,), 512, 4, 2, 128, dict(qk_norm=True, scaling=LLAMA3)),
    "T33-d256-gptj": ((33,), 256, 2, 1, 256, dict(style="gptj", bias=True)),
    "T257-fp16": ((257,), 128, 2, 1, 32, dict(dtype=FP16, qk_norm=True)),
    "broadcast-positions-2x5": ((2, 5), 256, 4, 2, 64, dict(positions="broadcast")),
    "scalar-position-3x7": ((3, 7), 128, 2, 2, 32, dict(positions="scalar", bias=True)),
    "strided-x-T9": ((9,), 256, 4, 2, 64, dict(layout="strided", qk_norm=True)),
    "strided-x-T40": ((40,), 136, 2, 1, 40, dict(layout="strided")),
    "offset-x-T2": ((2,), 256, 4, 2, 64, dict(layout="offset")),
    "autograd-T7": ((7,), 128, 4, 2, 32, dict(grad=True, qk_norm=True, bias=True)),
    "autograd-T20-fp16": ((20,), 128, 2, 1, 64, dict(grad=True, dtype=FP16, rotary=48)),
}
for _name, (_lead, _hidden, _nq, _nkv, _d, _opts) in ROPE_CASES.items():
    add(ROPE, _name, rope_case, lead=_lead, hidden=_hidden, nq=_nq, nkv=_nkv, d=_d, **_opts)


# ---- paged_attention, cascade_attention, merge_attention_states ------------------------------


@dataclass
class PagedKV:
    """A paged KV cache and its tables (see :func:`_paged_kv`)."""

    k_cache: Tensor
    v_cache: Tensor
    block_table: Tensor
    seq_lens: Tensor
    k_scale: Tensor | float | None
    v_scale: Tensor | float | None


def _paged_kv(ctx: Ctx, lengths: list[int], page_size: int, hkv: int, d: int, layout: str,
              dtype: torch.dtype, kv_dtype: torch.dtype | None = None,
              per_head_scale: bool = False) -> PagedKV:
    """Caches whose pages are shuffled, with a spare table column and spare pages. Every slot
    no sequence owns holds NaN (16-bit caches; random values in fp8 ones) and unused table
    entries the invalid id -7. Each sequence's keys but its last one or two are written here,
    the rest by ``append_paged_kv`` (an fp8 cache stores ``k / k_scale``)."""
    fp8 = kv_dtype is not None
    per_seq = [-(-n // page_size) for n in lengths]
    pages = sum(per_seq) + 3
    shape = (pages, page_size, hkv, d) if layout == "NHD" else (pages, hkv, page_size, d)
    fill = (lambda: torch.randn(shape, generator=ctx.gen)) if fp8 else (  # noqa: E731
        lambda: torch.full(shape, float("nan")))
    caches = [fill(), fill()]
    table = torch.full((len(lengths), max(per_seq + [1]) + 1), -7, dtype=torch.int32)
    order = ctx.perm(pages)
    at = 0
    new = [min(n, 1 + b % 2) for b, n in enumerate(lengths)]
    rows_new = []
    scales: list[Tensor | float | None] = [None, None]
    if fp8:
        scales = ([torch.rand(hkv, generator=ctx.gen) + 0.25 for _ in range(2)]
                  if per_head_scale else [0.5, 1.5])
    for b, (n, p) in enumerate(zip(lengths, per_seq)):
        table[b, :p] = order[at:at + p].int()
        at += p
        j = torch.arange(n - new[b])
        page, slot = table[b, j // page_size].long(), j % page_size
        for cache in caches:
            rows = torch.randn(n - new[b], hkv, d, generator=ctx.gen)
            if layout == "NHD":
                cache[page, slot] = rows
            else:
                cache[page, :, slot] = rows
        rows_new.append([torch.randn(new[b], hkv, d, generator=ctx.gen) for _ in range(2)])
    if fp8:  # a per-head scale broadcasts over (Hkv, D) in NHD, (Hkv, slot, D) in HND
        for i, scale in enumerate(scales):
            mult = torch.as_tensor(scale).reshape(-1, *(1,) * (1 if layout == "NHD" else 2))
            caches[i] = (caches[i] / mult).to(kv_dtype)
    k_cache, v_cache = (c.to(ctx.device, kv_dtype or dtype) for c in caches)
    k_scale, v_scale = (s.to(ctx.device) if isinstance(s, Tensor) else s for s in scales)
    block_table = table.to(ctx.device)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=ctx.device)
    k_new, v_new = (torch.cat([r[i] for r in rows_new]).to(ctx.device, dtype) for i in range(2))
    append_paged_kv(k_new, v_new, k_cache, v_cache, block_table, seq_lens,
                    cu_seqlens=cu_seqlens(new, ctx.device), k_scale=k_scale, v_scale=v_scale,
                    kv_layout=layout)
    return PagedKV(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale)


def paged_case(ctx: Ctx, *, lengths: list[int], page_size: int, h: int, hkv: int, d: int,
               layout: str = "NHD", queries: list[int] | None = None, give_max: bool = False,
               dtype: torch.dtype = BF16, kv_dtype: torch.dtype | None = None,
               per_head_scale: bool = False, q_layout: str = "dense", **options: Any) -> None:
    kv = _paged_kv(ctx, lengths, page_size, hkv, d, layout, dtype, kv_dtype, per_head_scale)
    tokens = len(lengths) if queries is None else sum(queries)
    q = _activations(ctx, (tokens, h), d, dtype, q_layout)
    kw = dict(options, kv_layout=layout, k_scale=kv.k_scale, v_scale=kv.v_scale,
              return_lse=True)
    if queries is not None:
        kw["cu_seqlens_q"] = cu_seqlens(queries, ctx.device)
        if give_max:
            kw["max_seqlen_q"] = max(queries)

    def run(backend: str) -> tuple[Tensor, Tensor]:
        return paged_attention(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                               backend=backend, **kw)

    got, want = run(ctx.backend), run("reference")
    if abs(options.get("scale") or 0.0) > 1e30:  # overflow: +-inf logits, the rule of softmax.h
        for name, g, w in zip(("out", "lse"), got, want):
            ctx.specials(name, g, w, ATTN_TOL[dtype])
        return
    ctx.close("out", got[0], want[0], ATTN_TOL[dtype])
    ctx.lse("lse", got[1], want[1])
    if not got[0].isfinite().all():
        ctx.failures.append("out: not finite (a NaN page or slot was read)")


PAGED = "paged_attention"
PAGED_CASES = {  # name: (lengths, page_size, h, hkv, d, options)
    "decode-p16-lens0-53": ([0, 1, 15, 16, 17, 53], 16, 8, 2, 64, {}),
    "decode-p1-hnd": ([0, 1, 2, 7], 1, 4, 2, 128, dict(layout="HND")),
    "decode-p5-window-softcap": ([0, 4, 5, 6, 23], 5, 4, 4, 64, dict(window=(7, 0),
                                                                     softcap=3.0)),
    "decode-split-kv-300": ([0, 1, 300], 16, 8, 1, 128, {}),
    "decode-gqa3-d80": ([9, 40], 16, 6, 2, 80, {}),
    "decode-p256-d256": ([1, 255, 257], 256, 4, 2, 256, dict(dtype=FP16)),
    "decode-q-offset": ([3, 33], 16, 4, 2, 64, dict(q_layout="offset")),
    "decode-q-strided-hnd": ([3, 33], 8, 4, 2, 64, dict(q_layout="strided", layout="HND")),
    "chunked-p16-empty-seq-queries": ([0, 5, 17, 40], 16, 6, 3, 64,
                                      dict(queries=[2, 0, 17, 5])),
    "chunked-p3-hnd-not-causal": ([4, 9, 30], 3, 4, 2, 64,
                                  dict(queries=[4, 1, 6], layout="HND", causal=False,
                                       window=(6, 2), softcap=2.0, give_max=True)),
    "chunked-p1-q-longer-than-keys": ([2, 1], 1, 2, 1, 64, dict(queries=[5, 1])),
    "chunked-p16-long-fp16": ([250, 7], 16, 8, 2, 128, dict(queries=[33, 7], dtype=FP16)),
    "fp8-e4m3-per-head-decode": ([0, 1, 17, 100], 16, 8, 2, 128,
                                 dict(kv_dtype=E4M3, per_head_scale=True, softcap=5.0)),
    "fp8-e5m2-chunked-hnd": ([5, 60], 16, 4, 2, 64,
                             dict(kv_dtype=E5M2, queries=[3, 9], layout="HND")),
    "fp8-e4m3-p7-chunked": ([13, 1, 0], 7, 4, 1, 64,
                            dict(kv_dtype=E4M3, queries=[4, 1, 0], window=(5, 0))),
    # Logits past float32's range (rows at lse +inf with out NaN, others at -inf with out 0),
    # unsplit and split-KV (the combine's merge follows the same rule).
    "overflow-decode-split": ([0, 3, 40, 700], 16, 8, 2, 128, dict(scale=1e38)),
    "overflow-chunked": ([5, 60], 16, 4, 2, 64, dict(queries=[3, 9], scale=-1e38)),
}
for _name, (_lens, _ps, _h, _hkv, _d, _opts) in PAGED_CASES.items():
    add(PAGED, _name, paged_case, lengths=_lens, page_size=_ps, h=_h, hkv=_hkv, d=_d, **_opts)


def cascade_case(ctx: Ctx, *, page_size: int, queries: list[int] | None, softcap: float = 0.0,
                 dtype: torch.dtype = BF16) -> None:
    """Five requests: a shared prefix (one group), a second level of two groups, then each
    request's own tokens, one of them empty (tests/ops/test_cascade_attention.py's layout)."""
    heads, heads_kv, d, pages = 6, 2, 64, 64
    own = [3, 7, 0, 5, 4] if queries is None else [max(n, q) for n, q in zip([3, 7, 0, 5, 4],
                                                                            queries)]
    level_groups = [([0, 5], [3 * page_size]), ([0, 3, 5], [2 * page_size, page_size]),
                    (list(range(6)), own)]
    k_cache = ctx.randn(pages, page_size, heads_kv, d, dtype=dtype)
    v_cache = ctx.randn(pages, page_size, heads_kv, d, dtype=dtype)
    free = ctx.perm(pages).tolist()
    levels = []
    for indptr, lengths in level_groups:
        rows = [[free.pop() for _ in range(-(-n // page_size))] for n in lengths]
        width = max(len(r) for r in rows) + 1
        table = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
        levels.append((table.to(ctx.device),
                       torch.tensor(lengths, dtype=torch.int32, device=ctx.device),
                       torch.tensor(indptr, dtype=torch.int32, device=ctx.device)))
    tokens = queries or [1] * 5
    q = ctx.randn(sum(tokens), heads, d, dtype=dtype)
    cu = cu_seqlens(queries, ctx.device) if queries else None
    kw = dict(cu_seqlens_q=cu, softcap=softcap, return_lse=True)
    # "reference" is cascade's gather-everything specification; the smoke test on the CPU runs
    # the levels-and-merge path instead (backend None: paged_attention's reference there).
    levels_backend = None if ctx.backend == "reference" and ctx.device.type == "cpu" \
        else ctx.backend
    got = cascade_attention(q, k_cache, v_cache, levels, backend=levels_backend, **kw)
    want = cascade_attention(q, k_cache, v_cache, levels, backend="reference", **kw)
    ctx.close("out", got[0], want[0], ATTN_TOL[dtype])
    ctx.lse("lse", got[1], want[1])


add("cascade_attention", "decode-p4", cascade_case, page_size=4, queries=None)
add("cascade_attention", "decode-p16-softcap", cascade_case, page_size=16, queries=None,
    softcap=2.5)
add("cascade_attention", "chunked-p4", cascade_case, page_size=4, queries=[2, 3, 1, 1, 4])
add("cascade_attention", "chunked-p16-fp16", cascade_case, page_size=16,
    queries=[1, 6, 2, 1, 3], dtype=FP16)


def merge_case(ctx: Ctx, *, sq: int, sk: int, split: int, h: int, hkv: int, d: int,
               empty_b: bool = False, dtype: torch.dtype = BF16) -> None:
    """Attention over keys [0, split) and [split, Sk) on the backend, merged through their lse,
    against the reference over all keys; ``empty_b``: part b's lse is -inf (no keys), so the
    merge gives part a alone."""
    q = ctx.randn(2, sq, h, d, dtype=dtype)
    k = ctx.randn(2, sk, hkv, d, dtype=dtype)
    v = ctx.randn(2, sk, hkv, d, dtype=dtype)

    def state(backend: str, keys: slice) -> tuple[Tensor, Tensor]:
        o, lse = flash_attention(q, k[:, keys], v[:, keys], return_lse=True, backend=backend)
        return o, lse.transpose(1, 2).contiguous()  # (B, H, Sq) -> (B, Sq, H)

    o_a, lse_a = state(ctx.backend, slice(0, split))
    o_b, lse_b = state(ctx.backend, slice(split, sk))
    if empty_b:
        lse_b = torch.full_like(lse_b, NEG_INF)
        want, want_lse = state("reference", slice(0, split))
    else:
        want, want_lse = state("reference", slice(0, sk))
    got, got_lse = merge_attention_states(o_a, lse_a, o_b, lse_b)
    ctx.close("out", got, want, MERGE_TOL[dtype])
    ctx.lse("lse", got_lse, want_lse)
    merge_attention_states_(o_a, lse_a, o_b, lse_b)
    ctx.close("in-place out", o_a, want, MERGE_TOL[dtype])


add("merge_attention_states", "split-7-of-40", merge_case, sq=17, sk=40, split=7, h=4, hkv=2,
    d=64)
add("merge_attention_states", "split-1-of-130-d128", merge_case, sq=3, sk=130, split=1, h=2,
    hkv=1, d=128)
add("merge_attention_states", "empty-part-fp16", merge_case, sq=9, sk=33, split=20, h=2,
    hkv=2, d=64, empty_b=True, dtype=FP16)


# ---- fp8_gemm --------------------------------------------------------------------------------


def _sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def fp8_case(ctx: Ctx, *, m: int, n: int, k: int, a_gran: str, w_gran: str,
             fp8: torch.dtype = E4M3, out_dtype: torch.dtype = BF16,
             bias: torch.dtype | None = None, a_layout: str = "dense",
             w_layout: str = "dense") -> None:
    """``a_layout="transposed"``: a8 is the transpose of a (K, M) tensor (copied by the
    kernels' launcher); ``w_layout="padded"``: w8 rows of a buffer 32 wider (read in place)."""
    a = ctx.randn(m, k, dtype=FP32)
    w = ctx.randn(n, k, dtype=FP32, scale=k**-0.5)
    a8, a_scale = quantize_fp8(a, a_gran, fp8)
    w8, w_scale = quantize_fp8(w, w_gran, fp8, **({"block": (128, 128)} if w_gran == "block"
                                                  else {}))
    if a_layout == "transposed":
        a8 = a8.t().contiguous().t()
    if w_layout == "padded":
        wide = torch.zeros(n, k + 32, dtype=torch.uint8, device=ctx.device).view(fp8)
        wide[:, :k] = w8
        w8 = wide[:, :k]
    b = ctx.randn(n, dtype=bias, scale=0.5) if bias is not None else None
    got = fp8_gemm(a8, w8, a_scale, w_scale, out_dtype=out_dtype, bias=b, backend=ctx.backend)
    want = fp8_gemm(a8, w8, a_scale, w_scale, out_dtype=out_dtype, bias=b, backend="reference")
    # The wgmma kernel may run where the config or the default (above 64 rows) says; its
    # tolerance is the looser one, and covers every kernel on that device.
    tol = (FP8_GEMM_SM90_TOL if _sm90(ctx.device) and ctx.backend == "cuda"
           else FP8_GEMM_TOL)[out_dtype]
    ctx.close("out", got, want, tol)


FP8_CASES = {  # name: (m, n, k, a_gran, w_gran, options)
    "m0": (0, 64, 128, "row", "tensor", {}),
    "m1-tensor-16x16": (1, 16, 16, "tensor", "tensor", {}),
    "m1-row-k1024-split-k": (1, 64, 1024, "row", "row", {}),
    "m1-block-fp32": (1, 32, 272, "block", "block", dict(out_dtype=FP32)),
    "m3-tensor-block-e5m2-fp16": (3, 48, 256, "tensor", "block", dict(fp8=E5M2,
                                                                      out_dtype=FP16)),
    "m17-row-row-bias-fp32": (17, 48, 272, "row", "row", dict(bias=FP32, out_dtype=FP32)),
    "m17-block-block-bias-bf16": (17, 144, 272, "block", "block", dict(bias=BF16)),
    "m17-block-tensor-e5m2": (17, 80, 400, "block", "tensor", dict(fp8=E5M2)),
    "m3-block-row-bias-fp16": (3, 32, 144, "block", "row", dict(out_dtype=FP16, bias=FP16)),
    "m65-row-block-fp32": (65, 128, 384, "row", "block", dict(out_dtype=FP32, bias=FP16)),
    "m129-block-block": (129, 256, 384, "block", "block", {}),
    "m129-tensor-row-fp16": (129, 96, 160, "tensor", "row", dict(out_dtype=FP16)),
    "m33-transposed-a-padded-w": (33, 64, 512, "row", "row", dict(a_layout="transposed",
                                                                  w_layout="padded")),
}
for _name, (_m, _n, _k, _ag, _wg, _opts) in FP8_CASES.items():
    add("fp8_gemm", _name, fp8_case, m=_m, n=_n, k=_k, a_gran=_ag, w_gran=_wg, **_opts)


# ---- int4_gemm -------------------------------------------------------------------------------


def int4_case(ctx: Ctx, *, lead: tuple[int, ...], n: int, k: int, group: int,
              symmetric: bool = False, act_order: bool = False,
              scale_dtype: torch.dtype = FP32, bias: torch.dtype | None = None,
              dtype: torch.dtype = BF16, layout: str = "dense") -> None:
    w = ctx.randn(n, k, dtype=FP32)
    g_idx = None
    if act_order:  # a shuffled group per input channel, as GPTQ's desc_act makes
        g_idx = (ctx.perm(k) % (k // group)).to(ctx.device, torch.int32)
    packed, scales, zeros = pack_int4(w, group, symmetric, g_idx=g_idx)
    scales = scales.to(scale_dtype)
    x = _activations(ctx, lead, k, dtype, layout)
    b = ctx.randn(n, dtype=bias, scale=0.5) if bias is not None else None
    kw = dict(group_size=group, g_idx=g_idx, bias=b)
    got = int4_gemm(x, packed, scales, zeros, backend=ctx.backend, **kw)
    want = int4_gemm(x, packed, scales, zeros, backend="reference", **kw)
    ctx.close("out", got, want, INT4_TOL[dtype])


INT4_CASES = {  # name: (lead, n, k, group, options)
    "m0": ((0,), 64, 128, 128, {}),
    "m1-g32-zp": ((1,), 64, 128, 32, {}),
    "m1-g32-act-order-bf16-scales": ((1,), 64, 256, 32, dict(act_order=True,
                                                              scale_dtype=BF16)),
    "m1-k1024-split-k": ((1,), 64, 1024, 128, {}),
    "m3-n72-g128-sym-fp16": ((3,), 72, 256, 128, dict(symmetric=True, dtype=FP16)),
    "m17-per-channel-bias-fp32": ((17,), 128, 512, -1, dict(bias=FP32)),
    "m17-g64-fp16-scales": ((17,), 40, 192, 64, dict(scale_dtype=FP16, dtype=FP16)),
    "m65-n136-act-order-sym-bias": ((65,), 136, 384, 128, dict(act_order=True, symmetric=True,
                                                               bias=BF16)),
    "m65-g32-zp": ((65,), 256, 512, 32, {}),
    "3d-2x5-strided": ((2, 5), 64, 256, 128, dict(layout="strided")),
    "m3-offset-x": ((3,), 64, 128, 32, dict(layout="offset", symmetric=True)),
}
for _name, (_lead, _n, _k, _g, _opts) in INT4_CASES.items():
    add("int4_gemm", _name, int4_case, lead=_lead, n=_n, k=_k, group=_g, **_opts)


# ---- moe_route and fused_moe -----------------------------------------------------------------


def route_case(ctx: Ctx, *, t: int, e: int, k: int, dtype: torch.dtype = FP32,
               bias: bool = False, **options: Any) -> None:
    logits = ctx.randn(t, e, dtype=dtype, scale=2.0)
    if bias:
        options["correction_bias"] = ctx.randn(e, dtype=FP32, scale=0.1)
    got_w, got_ids = moe_route(logits, k, backend=ctx.backend, **options)
    want_w, want_ids = moe_route(logits, k, backend="reference", **options)
    # Ids must be the reference's, except between two selection scores within float32
    # rounding of each other (softmax summed in another order): there the scores must agree.
    same = (got_ids == want_ids).all(dim=1)
    if not bool(((got_ids >= 0) & (got_ids < e)).all()):
        ctx.failures.append("ids: outside 0..E-1")
    elif not bool(same.all()):
        s = moe_reference.scores(logits, options.get("scoring", "softmax"))
        sel = s + options["correction_bias"] if bias else s
        a = sel[~same].gather(1, got_ids[~same].long())
        b = sel[~same].gather(1, want_ids[~same].long())
        if not torch.allclose(a, b, rtol=1e-6, atol=1e-7):
            ctx.failures.append(f"ids: {int((~same).sum())} tokens chose other experts")
    ctx.record(got_w[same], want_w[same])
    if not torch.allclose(got_w[same], want_w[same], rtol=ROUTE_RTOL, atol=ROUTE_ATOL):
        ctx.failures.append("weights: beyond rtol 1e-5, atol 1e-7 of the reference")


ROUTE_CASES = {  # name: (t, e, k, options)
    "t0": (0, 8, 2, {}),
    "t1-e8-k1": (1, 8, 1, {}),
    "t3-e64-deepseek-bf16": (3, 64, 8, dict(dtype=BF16, scoring="sigmoid", bias=True,
                                            num_expert_groups=8, topk_groups=4,
                                            routed_scaling_factor=2.5)),
    "t257-e128-raw-fp16": (257, 128, 8, dict(dtype=FP16, renormalize=False)),
    "t5-e512-grouped-bias": (5, 512, 8, dict(bias=True, num_expert_groups=8, topk_groups=3)),
    "t6-e40-k3-sigmoid": (6, 40, 3, dict(scoring="sigmoid")),
    "t33-e256-k1": (33, 256, 1, dict(routed_scaling_factor=0.5)),
}
for _name, (_t, _e, _k, _opts) in ROUTE_CASES.items():
    add("moe_route", _name, route_case, t=_t, e=_e, k=_k, **_opts)


def _expert_ids(ctx: Ctx, t: int, e: int, k: int, mode: str) -> Tensor:
    """``random`` (k distinct experts per token), ``few`` (only experts 0..2: the rest get no
    token), ``one`` (every pair to the last expert)."""
    if mode == "one":
        return torch.full((t, k), e - 1, dtype=torch.int32, device=ctx.device)
    if mode == "few":
        return ctx.randint(0, min(e, 3), t, k)
    return torch.rand(t, e, generator=ctx.gen).argsort(-1)[:, :k].int().to(ctx.device)


def moe_case(ctx: Ctx, *, t: int, h: int, i: int, e: int, k: int, mode: str = "random",
             quant: str = "none", local: int | None = None, activation: str = "silu",
             group13: int = 32, group2: int = -1, symmetric: bool = False,
             scale_dtype: torch.dtype = FP32, int64_ids: bool = False,
             dtype: torch.dtype = BF16) -> None:
    """``local``: expert parallelism with that many of the ``e`` global experts on this rank
    (an expert map holding -1 for the rest, in shuffled order). int4 experts: ``group13`` over
    H and ``group2`` over I (-1: one group), scales of ``scale_dtype``."""
    ids = _expert_ids(ctx, t, e, k, mode)
    weights = ctx.randn(t, k, dtype=FP32).abs() + 0.1
    expert_map, rows = None, e
    if local is not None:
        chosen = ctx.perm(e)[:local]
        expert_map = torch.full((e,), -1, dtype=torch.int32)
        expert_map[chosen] = torch.arange(local, dtype=torch.int32)
        expert_map, rows = expert_map.to(ctx.device), local
    x = ctx.randn(t, h, dtype=dtype)
    w13 = ctx.randn(rows, 2 * i, h, dtype=FP32, scale=h**-0.5)
    w2 = ctx.randn(rows, h, i, dtype=FP32, scale=i**-0.5)
    kw: dict[str, Any] = dict(activation=activation, expert_map=expert_map)
    if quant == "fp8":
        parts = [[quantize_fp8(we, "block", block=(128, 128)) for we in w] for w in (w13, w2)]
        w13, w2 = (torch.stack([p[0] for p in ps]) for ps in parts)
        kw.update(w13_scale=torch.stack([p[1] for p in parts[0]]),
                  w2_scale=torch.stack([p[1] for p in parts[1]]))
    elif quant == "int4":
        packed = []
        for w, group in ((w13, group13), (w2, group2)):
            per = [pack_int4(we, group, symmetric) for we in w]
            packed.append((torch.stack([p[0] for p in per]),
                           torch.stack([p[1] for p in per]).to(scale_dtype),
                           None if symmetric else torch.stack([p[2] for p in per])))
        (w13, s13, z13), (w2, s2, z2) = packed
        kw.update(w13_scale=s13, w2_scale=s2, w13_zeros=z13, w2_zeros=z2)
    else:
        w13, w2 = w13.to(dtype), w2.to(dtype)
    if int64_ids:
        ids = ids.long()
    got = fused_moe(x, w13, w2, weights, ids, backend=ctx.backend, **kw)
    want = fused_moe(x, w13, w2, weights, ids, backend="reference", **kw)
    ctx.close("out", got, want, MOE_FP8_TOL if quant == "fp8" else MOE_TOL[dtype])


MOE_CASES = {  # name: (t, h, i, e, k, options)
    "t0": (0, 64, 32, 8, 2, {}),
    "t1-e8-k1": (1, 64, 32, 8, 1, {}),
    "t3-e8-k2-odd-dims-fp16": (3, 48, 40, 8, 2, dict(dtype=FP16)),
    "t257-e8-k2": (257, 128, 64, 8, 2, {}),
    "t5-e64-k8-gelu": (5, 32, 16, 64, 8, dict(activation="gelu")),
    "t37-few-experts-used": (37, 64, 32, 8, 2, dict(mode="few", activation="gelu_tanh")),
    "t33-one-expert-k1": (33, 32, 16, 8, 1, dict(mode="one")),
    "t45-expert-map-quarter-local": (45, 64, 32, 16, 2, dict(local=4)),
    "t70-expert-map-k1-int64-ids": (70, 64, 32, 32, 1, dict(local=8, int64_ids=True)),
    "fp8-t3-h144-k2": (3, 144, 128, 8, 2, dict(quant="fp8")),
    "fp8-t19-h272-map-fp16": (19, 272, 128, 8, 2, dict(quant="fp8", local=6, dtype=FP16)),
    "int4-t17-zp-g32-per-channel": (17, 64, 40, 8, 2, dict(quant="int4")),
    "int4-t1-sym-g64-bf16-scales": (1, 128, 64, 8, 1, dict(quant="int4", group13=64,
                                                           group2=64, symmetric=True,
                                                           scale_dtype=BF16)),
    "int4-t257-g128-g64-fp16": (257, 256, 128, 8, 2, dict(quant="int4", group13=128,
                                                          group2=64, dtype=FP16,
                                                          scale_dtype=FP16)),
    "int4-t3-g256-map": (3, 256, 256, 16, 2, dict(quant="int4", group13=256, group2=32,
                                                  local=4)),
}
for _name, (_t, _h, _i, _e, _k, _opts) in MOE_CASES.items():
    add("fused_moe", _name, moe_case, t=_t, h=_h, i=_i, e=_e, k=_k, **_opts)

OPS = tuple(dict.fromkeys(c.op for c in CASES))


# ---- dispatch: recording (and pinning) the config of every launch ---------------------------


@dataclass
class Launches:
    """Every dispatch decision of one case: (op, backend, config), the most configs one of its
    backends offered, and the problems the cuda backend would reject (``support_check``)."""

    support_check: bool
    chosen: list[tuple[str, str, Config]] = field(default_factory=list)
    most_configs: int = 1
    rejected: list[str] = field(default_factory=list)

    def describe(self) -> str:
        seen = []
        for op, backend, config in self.chosen:
            if backend == "reference":
                continue
            text = ",".join(f"{k}={v}" for k, v in config.items()) or "default"
            item = f"{op}:{backend}[{text}]"
            if item not in seen:
                seen.append(item)
        return " ".join(seen)


def _cuda_reasons(op: Op, problem: Problem) -> list[str]:
    """What the op's cuda backend would say of ``problem`` (its dtypes and ``supports()``;
    the device and build are not asked): the cases must only make problems it serves."""
    try:
        backend = op.backend("cuda")
    except ValueError:  # an op without a cuda backend (append_paged_kv)
        return []
    if problem.dtype not in backend.dtypes:
        return [f"dtype {problem.dtype}"]
    return backend.supports(problem)


@contextlib.contextmanager
def dispatch(launches: Launches, index: int | None) -> Iterator[None]:
    """``Op.choose`` wrapped for one case: each decision is recorded in ``launches``; with
    ``index`` set, the chosen backend runs its ``configs(problem)[index]`` (the last one where
    it offers fewer). Dispatch caches are cleared on entry and exit so that every launch of the
    case goes through the wrapper."""
    original = Op.choose

    def choose(self: Op, problem: Problem, backend: str | None = None) -> tuple[Any, Config]:
        picked, config = original(self, problem, backend)
        if picked.name != "reference":
            options = picked.configs(problem)
            launches.most_configs = max(launches.most_configs, len(options))
            if index is not None:
                config = options[min(index, len(options) - 1)]
        elif launches.support_check:
            reasons = _cuda_reasons(self, problem)
            if reasons:
                launches.rejected.append(f"{self.name}: the cuda backend would reject this "
                                         f"problem: {'; '.join(reasons)}")
        launches.chosen.append((self.name, picked.name, config))
        return picked, config

    ops = all_ops().values()
    for op in ops:
        op.clear_cache()
    Op.choose = choose
    try:
        yield
    finally:
        Op.choose = original
        for op in ops:
            op.clear_cache()


# ---- running ---------------------------------------------------------------------------------


@dataclass
class Result:
    """One run of a case: pass or fail, the largest difference from the reference, why it
    failed, the configs that ran, how many configs its backends offered, and whether the
    device is lost (a CUDA error poisons the context: later cases could not run)."""

    ok: bool
    max_abs: float
    detail: str
    configs: str
    most_configs: int
    device_lost: bool = False


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, backend: str, device: torch.device, index: int | None) -> Result:
    """Run one case (with config ``index`` of every kernel backend, when given); the device is
    synchronised before the result counts, so an asynchronous fault is this case's."""
    ctx = Ctx(backend, device, torch.Generator().manual_seed(zlib.crc32(case.key.encode())))
    launches = Launches(support_check=backend == "reference")
    lost = False
    try:
        with dispatch(launches, index):
            case.run(ctx)
        _synchronize(device)
        failures = launches.rejected + ctx.failures
    except Exception as err:  # noqa: BLE001 - reported as this case's failure
        text = "".join(traceback.format_exception_only(type(err), err)).strip()
        failures = ["raised " + text.replace("\n", " | ")]
        lost = isinstance(err, getattr(torch, "AcceleratorError", ())) or "CUDA error" in text
    return Result(not failures, ctx.max_abs, "; ".join(failures), launches.describe(),
                  launches.most_configs, lost)


def select(ops: Sequence[str] | None, only: str | None) -> list[Case]:
    return [c for c in CASES if (not ops or c.op in ops) and (not only or only in c.key)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Edge cases of kpt's CUDA kernels against the reference (for "
                    "compute-sanitizer); see the module docstring.")
    parser.add_argument("--ops", help=f"comma-separated ops to run (default: all of "
                                      f"{', '.join(OPS)})")
    parser.add_argument("--only", help="run the cases whose op/name contains this text")
    parser.add_argument("--backend", default="cuda",
                        help="backend under test (default cuda; reference for a smoke test)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--all-configs", action="store_true",
                        help="run every case with each config the backend offers")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    unknown = sorted(set(ops or ()) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; known: {', '.join(OPS)}")
    cases = select(ops, args.only)
    if args.list:
        for c in cases:
            print(c.key)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize: no CUDA device (pass --device cpu --backend reference for a smoke "
              "test)", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    width = max((len(c.name) for c in cases), default=0) + 3
    failed, runs, start, lost = [], 0, time.perf_counter(), 0
    for done, case in enumerate(cases):
        index = 0 if args.all_configs else None
        while True:
            began = time.perf_counter()
            res = run_case(case, args.backend, device, index)
            runs += 1
            name = case.name if index is None else f"{case.name}#{index}"
            print(f"{case.op:<23} {name:<{width}} {'PASS' if res.ok else 'FAIL'}  "
                  f"max_abs_err={res.max_abs:.2e}  {time.perf_counter() - began:5.2f}s  "
                  f"{res.configs}", flush=True)
            if not res.ok:
                print(f"    {res.detail}", flush=True)
                failed.append(f"{case.op}/{name}")
            if res.device_lost or index is None or index + 1 >= res.most_configs:
                break
            index += 1
        if res.device_lost:
            lost = len(cases) - done - 1
            break
    seconds = time.perf_counter() - start
    print(f"\n{runs} runs of {len(cases)} cases on {args.backend} ({device}) in {seconds:.1f} s: "
          f"{runs - len(failed)} passed, {len(failed)} failed")
    if lost:
        print(f"  stopped after a CUDA error, which leaves the context unusable: {lost} cases "
              f"not run (--only / --ops run them in a fresh process)")
    for key in failed:
        print(f"  FAIL {key}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
