"""flash_attention's varlen boundaries in content: read on the host whenever they live there
(and on a GPU under ``KPT_CHECK=1``), rejected before any launch when they start below 0,
decrease, run past their tensor, or contradict a ``max_seqlen`` hint; a hint above the tokens
there are is clamped (the grid is sized by it), never a hang."""

from __future__ import annotations

import sys

import pytest
import torch

from kpt.ops import flash_attention
from kpt.ops.flash_attention import SPEC


def _inputs(device: str, dtype: torch.dtype, total: int = 17):
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(total, 4, 16, generator=gen).to(device, dtype) for _ in range(3)]


def _cu(*values: int, device: str = "cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


BAD = {
    "past the tensor": ((0, 9, 18), None, "past the 17 tokens"),
    "negative start": ((-2, 9, 17), None, "start at >= 0 and never decrease"),
    "decreasing": ((0, 11, 9, 17), None, "never decrease"),
    "hint below the longest": ((0, 5, 17), 11, "below the longest sequence \\(12\\)"),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_boundaries_are_rejected_before_launch(name, device, monkeypatch):
    values, hint, text = BAD[name]
    if device == "cuda":
        monkeypatch.setenv("KPT_CHECK", "1")  # on a GPU the content check is asked for
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = _inputs(device, dtype)
    cu = _cu(*values, device=device)
    launched = []
    monkeypatch.setattr(SPEC, "launch", lambda *a, **kw: launched.append(a))
    monkeypatch.setattr(SPEC, "launch_keyed", lambda *a, **kw: launched.append(a))
    with pytest.raises(ValueError, match=text) as info:
        flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=hint,
                        max_seqlen_k=hint)
    assert "flash_attention" in str(info.value)
    assert not launched


def _backends(device: str, dtype: torch.dtype) -> list[str]:
    from kpt.ops.flash_attention import Call, problem_of

    q, k, v = _inputs(device, dtype)
    cu = _cu(0, 6, 17, device=device)
    call = Call(q, k, v, cu, cu, 11, 11, 0.25, -1, 0, 0.0, q, q)
    return [b.name for b in SPEC.backends if not SPEC.reasons(b, problem_of(call))]


CASES = [(d, t, b) for d, t in [("cpu", torch.float32), ("cpu", torch.bfloat16)]
         + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
         for b in _backends(d, t)]


@pytest.mark.parametrize(("device", "dtype", "backend"), CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
def test_huge_hint_is_clamped_not_a_hang(device, dtype, backend):
    """max_seqlen of 10^9 over sequences of 6 and 11 tokens: the result of the true maximum."""
    q, k, v = _inputs(device, dtype)
    cu = _cu(0, 6, 17, device=device)
    got = flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                          max_seqlen_q=10**9, max_seqlen_k=10**9, backend=backend)
    want = flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                           max_seqlen_q=11, max_seqlen_k=11, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same launch: bitwise equal


def test_gpu_boundaries_are_not_read_without_kpt_check(monkeypatch):
    """On a GPU with a hint, the default path never reads the boundaries (no host sync)."""
    if not torch.cuda.is_available():
        pytest.skip("the no-sync path is the GPU's: on the CPU boundaries are always checked")
    monkeypatch.delenv("KPT_CHECK", raising=False)
    q, k, v = _inputs("cuda", torch.bfloat16)
    cu = _cu(0, 6, 17, device="cuda")
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("boundaries read"))
    flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=11,
                    max_seqlen_k=11)



def _kernel_backends() -> list[tuple[str, str]]:
    from kpt.ops.flash_attention import Call, problem_of

    out = []
    for device in DEVICES:
        q, k, v = _inputs(device, torch.bfloat16)
        cu = _cu(0, 6, 17, device=device)
        problem = problem_of(Call(q, k, v, cu, cu, 11, 11, 0.25, -1, 0, 0.0, q, q))
        out += [(device, name) for name in ("triton", "cuda")
                if not SPEC.reasons(name, problem)]
    return out


@pytest.mark.parametrize(("device", "backend"), _kernel_backends())
@pytest.mark.parametrize(("bad", "clamped"), [((0, 9, 40), (0, 9, 17)),
                                              ((-5, 9, 17), (0, 9, 17)),
                                              ((0, 12, 7), (0, 12, 12))],
                         ids=["past the end", "negative", "decreasing"])
def test_kernels_stay_inside_the_tensors_whatever_the_boundaries(device, backend, bad, clamped,
                                                                  monkeypatch):
    """With the host check out of the way (as on a GPU without KPT_CHECK), malformed boundaries
    read and write nothing outside the tensors: the result is that of the boundaries clamped
    to the tensor (no fault, no garbage), forward and backward."""
    fa = sys.modules["kpt.ops.flash_attention"]  # the module (kpt.ops exports the function)
    monkeypatch.setattr(fa, "_check_boundaries", lambda name, cu, total, hint: hint)
    q, k, v = (t.requires_grad_() for t in _inputs(device, torch.bfloat16))
    results = []
    for values in (bad, clamped):
        cu = _cu(*values, device=device)
        out = flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                              max_seqlen_q=12, max_seqlen_k=12, backend=backend)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        results.append((out, *grads))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same work: bitwise equal
