"""The Triton helpers that keep a key's NaN / inf value out of rows that cannot see it
(``kpt/ops/_triton_compat.py``: ``masked_pv`` and its rare branch ``nonfinite_pv``), against
the attention references' ``visible_matmul``: the same IEEE result per row, on tiles where
visible and hidden keys carry +inf, -inf and NaN, and visible keys have zero probabilities.
Runs the kernels wherever Triton runs them (the CPU under ``TRITON_INTERPRET=1``). Also the
launchers' shared output staging (``_common.kernel_output``)."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="the helpers are Triton code")
import triton.language as tl  # noqa: E402

from kpt.ops._common import visible_matmul  # noqa: E402
from kpt.ops._triton_compat import masked_pv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M, N, D = 16, 32, 16


@triton.jit
def _masked_pv_kernel(P, OK, V, OUT, M: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    rows, keys, cols = tl.arange(0, M), tl.arange(0, N), tl.arange(0, D)
    p = tl.load(P + rows[:, None] * N + keys[None, :])
    ok = tl.load(OK + rows[:, None] * N + keys[None, :]) != 0
    v = tl.load(V + keys[:, None] * D + cols[None, :])
    acc = masked_pv(p, v, ok, tl.zeros((M, D), tl.float32))
    tl.store(OUT + rows[:, None] * D + cols[None, :], acc)


def _case(seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    ok = torch.rand(M, N, generator=gen) < 0.6
    # Probabilities already on v's dtype's grid (the kernel's dot rounds p to it); hidden keys
    # get 0, and a few visible ones 0 too (an underflowed probability).
    p = torch.rand(M, N, generator=gen).to(dtype).float() * ok
    p[torch.rand(M, N, generator=gen) < 0.1] = 0.0
    v = torch.randn(N, D, generator=gen)
    for value in (math.inf, -math.inf, math.nan):
        where = torch.rand(N, D, generator=gen) < 0.03
        v[where] = value
    return p, ok, v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seed", range(6))
def test_masked_pv_is_the_visible_product(seed, dtype):
    p, ok, v = _case(seed, dtype)
    out = torch.empty(M, D, device=DEVICE)
    _masked_pv_kernel[(1,)](p.to(DEVICE), ok.to(torch.int8).to(DEVICE), v.to(DEVICE), out,
                            M=M, N=N, D=D)
    want = visible_matmul(p, ok, v.float())
    got = out.cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got == math.inf, want == math.inf)
    assert torch.equal(got == -math.inf, want == -math.inf)
    finite = torch.isfinite(want)
    assert finite.any() and not finite.all()  # the case exercises both kinds of entry
    # Float32 sums of the same exact products in another order.
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_masked_pv_follows_ieee_on_each_kind_of_non_finite_meeting(dtype):
    """Rows built for each rule, kernel and reference alike: an inf at a positive p gives that
    inf; +inf and -inf both at positive p NaN; an inf at a visible key whose p underflowed to 0
    NaN (0 * inf), also beside an inf of the same sign at a positive p; a hidden NaN or inf
    nothing; a visible NaN NaN even at p = 0."""
    p = torch.full((M, N), 0.01).to(dtype).float()
    ok = torch.ones(M, N, dtype=torch.bool)
    v = torch.randn(N, D, generator=torch.Generator().manual_seed(7))
    v[0, 0], v[1, 0], v[2, 1], v[3, 2], v[4, 3] = math.inf, math.inf, -math.inf, math.nan, math.inf
    p[:, 0:5] = 0.0
    ok[:, 0:5] = False  # by default rows see none of the five poisoned keys
    rules = {  # row: (keys seen with p > 0, keys seen with p == 0, expected column 0..3)
        0: ([0], [], {0: math.inf}),
        1: ([0, 2], [], {0: math.inf, 1: -math.inf}),
        2: ([0], [1], {0: math.nan}),  # +inf at p > 0 beside +inf at p == 0
        3: ([], [4], {3: math.nan}),
        4: ([], [3], {2: math.nan}),
        5: ([], [], {}),
    }
    for row, (positive, underflow, _) in rules.items():
        for key in positive:
            p[row, key], ok[row, key] = 0.25, True
        for key in underflow:
            ok[row, key] = True
    v = v.to(dtype)
    out = torch.empty(M, D, device=DEVICE)
    _masked_pv_kernel[(1,)](p.to(DEVICE), ok.to(torch.int8).to(DEVICE), v.to(DEVICE), out,
                            M=M, N=N, D=D)
    want = visible_matmul(p, ok, v.float())
    got = out.cpu()
    for row, (_, _, expected) in rules.items():
        for col in range(4):
            value = expected.get(col)
            for name, t in (("kernel", got), ("reference", want)):
                x = float(t[row, col])
                if value is None:
                    assert math.isfinite(x), (name, row, col, x)
                elif math.isnan(value):
                    assert math.isnan(x), (name, row, col, x)
                else:
                    assert x == value, (name, row, col, x)


def test_kernel_output_writes_through_a_temporary_only_when_needed():
    """``_common.kernel_output`` (what the csrc launchers write into): ``out`` itself when the
    kernel can store to it, else a contiguous temporary whose values land in ``out``."""
    from kpt.ops._common import kernel_output

    out = torch.zeros(4, 6)
    with kernel_output(out, True) as target:
        target.fill_(1.0)
    assert target is out and bool((out == 1).all())
    strided = torch.zeros(6, 4).t()
    with kernel_output(strided, False) as target:
        assert target is not strided and target.is_contiguous()
        assert target.shape == strided.shape and target.dtype == strided.dtype
        target.copy_(torch.arange(24.0).view(4, 6))
    assert torch.equal(strided, torch.arange(24.0).view(4, 6))
