"""The ``xpu`` backend's IPEX paths on the CPU (IPEX's CPU kernels, run for real), against kpt's
reference on the same inputs; and what dispatch and ``python -m kpt.info`` say about the
backend here (no XPU device, no Intel Triton backend)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("intel_extension_for_pytorch", reason="IPEX is not installed: tests/xpu run "
                    "in .venv-xpu (bash scripts/setup_xpu.sh)")

from kpt.info import backend_rows, example_problem  # noqa: E402
from kpt.ops import flash_attention, rmsnorm_qkv_rope  # noqa: E402
from kpt.ops._common import compare  # noqa: E402
from kpt.ops._registry import Problem, all_ops  # noqa: E402
from kpt.ops.flash_attention import LSE_TOLERANCE, TOLERANCE, compare_lse  # noqa: E402

CPU = torch.device("cpu")


def rand(gen, *shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def close(name, got, want, tol):
    reason = compare(name, got, want, tol)
    assert reason is None, reason


def chosen(op: str, problem: Problem) -> str:
    return all_ops()[op].static_choice(problem)[0].name


# ---- flash_attention ----------------------------------------------------------------------

MASKS = {"full": dict(causal=False), "causal": dict(causal=True),
         "window": dict(causal=False, window=(3, 2)), "causal-short-keys": dict(causal=True)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mask", list(MASKS))
def test_flash_attention(mask, dtype):
    gen = torch.Generator().manual_seed(0)
    # causal-short-keys: more queries than keys, so the first rows see no key (out 0, -inf).
    sq, sk = (9, 5) if mask == "causal-short-keys" else (9, 11) if mask == "window" else (10, 10)
    q = rand(gen, 2, sq, 4, 64, dtype=dtype)
    k, v = rand(gen, 2, sk, 2, 64, dtype=dtype), rand(gen, 2, sk, 2, 64, dtype=dtype)
    want, want_lse = flash_attention(q, k, v, return_lse=True, backend="reference",
                                     **MASKS[mask])
    out, lse = flash_attention(q, k, v, return_lse=True, backend="xpu", **MASKS[mask])
    close("out", out, want, TOLERANCE[dtype])
    assert compare_lse("lse", lse, want_lse, LSE_TOLERANCE) is None


@pytest.mark.parametrize("mask", [dict(causal=True), dict(causal=False, window=(2, 0))])
def test_flash_attention_masked_nan_never_reaches_a_row(mask):
    """The reference's rule: a NaN in a key or value a query cannot see takes no part in its
    output (IPEX's kernel alone would spread it to every row: kpt runs the reference then)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = rand(gen, 1, 40, 4, 64), rand(gen, 1, 40, 2, 64), rand(gen, 1, 40, 2, 64)
    k[:, -1, :, :3] = float("nan")
    v[:, -1, :, 5:] = float("nan")
    want = flash_attention(q, k, v, backend="reference", **mask)
    got = flash_attention(q, k, v, backend="xpu", **mask)
    assert torch.isfinite(got[:, :-1]).all() and torch.isnan(got[:, -1]).all()
    close("out", got, want, TOLERANCE[torch.bfloat16])


def test_flash_attention_varlen():
    gen = torch.Generator().manual_seed(1)
    cu_q = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 9, 15], dtype=torch.int32)
    q, k, v = rand(gen, 14, 4, 64), rand(gen, 16, 2, 64), rand(gen, 16, 2, 64)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, return_lse=True)
    want, want_lse = flash_attention(q, k, v, backend="reference", **kw)
    out, lse = flash_attention(q, k, v, backend="xpu", **kw)
    close("out", out, want, TOLERANCE[torch.bfloat16])
    assert compare_lse("lse", lse, want_lse, LSE_TOLERANCE) is None


def test_flash_attention_trains_through_the_ipex_forward():
    """Dispatch on the CPU runs IPEX's forward; the backward (the reference's) reads its lse."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = rand(gen, 2, 8, 4, 64), rand(gen, 2, 8, 2, 64), rand(gen, 2, 8, 2, 64)

    def grads(backend):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = flash_attention(*leaves, causal=True, backend=backend)
        (out.float() ** 2).sum().backward()
        return [t.grad for t in leaves]

    problem = Problem.of(CPU, torch.bfloat16, batch=2, seqlen_q=8, seqlen_k=8, heads_q=4,
                         heads_kv=2, head_dim=64, mask="causal", softcap=False, varlen=False)
    assert chosen("flash_attention", problem) == "xpu"
    for name, got, want in zip("qkv", grads(None), grads("reference")):
        close(f"d{name}", got, want, 2**-6)  # the backward's bound (4 units of bf16)


def test_flash_attention_softcap_is_a_reason():
    problem = Problem.of(CPU, torch.bfloat16, batch=1, seqlen_q=8, seqlen_k=8, heads_q=4,
                         heads_kv=2, head_dim=64, mask="causal", softcap=True, varlen=False)
    op = all_ops()["flash_attention"]
    assert op.reasons("xpu", problem) == ["IPEX on the CPU: soft-cap: IPEX's CPU flash "
                                          "attention has none"]
    assert chosen("flash_attention", problem) == "reference"


# ---- rmsnorm_qkv_rope ---------------------------------------------------------------------


def _fused_args(gen, dtype, style: str):
    tokens, hidden, hq, hkv, d = 7, 128, 4, 2, 32
    n = (hq + 2 * hkv) * d
    args = dict(x=rand(gen, tokens, hidden, dtype=dtype),
                norm_weight=rand(gen, hidden, dtype=dtype, scale=0.1) + 1,
                qkv_weight=rand(gen, n, hidden, dtype=dtype, scale=hidden**-0.5),
                positions=torch.randint(0, 4096, (tokens,), generator=gen))
    opts = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, eps=1e-6, rope_theta=1e4)
    if style == "qwen3":
        args.update(residual=rand(gen, tokens, hidden, dtype=dtype),
                    qkv_bias=rand(gen, n, dtype=dtype, scale=0.1),
                    q_norm_weight=rand(gen, d, dtype=dtype, scale=0.1) + 1,
                    k_norm_weight=rand(gen, d, dtype=dtype, scale=0.1) + 1)
    elif style == "gptj":
        opts.update(rope_style="gptj")
    return args, opts


@pytest.mark.parametrize("style", ["qwen3", "gptj", "llama"])
def test_rmsnorm_qkv_rope(style):
    dtype = torch.bfloat16  # the dtype IPEX serves on the CPU (faster there; see the module)
    args, opts = _fused_args(torch.Generator().manual_seed(3), dtype, style)
    want = rmsnorm_qkv_rope(**args, **opts, backend="reference")
    got = rmsnorm_qkv_rope(**args, **opts, backend="xpu")
    # IPEX keeps the normalised row and the RoPE products in float32 where the reference
    # rounds each to the input dtype (HF's rounding points): up to 2 units apart.
    for name, g, w in zip(("q", "k", "v", "residual"), got, want):
        close(name, g, w, 2**-7)


def test_rmsnorm_qkv_rope_cpu_dispatch():
    """bf16 takes IPEX on the CPU; fp16 and fp32 (not measurably faster) and partial rotary keep
    the reference."""
    base = dict(tokens=7, hidden=128, num_q_heads=4, num_kv_heads=2, head_dim=32,
                rotary_dim=32, neox=True, residual=True, bias=False, qk_norm=False)
    assert chosen("rmsnorm_qkv_rope", Problem.of(CPU, torch.bfloat16, **base)) == "xpu"
    for dtype in (torch.float16, torch.float32):
        assert chosen("rmsnorm_qkv_rope", Problem.of(CPU, dtype, **base)) == "reference"
    partial = dict(base, rotary_dim=16)
    assert chosen("rmsnorm_qkv_rope", Problem.of(CPU, torch.bfloat16, **partial)) == \
        "reference"


def test_rmsnorm_qkv_rope_backward_after_the_ipex_forward():
    args, opts = _fused_args(torch.Generator().manual_seed(4), torch.bfloat16, "qwen3")
    gen = torch.Generator().manual_seed(5)

    def grads(backend):
        leaves = {n: (t.detach().requires_grad_(True) if t.is_floating_point() else t)
                  for n, t in args.items()}
        outs = rmsnorm_qkv_rope(**leaves, **opts, backend=backend)
        cotangents = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in outs]
        torch.autograd.backward(outs, cotangents)
        return [leaves[n].grad for n in ("x", "norm_weight", "qkv_weight", "residual")]

    # The backward is the op's own PyTorch one on the saved inputs, whichever forward ran: with
    # the same output gradients, the same gradients bit for bit.
    got = grads("xpu")
    gen.manual_seed(5)
    for name, g, w in zip(("dx", "dnorm", "dqkv", "dres"), got, grads("reference")):
        assert torch.equal(g, w), name


# ---- what the backend says here -----------------------------------------------------------


def test_info_rows_on_the_cpu():
    rows = {(op, b): status for op, b, status in backend_rows(CPU)}
    assert rows[("flash_attention", "xpu")] == "ok"
    assert rows[("rmsnorm_qkv_rope", "xpu")] == "ok"
    for op in ("flash_attention_backward", "flex_attention", "fp8_gemm", "int4_gemm",
               "paged_attention"):
        assert rows[(op, "xpu")] == "device cpu not in ['xpu']"


@pytest.mark.parametrize("op", ["flash_attention", "flash_attention_backward", "flex_attention",
                                "fp8_gemm", "int4_gemm", "paged_attention", "rmsnorm_qkv_rope"])
def test_xpu_problems_name_what_is_missing(op):
    """An XPU problem (described, not run: there is no device) says why the Triton half cannot
    run here; the declaration itself is what an Intel GPU machine would use."""
    spec = all_ops()[op]
    problem = dataclasses.replace(example_problem(spec, CPU, torch.bfloat16), device_type="xpu")
    reasons = "; ".join(spec.reasons("xpu", problem))
    assert "triton has no Intel (XPU) backend" in reasons
