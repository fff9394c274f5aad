"""flash_attention: reference vs float64 math, every backend vs the reference (forward, lse and
gradients), varlen with NaN-poisoned padding, strided inputs, determinism, torch.compile, API.

Backends come from the op's declarations: a backend that cannot run a case is skipped with the
reasons it declares (``SPEC.reasons``), never by name.
"""

from __future__ import annotations

import importlib
import math
import zlib

import pytest
import torch

from kpt import autotune
from kpt.ops._common import compare
from kpt.ops._registry import Problem
from kpt.ops.flash_attention import (
    BACKENDS,
    BACKWARD_TOLERANCE,
    SPEC,
    SPEC_BACKWARD,
    TOLERANCE,
    Call,
    check,
    clone_outputs,
    compare_lse,
    flash_attention,
    make_call,
    poison,
    problem_of,
    shapes_from_hf_config,
)
from kpt.ops.flash_attention import reference as ref
from tests.conftest import devices
from tests.ops.op_log import OpLog
from tests.ops.test_flash_attention_sm90 import on_cuda, simulate_hopper

fa_module = importlib.import_module("kpt.ops.flash_attention")

HALF = [torch.bfloat16, torch.float16]
KERNEL_BACKENDS = [b.name for b in BACKENDS if b.name != "reference"]

# Tiny odd cases (the Triton interpreter is slow); each feature alone, then combined.
# B batch, Sq/Sk lengths, H/Hkv heads, D head dim; the rest are flash_attention keywords.
CASES = {
    "plain": dict(B=2, Sq=17, Sk=17, H=2, Hkv=2, D=16),
    "len1": dict(B=1, Sq=1, Sk=1, H=2, Hkv=2, D=16),
    "len3_d24": dict(B=2, Sq=3, Sk=3, H=2, Hkv=2, D=24),
    "len33_d64": dict(B=1, Sq=33, Sk=33, H=1, Hkv=1, D=64),
    "q_shorter": dict(B=1, Sq=3, Sk=33, H=2, Hkv=2, D=16),
    "q_longer": dict(B=1, Sq=33, Sk=17, H=2, Hkv=2, D=16),
    "causal": dict(B=1, Sq=33, Sk=33, H=2, Hkv=2, D=16, causal=True),
    "causal_q_shorter": dict(B=1, Sq=17, Sk=40, H=2, Hkv=2, D=16, causal=True),
    # Sq > Sk: the first Sq - Sk queries see no key (out 0, lse -inf, zero gradients).
    "causal_q_longer": dict(B=1, Sq=33, Sk=17, H=2, Hkv=2, D=16, causal=True),
    "window": dict(B=1, Sq=40, Sk=40, H=2, Hkv=2, D=16, window=(7, 3)),
    "window_causal": dict(B=1, Sq=33, Sk=40, H=2, Hkv=2, D=16, causal=True, window=(5, 0)),
    "softcap": dict(B=1, Sq=17, Sk=17, H=2, Hkv=2, D=16, softcap=2.0),
    "gqa": dict(B=1, Sq=17, Sk=17, H=4, Hkv=2, D=16),
    "mqa": dict(B=1, Sq=17, Sk=17, H=3, Hkv=1, D=16),
    "scale": dict(B=1, Sq=17, Sk=17, H=2, Hkv=2, D=16, scale=0.6),
    "combined": dict(B=2, Sq=17, Sk=33, H=4, Hkv=2, D=24, causal=True, window=(9, 0),
                     softcap=3.0, scale=0.3),
    "combined_mqa": dict(B=1, Sq=33, Sk=17, H=2, Hkv=1, D=64, window=(3, 5), softcap=1.5),
}
# Sizes where blocks are full-size and loops long, on a GPU only.
GPU_CASES = {
    "s1024_d128": dict(B=2, Sq=1024, Sk=1024, H=8, Hkv=2, D=128),
    "s1031_d64_causal": dict(B=2, Sq=1031, Sk=1031, H=4, Hkv=4, D=64, causal=True),
    "s2048_d256_causal": dict(B=1, Sq=2048, Sk=2048, H=4, Hkv=1, D=256, causal=True),
    "s1500_d96_window": dict(B=1, Sq=1500, Sk=1700, H=4, Hkv=2, D=96, window=(256, 0),
                             causal=True),
    "s1024_d192_softcap": dict(B=1, Sq=1024, Sk=1024, H=2, Hkv=1, D=192, softcap=30.0),
    "s1000_d80_window": dict(B=1, Sq=1000, Sk=1000, H=2, Hkv=2, D=80, window=(100, 100)),
}
OPTIONS = ("causal", "window", "softcap", "scale")


def options(case: dict) -> dict:
    return {key: case[key] for key in OPTIONS if key in case}


def make_qkv(case: dict, dtype: torch.dtype, device: str, seed: int, *,
             transposed: bool = False) -> tuple[torch.Tensor, ...]:
    """Random q, k, v leaves (never zeros); ``transposed``: (B, S, H, D) views of (B, H, S, D)
    tensors, the layout HF passes."""
    g = torch.Generator().manual_seed(seed)

    def rand(s: int, h: int) -> torch.Tensor:
        if transposed:
            t = torch.randn(case["B"], h, s, case["D"], generator=g).transpose(1, 2)
        else:
            t = torch.randn(case["B"], s, h, case["D"], generator=g)
        return t.to(device=device, dtype=dtype)

    tensors = (rand(case["Sq"], case["H"]), rand(case["Sk"], case["Hkv"]),
               rand(case["Sk"], case["Hkv"]))
    return tuple(t.requires_grad_() for t in tensors)


def skip_unless_runs(backend: str, q, k, v, **kw) -> None:
    """Skip with the backend's own reasons when it cannot run this call (or its backward)."""
    varlen = kw.get("cu_seqlens_q") is not None
    cu = kw.get("cu_seqlens_q")
    call = Call(q, k, v, cu, kw.get("cu_seqlens_k"), q.shape[-3], k.shape[-3], 1.0, -1,
                0 if kw.get("causal") else -1, float(kw.get("softcap", 0.0)), q, q)
    if varlen:
        call.max_seqlen_q, call.max_seqlen_k = kw["max_seqlen_q"], kw["max_seqlen_k"]
    problem = problem_of(call)
    reasons = SPEC.reasons(backend, problem) + SPEC_BACKWARD.reasons(backend, problem)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


def run_with_grads(q, k, v, dout, dlse, **kw):
    """out, lse and the gradients of sum(out * dout) + sum(lse * dlse) w.r.t. q, k, v."""
    out, lse = flash_attention(q, k, v, return_lse=True, **kw)
    loss = (out.float() * dout).sum()
    if dlse is not None:
        loss = loss + (lse.masked_fill(lse == float("-inf"), 0.0) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), lse.detach(), grads


def float64_truth(q, k, v, dout, dlse, *, causal=False, window=(-1, -1), softcap=0.0,
                  scale=None):
    """Exact attention in float64 on (B, S, H, D) inputs, by materialising the scores, with
    gradients from autograd (same loss as ``run_with_grads``)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[1], k.shape[1]
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    left, right = window[0], 0 if causal else window[1]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if right >= 0:
        visible &= j <= i + (sk - sq) + right
    if left >= 0:
        visible &= j >= i + (sk - sq) - left
    # A huge finite fill (not -inf) keeps all-masked rows free of NaN in autograd.
    s = s.masked_fill(~visible, -1e300)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).masked_fill(~visible, 0.0)
    out = torch.einsum("bhij,bjhd->bihd", p, vv)
    lse = lse.masked_fill(~visible.any(-1), float("-inf"))
    loss = (out * dout.double()).sum()
    if dlse is not None:
        loss = loss + (lse.masked_fill(lse == float("-inf"), 0.0) * dlse.double()).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, (q, k, v))


def case_seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 1000


def grad_inputs(case: dict, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 7)
    dout = torch.randn(case["B"], case["Sq"], case["H"], case["D"], generator=g)
    dlse = torch.randn(case["B"], case["H"], case["Sq"], generator=g)
    return dout.to(device), dlse.to(device)


# ---- the reference is the specification: check it against exact math ----------------------

# fp32: float32 accumulation over <= 64 terms, ~1e-7 relative, bound 1e-5. fp16/bf16: the only
# roundings are the inputs (shared with the truth) and the final cast of out and the gradients,
# half a unit in the last place each; the bound is one unit (bf16 2^-8, fp16 2^-11).
REFERENCE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_float64(name, dtype):
    case = CASES[name]
    q, k, v = make_qkv(case, dtype, "cpu", case_seed(name))
    dout, dlse = grad_inputs(case, "cpu", case_seed(name))
    out, lse, grads = run_with_grads(q, k, v, dout, dlse, backend="reference", **options(case))
    t_out, t_lse, t_grads = float64_truth(q, k, v, dout, dlse, **options(case))
    tol = REFERENCE_TOLERANCE[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert lse.shape == (case["B"], case["H"], case["Sq"])
    for reason in (compare(f"{name}.out", out, t_out, tol),
                   compare_lse(f"{name}.lse", lse, t_lse, 1e-6),
                   *(compare(f"{name}.d{x}", gr, tr, tol)
                     for x, gr, tr in zip("qkv", grads, t_grads))):
        assert reason is None, reason


def test_reference_chunks_long_sequences(monkeypatch):
    """Chunking over queries must not change the result (forced tiny chunks here)."""
    case = CASES["combined"]
    q, k, v = make_qkv(case, torch.float32, "cpu", 3)
    dout, dlse = grad_inputs(case, "cpu", 3)
    whole = run_with_grads(q, k, v, dout, dlse, backend="reference", **options(case))
    monkeypatch.setattr(ref, "_MAX_CHUNK", 5)
    chunked = run_with_grads(q, k, v, dout, dlse, backend="reference", **options(case))
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(chunked[2], whole[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- every backend against the reference --------------------------------------------------


def check_backend(backend, case, dtype, device, seed, *, transposed=False, with_dlse=True):
    q, k, v = make_qkv(case, dtype, device, seed, transposed=transposed)
    skip_unless_runs(backend, q, k, v, **options(case))
    dout, dlse = grad_inputs(case, device, seed)
    dlse = dlse if with_dlse else None
    expected = run_with_grads(q, k, v, dout, dlse, backend="reference", **options(case))
    got = run_with_grads(q, k, v, dout, dlse, backend=backend, **options(case))
    assert got[0].shape == q.shape and got[0].dtype == dtype
    reasons = [compare(f"{backend}.out", got[0], expected[0], TOLERANCE[dtype]),
               compare_lse(f"{backend}.lse", got[1], expected[1])]
    for x, a, b in zip("qkv", got[2], expected[2]):
        if x in "qk" and case["Sk"] == 1:
            # One key: softmax is constant, exact dq = dk = 0. Kernels keep the rounding noise
            # of delta = rowsum(dO * rnd(O)): |ds| <= u |dO| |v|, times scale |k| for dq/dk.
            u = BACKWARD_TOLERANCE[dtype]
            bound = u * (dout.norm(dim=-1).max() * v.norm(dim=-1).max()
                         * (k if x == "q" else q).norm(dim=-1).max()).item()
            assert a.abs().max().item() <= bound, f"{backend}.d{x} with one key"
            continue
        reasons.append(compare(f"{backend}.d{x}", a, b, BACKWARD_TOLERANCE[dtype]))
    for reason in reasons:
        assert reason is None, reason


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_matches_reference(backend, name, dtype, device):
    check_backend(backend, CASES[name], dtype, device, case_seed(name),
                  with_dlse=name.startswith("c"))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", ["gqa", "combined"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_transposed_views(backend, name, device):
    check_backend(backend, CASES[name], torch.bfloat16, device, 11, transposed=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-sized cases need a CUDA device")
@pytest.mark.parametrize("name", list(GPU_CASES))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_gpu_sizes(backend, name):
    check_backend(backend, GPU_CASES[name], torch.bfloat16, "cuda", 5, with_dlse=False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_nan_query_gives_a_nan_row(backend, device):
    """A query with a NaN feature: its row of out and its lse are NaN on every backend (as in
    the reference), never the 0 / -inf of a row that sees no key; every other row is
    untouched. Head dim 64 in bf16, so that on Hopper the cuda backend runs its sm90 kernel."""
    case = dict(B=1, Sq=70, Sk=90, H=2, Hkv=1, D=64)
    q, k, v = (t.detach() for t in make_qkv(case, torch.bfloat16, device, 11))
    skip_unless_runs(backend, q, k, v)
    q[0, 5, 1, 3] = float("nan")
    out, lse = flash_attention(q, k, v, return_lse=True, backend=backend)
    assert bool(out[0, 5, 1].isnan().all()) and bool(lse[0, 1, 5].isnan())
    clean = torch.ones_like(lse, dtype=torch.bool)
    clean[0, 1, 5] = False
    assert bool(lse[clean].isfinite().all())
    want = flash_attention(q, k, v, backend="reference")
    keep = clean.transpose(1, 2)  # (B, Sq, H) like out's rows
    assert compare("out", out[keep], want[keep], TOLERANCE[torch.bfloat16]) is None


# ---- varlen: packed sequences, an empty one, NaN beyond every sequence ---------------------

VARLEN = {
    # lengths per sequence; the third is empty, the last has queries but no keys.
    "plain": dict(lq=[5, 17, 0, 33, 2], lk=[9, 17, 0, 20, 0], H=2, Hkv=1, D=24),
    "causal_window_softcap": dict(lq=[17, 0, 3, 40], lk=[9, 0, 33, 40], H=4, Hkv=2, D=16,
                                  causal=True, window=(6, 0), softcap=4.0),
}
PAD_TOKENS, PAD_COLS = 5, 8


def packed(lengths, heads, d, dtype, device, g):
    """(T + PAD_TOKENS, heads, d) view into a NaN-filled buffer with PAD_COLS extra columns:
    only the real tokens' first d features hold numbers. Returns (view, leaf buffer)."""
    total = sum(lengths)
    buf = torch.full((total + PAD_TOKENS, heads, d + PAD_COLS), float("nan"))
    buf[:total, :, :d] = torch.randn(total, heads, d, generator=g)
    buf = buf.to(device=device, dtype=dtype).requires_grad_()
    return buf[:, :, :d], buf


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", list(VARLEN))
@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_varlen_nan_poisoned_padding(backend, name, device):
    case = VARLEN[name]
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(case_seed(name))
    lq, lk = case["lq"], case["lk"]
    q, q_buf = packed(lq, case["H"], case["D"], dtype, device, g)
    k, k_buf = packed(lk, case["Hkv"], case["D"], dtype, device, g)
    v, v_buf = packed(lk, case["Hkv"], case["D"], dtype, device, g)

    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                            device=device)

    kw = dict(cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), max_seqlen_q=max(lq),
              max_seqlen_k=max(lk), **options(case))
    skip_unless_runs(backend, q, k, v, **kw)
    tq = sum(lq)
    dout = torch.full(q.shape, float("nan"))
    dout[:tq] = torch.randn(tq, case["H"], case["D"], generator=g)
    dout = dout.to(device)
    out, lse = flash_attention(q, k, v, return_lse=True, backend=backend, **kw)
    assert out.shape == q.shape and lse.shape == (case["H"], q.shape[0])
    (out.float() * dout).nan_to_num().sum().backward()

    # Ground truth: each sequence alone through the batched float64 math.
    starts_q, starts_k = cu(lq).tolist(), cu(lk).tolist()
    for b in range(len(lq)):
        sq, sk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        if lq[b] == 0:
            continue
        one = [t[None, s].detach() for t, s in ((q, sq), (k, sk), (v, sk))]
        t_out, t_lse, (t_dq, t_dk, t_dv) = float64_truth(*one, dout[None, sq], None,
                                                          **options(case))
        tol, btol = 2 * TOLERANCE[dtype], 2 * BACKWARD_TOLERANCE[dtype]  # truth is float64
        for reason in (
            compare(f"seq{b}.out", out[sq], t_out[0], tol),
            compare_lse(f"seq{b}.lse", lse[:, sq], t_lse[0], 1e-5),
            compare(f"seq{b}.dq", q_buf.grad[sq, :, : case["D"]], t_dq[0], btol),
            compare(f"seq{b}.dk", k_buf.grad[sk, :, : case["D"]], t_dk[0], btol),
            compare(f"seq{b}.dv", v_buf.grad[sk, :, : case["D"]], t_dv[0], btol),
        ):
            assert reason is None, reason
    # Tokens past the last sequence: out 0, lse -inf, zero gradients, nothing read.
    assert torch.equal(out[tq:], torch.zeros_like(out[tq:]))
    assert bool((lse[:, tq:] == float("-inf")).all())
    for buf, total in ((q_buf, tq), (k_buf, sum(lk)), (v_buf, sum(lk))):
        assert torch.equal(buf.grad[total:], torch.zeros_like(buf.grad[total:]))
        assert bool(torch.isfinite(buf.grad).all())


# ---- determinism, compile, API -------------------------------------------------------------


def spy_backward_problems(monkeypatch) -> list[tuple[bool, Problem]]:
    """Record ``(call.deterministic, problem)`` for every backward problem dispatch builds
    (once per new dispatch key: a repeated call reuses the keyed decision)."""
    seen: list[tuple[bool, Problem]] = []
    real = fa_module.backward_problem_of

    def spy(call):
        problem = real(call)
        seen.append((call.deterministic, problem))
        return problem

    monkeypatch.setattr(fa_module, "backward_problem_of", spy)
    return seen


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_deterministic_gradients_are_bitwise_identical(backend, device, monkeypatch):
    """Two backward passes with ``deterministic=True`` give bitwise equal gradients, and the
    flag reaches the backward's dispatch: the problem it chooses on (which keeps the atomic
    sm90 kernel away, see test_deterministic_backward_avoids_the_atomic_kernel) and the call
    the backend runs. On a CPU every backend here is deterministic anyway; the flag is what
    decides on a GPU, so it is what this test can check everywhere."""
    case = CASES["combined"]
    q, k, v = make_qkv(case, torch.bfloat16, device, 21)
    skip_unless_runs(backend, q, k, v, **options(case))
    dout, dlse = grad_inputs(case, device, 21)
    kw = dict(options(case), backend=backend, deterministic=True)
    seen = spy_backward_problems(monkeypatch)
    first = run_with_grads(q, k, v, dout, dlse, **kw)[2]
    second = run_with_grads(q, k, v, dout, dlse, **kw)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert seen, "the backward was dispatched without building its problem"
    for flag, problem in seen:
        assert flag is True and problem["deterministic"] is True


@pytest.mark.parametrize("path", ["eager", "op"])
def test_deterministic_flag_is_part_of_the_backward_dispatch_key(path, monkeypatch):
    """A deterministic backward after a non-deterministic one of the same shape must be
    dispatched anew (the keyed decision cache must not hand it the other one's kernel), on
    the eager fast path and through the custom op alike."""
    case = CASES["causal"]
    q, k, v = make_qkv(case, torch.float32, "cpu", 22)
    dout, dlse = grad_inputs(case, "cpu", 22)
    seen = spy_backward_problems(monkeypatch)
    for deterministic in (False, True, False):
        if path == "op":
            with OpLog() as log:
                run_with_grads(q, k, v, dout, dlse, deterministic=deterministic,
                               **options(case))
            assert "kpt.flash_attention_backward.default" in log.ops
        else:
            run_with_grads(q, k, v, dout, dlse, deterministic=deterministic, **options(case))
        if deterministic:
            assert [flag for flag, _ in seen] == [True], seen
            assert seen[0][1]["deterministic"] is True
        else:  # the first call dispatches; the third reuses the first's decision
            assert all(flag is False for flag, _ in seen), seen
        seen.clear()


# A backward Hopper's sm90 kernel takes unless the call asks for determinism: bf16, head dim
# 128, 512 tokens (the measured threshold), causal. Run on the CPU to capture its problem.
HOPPER_BACKWARD = dict(B=1, Sq=512, Sk=512, H=2, Hkv=2, D=128, causal=True)


def _hopper_backward_problem(monkeypatch, deterministic: bool) -> Problem:
    """The backward problem of a real ``HOPPER_BACKWARD`` call on the CPU (reference backend),
    as dispatch would see it on the first CUDA device."""
    case = HOPPER_BACKWARD
    q, k, v = make_qkv(case, torch.bfloat16, "cpu", 23)
    dout, dlse = grad_inputs(case, "cpu", 23)
    with monkeypatch.context() as patch:
        seen = spy_backward_problems(patch)
        run_with_grads(q, k, v, dout, None, deterministic=deterministic, **options(case))
    assert [flag for flag, _ in seen] == [deterministic]
    return on_cuda(seen[0][1])


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_backward_avoids_the_atomic_kernel(deterministic, monkeypatch):
    """On Hopper (simulated where there is none: the decision is Python) dispatch gives this
    backward to the sm90 kernel, which adds dq with fp32 atomics, unless the call asked for
    determinism: then Triton's backward runs, and the cuda backend, when forced, defaults to
    its atomic-free mma kernel and never lists the sm90 one."""
    problem = _hopper_backward_problem(monkeypatch, deterministic)
    simulate_hopper(monkeypatch)
    monkeypatch.setattr(autotune, "lookup", lambda *args: None)  # untuned: the static policy
    chosen, config = SPEC_BACKWARD.choose(problem)
    cuda_configs = SPEC_BACKWARD.backend("cuda").configs(problem)
    forced = SPEC_BACKWARD.choose(problem, "cuda")[1]
    if deterministic:
        assert chosen.name == "triton"
        assert {"impl": "sm90"} not in cuda_configs and forced == {"impl": "mma"}
    else:  # the simulated Hopper does offer the kernel: the deterministic case is not vacuous
        assert (chosen.name, config) == ("cuda", {"impl": "sm90"})
        assert cuda_configs[0] == forced == {"impl": "sm90"}


def test_deterministic_backward_ignores_a_tuned_atomic_config(monkeypatch):
    """The tuner times non-deterministic problems, where the sm90 backward wins; a
    deterministic call of the same shape must still not get that config: its bucket differs,
    so the lookup (here: any row of the non-deterministic bucket) finds nothing for it."""
    problem = _hopper_backward_problem(monkeypatch, True)
    simulate_hopper(monkeypatch)
    plain = SPEC_BACKWARD.bucket(_hopper_backward_problem(monkeypatch, False))
    monkeypatch.setattr(autotune, "lookup", lambda op, problem, bucket: (
        ("cuda", {"impl": "sm90"}) if bucket == plain else None))
    chosen, config = SPEC_BACKWARD.choose(problem)
    assert config != {"impl": "sm90"}, (chosen.name, config)


def test_torch_compile_fullgraph_forward_and_backward():
    case = CASES["combined"]
    q, k, v = make_qkv(case, torch.float32, "cpu", 4)

    def step(q, k, v):
        out, lse = flash_attention(q, k, v, causal=True, window=(9, 0), softcap=3.0,
                                   return_lse=True)
        return out.square().sum() + lse.sum()

    eager_loss = step(q, k, v)
    eager = torch.autograd.grad(eager_loss, (q, k, v))
    compiled_loss = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    compiled = torch.autograd.grad(compiled_loss, (q, k, v))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", devices())
def test_eager_fast_path_matches_the_custom_op(device):
    """Plain eager calls skip the custom op's wrappers (flash_attention's _eager), yet compute
    what the op computes, forward and backward, bit for bit on the same backend; under a
    dispatch mode the call goes through the op, which the mode then sees."""
    case = CASES["combined"]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = make_qkv(case, dtype, device, 31, transposed=True)
    dout, dlse = grad_inputs(case, device, 31)
    # deterministic: bitwise equality of the gradients must not depend on fp32 atomics
    kw = dict(options(case), deterministic=True)
    fast = run_with_grads(q, k, v, dout, dlse, **kw)
    with OpLog() as log:
        logged = run_with_grads(q, k, v, dout, dlse, **kw)
    assert "kpt.flash_attention.default" in log.ops
    assert "kpt.flash_attention_backward.default" in log.ops
    # the op directly, with its own autograd
    scale = kw.get("scale", q.shape[-1] ** -0.5)
    left, right = kw.get("window", (-1, -1))
    out, lse = torch.ops.kpt.flash_attention(q, k, v, None, None, q.shape[1], k.shape[1], scale,
                                             left, 0 if kw.get("causal") else right,
                                             float(kw.get("softcap", 0.0)), True, True, "")
    loss = (out.float() * dout).sum() + (lse.masked_fill(lse == float("-inf"), 0.0) * dlse).sum()
    op_grads = torch.autograd.grad(loss, (q, k, v))
    for other in (logged, (out.detach(), lse.detach(), op_grads)):
        assert torch.equal(fast[0], other[0]) and torch.equal(fast[1], other[1])
        for a, b in zip(fast[2], other[2]):
            assert torch.equal(a, b)


def test_eager_fast_path_declines_what_must_see_the_op():
    fa = importlib.import_module("kpt.ops.flash_attention")
    q, k, v = make_qkv(CASES["plain"], torch.float32, "cpu", 5)
    assert fa._eager(q, k, v, None, None)
    with OpLog():
        assert not fa._eager(q, k, v, None, None)
    with torch.overrides.TorchFunctionMode():
        assert not fa._eager(q, k, v, None, None)
    assert not torch.func.vmap(lambda x: torch.tensor(fa._eager(x, x, x)))(q).any()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(q)
    assert not fa._eager(fake, k, v, None, None)


@pytest.mark.parametrize("path", ["eager", "op"])
def test_double_backward_is_a_clear_error(path):
    """Second derivatives are not implemented: differentiating the gradients raises (on both
    paths) instead of silently dropping the terms through the backward kernels."""
    q, k, v = make_qkv(CASES["plain"], torch.float32, "cpu", 6)
    if path == "op":
        out = torch.ops.kpt.flash_attention(q, k, v, None, None, q.shape[1], k.shape[1], 0.25,
                                            -1, -1, 0.0, False, False, "")[0]
    else:
        out = flash_attention(q, k, v)
    (gq,) = torch.autograd.grad(out.square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gq.sum(), (q,))


def test_defaults_and_auto_dispatch():
    q, k, v = make_qkv(CASES["gqa"], torch.float32, "cpu", 9)
    out = flash_attention(q, k, v)
    explicit = flash_attention(q, k, v, scale=q.shape[-1] ** -0.5, backend="reference")
    assert torch.equal(out, explicit)
    assert out.shape == q.shape and out.is_contiguous()


TUNE_SHAPE = dict(batch=1, seqlen_q=33, seqlen_k=40, heads_q=4, heads_kv=2, head_dim=24,
                  causal=True, window_left=9, softcap=5.0, scale=None)
TUNE_SHAPES = {
    "combined": TUNE_SHAPE,
    # more queries than keys, causal: the first rows see no key (zero gradients, lse -inf)
    "q_longer_mqa": dict(batch=2, seqlen_q=37, seqlen_k=20, heads_q=3, heads_kv=1, head_dim=32,
                         causal=True),
    "full_odd": dict(batch=1, seqlen_q=40, seqlen_k=29, heads_q=2, heads_kv=2, head_dim=16),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", list(TUNE_SHAPES))
@pytest.mark.parametrize("op", [SPEC, SPEC_BACKWARD], ids=lambda op: op.name)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_every_tuning_config_passes_the_tuners_check(backend, op, shape, device):
    """What the autotuner does: reference on fresh data, then each config on poisoned outputs
    (on cpu the triton configs cover both load paths: pointers and TMA descriptors)."""
    tuning = op.tuning
    call = tuning.make_call(TUNE_SHAPES[shape], torch.bfloat16, torch.device(device), 3)
    problem = tuning.problem(call)
    reasons = op.reasons(backend, problem)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))
    expected = tuning.clone_outputs(call)
    op.backend("reference").run(expected, {})
    chosen = op.backend(backend)
    for config in chosen.configs(problem):
        tuning.poison(call)
        chosen.run(call, config)
        reason = tuning.check(call, expected)
        assert reason is None, f"{config}: {reason}"


def test_tuning_hooks_catch_unwritten_outputs():
    shape = shapes_from_hf_config({"num_attention_heads": 4, "num_key_value_heads": 2,
                                   "hidden_size": 64, "sliding_window": 8,
                                   "attn_logit_softcapping": 50.0,
                                   "query_pre_attn_scalar": 16}, [9])
    assert [s["window_left"] for s in shape] == [-1, 7]
    assert shape[0]["scale"] == 0.25 and shape[0]["softcap"] == 50.0
    call = make_call(shape[1], torch.float32, torch.device("cpu"), seed=1)
    ref.run(call, {})
    other = clone_outputs(call)
    poison(other)
    assert check(other, call) is not None
    ref.run(other, {})
    assert check(other, call) is None


def _base_args() -> dict:
    q, k, v = make_qkv(CASES["gqa"], torch.float32, "cpu", 0)
    return dict(q=q, k=k, v=v)


def _cu(*values: int, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


BAD_CALLS = {
    "q int": (dict(q=torch.ones(1, 17, 4, 16, dtype=torch.int32)), TypeError, "q must be one"),
    "q 2-D": (dict(q=torch.randn(17, 16)), ValueError, "q must have"),
    "k dtype": (dict(k=torch.randn(1, 17, 2, 16, dtype=torch.float64)), TypeError, "k must"),
    "k not tensor": (dict(k=[1.0]), TypeError, "k must be a torch.Tensor"),
    "batch": (dict(k=torch.randn(2, 17, 2, 16), v=torch.randn(2, 17, 2, 16)), ValueError,
              "batch"),
    "k v shapes": (dict(v=torch.randn(1, 16, 2, 16)), ValueError, "one shape"),
    "head dim": (dict(k=torch.randn(1, 17, 2, 8), v=torch.randn(1, 17, 2, 8)), ValueError,
                 "head_dim"),
    "heads": (dict(k=torch.randn(1, 17, 3, 16), v=torch.randn(1, 17, 3, 16)), ValueError,
              "multiple"),
    "window": (dict(window=(-2, 0)), ValueError, "window"),
    "window float": (dict(window=(1.5, 0)), ValueError, "window"),
    "causal right": (dict(causal=True, window=(4, 2)), ValueError, "causal"),
    "causal type": (dict(causal=1), TypeError, "causal must be a bool"),
    "softcap": (dict(softcap=-1.0), ValueError, "softcap"),
    "scale": (dict(scale=float("nan")), ValueError, "scale"),
    "max without cu": (dict(max_seqlen_q=17), ValueError, "varlen"),
    "cu int64": (dict(q=torch.randn(17, 4, 16), k=torch.randn(17, 2, 16),
                      v=torch.randn(17, 2, 16), cu_seqlens_q=_cu(0, 17, dtype=torch.int64),
                      cu_seqlens_k=_cu(0, 17)), TypeError, "cu_seqlens_q"),
    "cu one side": (dict(q=torch.randn(17, 4, 16), k=torch.randn(17, 2, 16),
                         v=torch.randn(17, 2, 16), cu_seqlens_q=_cu(0, 17)), ValueError,
                    "both"),
    "cu lengths": (dict(q=torch.randn(17, 4, 16), k=torch.randn(17, 2, 16),
                        v=torch.randn(17, 2, 16), cu_seqlens_q=_cu(0, 17),
                        cu_seqlens_k=_cu(0, 7, 17)), ValueError, "same length"),
    "varlen 4-D": (dict(cu_seqlens_q=_cu(0, 17), cu_seqlens_k=_cu(0, 17)), ValueError,
                   "total_tokens"),
    "max negative": (dict(q=torch.randn(17, 4, 16), k=torch.randn(17, 2, 16),
                          v=torch.randn(17, 2, 16), cu_seqlens_q=_cu(0, 17),
                          cu_seqlens_k=_cu(0, 17), max_seqlen_q=-1, max_seqlen_k=17),
                     ValueError, "max_seqlen_q"),
    "backend": (dict(backend="magic"), ValueError, "unknown backend"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_is_rejected_before_launch(name, monkeypatch):
    override, error, text = BAD_CALLS[name]
    args = _base_args() | override
    launched = []
    monkeypatch.setattr(SPEC, "launch", lambda *a, **kw: launched.append(a))
    monkeypatch.setattr(SPEC, "launch_keyed", lambda *a, **kw: launched.append(a))
    with pytest.raises(error, match=text) as info:
        flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    assert "flash_attention" in str(info.value)
    assert not launched


def test_explicit_backend_that_cannot_run_explains_why():
    args = _base_args()
    with pytest.raises(ValueError, match="backend 'triton' cannot run") as info:
        flash_attention(**args, backend="triton")
    assert "float32" in str(info.value)


def test_lse_is_natural_log():
    # Guard the lse convention used by merge_attention_states and friends: natural log.
    q, k, v = make_qkv(CASES["len1"], torch.float32, "cpu", 2)
    lse = flash_attention(q, k, v, return_lse=True)[1].detach()
    s = ((q * k).sum(-1) * q.shape[-1] ** -0.5).detach()  # one key: lse is the logit itself
    torch.testing.assert_close(lse, s.transpose(1, 2), rtol=1e-6, atol=1e-6)
    assert math.isclose(float(lse.flatten()[0]), float(s.flatten()[0]), rel_tol=1e-6)


def test_launch_grid_limits_are_reasons_for_the_gpu_kernels():
    """Heads and batch (varlen: sequences) are the y and z dims of every GPU kernel's grid,
    which hold 65535 blocks at most: beyond that the GPU backends give a reason (dispatch
    then falls back) instead of a failed launch. The interpreter has no such limit."""
    from kpt.ops.flash_attention import _cuda, _triton_supports

    def problem(device, heads, batch):
        return Problem.of(torch.device(device, 0) if device == "cuda" else torch.device(device),
                          torch.float16, batch=batch, heads_q=heads, head_dim=64)

    for supports in (_cuda.supports, _triton_supports):
        assert supports(problem("cuda", 8, 65535)) == []
        for heads, batch, name in ((8, 65536, "batch 65536"), (70000, 2, "heads 70000")):
            assert any(name in r and "65535" in r
                       for r in supports(problem("cuda", heads, batch)))
    assert not any("65535" in r for r in _triton_supports(problem("cpu", 8, 70000)))
