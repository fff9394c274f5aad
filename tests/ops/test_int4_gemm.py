"""int4_gemm / pack_int4 / dequantize_int4: the packed layout bit by bit, the round-trip bound
of round-to-nearest quantisation, the reference against float64, every kernel against the
reference (odd M, odd-ish N, every group size, symmetric and zero-point, act-order, bias,
fp16/bf16, strided x, NaN-poisoned padding, split-K), bad input, and torch.compile."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

from kpt.ops import dequantize_int4, int4_gemm, pack_int4
from kpt.ops._common import compare
from kpt.ops.int4_gemm import GROUP_SIZES, SPEC, Call, problem_of
from kpt.ops.int4_gemm import reference as ref
from tests.ops.rejects import assert_rejected_before_launch

# Kernel vs reference: the same rounded weights and one final rounding; only the float32 sum
# order differs, which can move an element across a rounding boundary: one unit in the last
# place (bf16 u = 2^-8, fp16 2^-11) bounds it, norm-wise and per element.
TOLERANCE = {torch.bfloat16: 2**-8, torch.float16: 2**-11}
# Reference vs float64 on the same rounded weights: the final rounding (half a unit: bf16
# 2^-9, fp16 2^-12) plus float32 sums over K <= 512 (~1e-6 relative); bound: one unit.
# float32 x: the sums only.
REF_TOLERANCE = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 1e-5}


def _g_idx(k: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """GPTQ act-order groups: channels taken in a random order, group_size at a time."""
    perm = torch.randperm(k, generator=gen)
    g = torch.empty(k, dtype=torch.int32)
    g[perm] = (torch.arange(k) // group_size).int()
    return g


def _weights(seed: int, n: int, k: int, group_size: int, symmetric: bool, act_order: bool,
             device: str = "cpu"):
    """A random (N, K) weight with a few outlier channels, quantised: (w, packed, scales,
    zeros, g_idx)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(1, k, generator=gen).add(0.2)
    w[:, :: max(1, k // 5)] *= 6  # outliers widen some groups' range
    g_idx = _g_idx(k, group_size, gen) if act_order else None
    packed, scales, zeros = pack_int4(w, group_size, symmetric, g_idx=g_idx)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(w), move(packed), move(scales), move(zeros), move(g_idx)


def _x(seed: int, m: int, k: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def _group_of(k: int, group_size: int, g_idx):
    groups = 1 if group_size < 0 else k // group_size
    return ref.group_index(k, group_size, g_idx, torch.device("cpu"), groups)


# ---- layout and quantisation ---------------------------------------------------------------


def test_packed_layout_is_the_documented_one():
    """Word packed[i, n] holds q[n, 8i + j] in bits 4j..4j+3, as a two's-complement int32."""
    n, k = 3, 16
    q = (torch.arange(k).view(1, k) * 5 + torch.arange(n).view(n, 1) * 3) % 16
    packed = ref.pack(q)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (k // 8, n)
    for i, col in itertools.product(range(k // 8), range(n)):
        word = sum(int(q[col, 8 * i + j]) << (4 * j) for j in range(8))
        assert int(packed[i, col]) == (word - 2**32 if word >= 2**31 else word)
    assert (packed < 0).any()  # some nibble 7 >= 8 exercised the sign bit
    torch.testing.assert_close(ref.unpack(packed), q.int(), rtol=0, atol=0)


@pytest.mark.parametrize("act_order", [False, True], ids=["contiguous", "act-order"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["zero-point", "symmetric"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_round_trip_is_within_half_a_scale(group_size, symmetric, act_order):
    if act_order and group_size < 0:
        pytest.skip("act-order groups need a group size")
    n, k = 48, 512
    w, packed, scales, zeros, g_idx = _weights(group_size + 7, n, k, group_size, symmetric,
                                               act_order)
    groups = 1 if group_size < 0 else k // group_size
    assert tuple(packed.shape) == (k // 8, n) and packed.dtype == torch.int32
    assert tuple(scales.shape) == (groups, n) and scales.dtype == torch.float32
    assert (scales > 0).all()
    if symmetric:
        assert zeros is None
    else:
        assert zeros.dtype == torch.uint8 and tuple(zeros.shape) == (groups, n)
        assert int(zeros.max()) <= 15
    deq = dequantize_int4(packed, scales, zeros, group_size=group_size, g_idx=g_idx)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    s = scales[_group_of(k, group_size, g_idx)].t()  # (N, K): each element's scale
    # RTN: within half a step; float32 division and product add a few ulps of |w|.
    slack = 4 * torch.finfo(torch.float32).eps * w.abs()
    assert ((w - deq).abs() <= s / 2 + slack).all()
    # and the quantisation uses the grid: some elements are off by a sizeable share of a step
    assert ((w - deq).abs() > s / 8).any()


def test_quantisation_of_special_groups():
    """A group of zeros gets scale 1 and comes back as zeros; a one-signed group keeps 0 on
    its zero-point grid (the range is widened to hold it); symmetric codes stay in 1..15."""
    w = torch.cat([torch.zeros(2, 32), torch.rand(2, 32) + 1, -torch.rand(2, 32) - 1], 1)
    for symmetric in (False, True):
        packed, scales, zeros = pack_int4(w, 32, symmetric)
        assert scales[0].eq(1).all()
        deq = dequantize_int4(packed, scales, zeros, group_size=32)
        assert deq[:, :32].eq(0).all()
        codes = ref.unpack(packed)
        if symmetric:
            assert codes.min() >= 1
        else:
            assert zeros[1].eq(0).all() and zeros[2].eq(15).all()


def test_dequantize_rounds_once_to_the_requested_dtype():
    _, packed, scales, zeros, _ = _weights(3, 48, 128, 64, False, False)
    full = dequantize_int4(packed, scales, zeros, group_size=64)
    for dtype in (torch.bfloat16, torch.float16):
        got = dequantize_int4(packed, scales, zeros, group_size=64, dtype=dtype)
        torch.testing.assert_close(got, full.to(dtype), rtol=0, atol=0)
    # 16-bit scales (imported checkpoints) are read exactly
    half = scales.half()
    got = dequantize_int4(packed, half, zeros, group_size=64)
    want = (ref.unpack(packed).float() - zeros.float().repeat_interleave(64, 0).t()) \
        * half.float().repeat_interleave(64, 0).t()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- the reference against float64 ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", ["g128 zero-point bias", "per-channel symmetric",
                                  "g32 act-order"])
def test_reference_matches_float64(dtype, case):
    group_size, symmetric, act = {"g128 zero-point bias": (128, False, False),
                                  "per-channel symmetric": (-1, True, False),
                                  "g32 act-order": (32, False, True)}[case]
    n, k, m = 80, 512, 9
    _, packed, scales, zeros, g_idx = _weights(5, n, k, group_size, symmetric, act)
    x = _x(6, m, k, dtype)
    bias = torch.randn(n).to(dtype) if "bias" in case else None
    out = int4_gemm(x, packed, scales, zeros, group_size=group_size, g_idx=g_idx, bias=bias,
                    backend="reference")
    assert out.dtype == dtype and out.shape == (m, n)
    w64 = dequantize_int4(packed, scales, zeros, group_size=group_size, g_idx=g_idx,
                          dtype=dtype).double()
    want = x.double() @ w64.t() + (bias.double() if bias is not None else 0)
    reason = compare("out", out, want, REF_TOLERANCE[dtype])
    assert reason is None, reason


# ---- kernels against the reference ----------------------------------------------------------


def _kernel_backends(dtype: torch.dtype, device: str) -> list[str]:
    _, packed, scales, zeros, _ = _weights(0, 48, 64, 32, False, False, device)
    x = _x(0, 3, 64, dtype, device)
    call = Call(x, packed, scales, zeros, None, None, 32, x.new_empty(3, 48))
    return [b.name for b in SPEC.backends
            if b.name != "reference" and not SPEC.reasons(b, problem_of(call))]


DEVICE_CASES = [("cpu", torch.bfloat16), ("cpu", torch.float16)] + (
    [("cuda", torch.bfloat16), ("cuda", torch.float16)] if torch.cuda.is_available() else [])
KERNEL_CASES = [(d, t, b) for d, t in DEVICE_CASES for b in _kernel_backends(t, d)]


def _shape_cases() -> list[tuple]:
    """(M, N, K, group_size, symmetric, act_order, bias): every group size with both schemes,
    M cycling through 1, 3, 17, 129 and N through 48, 80; act-order and bias cases; a
    per-channel K (264) that is no multiple of any K step (a masked tail step)."""
    cases = []
    ms, ns = itertools.cycle([1, 3, 17, 129]), itertools.cycle([48, 80])
    for group_size, symmetric in itertools.product(GROUP_SIZES, [False, True]):
        cases.append((next(ms), next(ns), 256, group_size, symmetric, False, False))
    cases += [(17, 80, 256, 32, False, True, False), (3, 48, 512, 128, True, True, True),
              (129, 48, 256, 64, False, False, True), (1, 80, 256, 256, True, False, True),
              (5, 48, 264, -1, False, False, True)]
    return cases


def _case_id(case: tuple) -> str:
    m, n, k, group_size, symmetric, act, bias = case
    return (f"M{m}-N{n}-K{k}-g{group_size}-{'sym' if symmetric else 'zp'}"
            f"{'-act' if act else ''}{'-bias' if bias else ''}")


def _check(out, want, dtype):
    reason = compare("out", out, want, TOLERANCE[dtype])
    assert reason is None, reason


@pytest.mark.parametrize(("device", "dtype", "backend"), KERNEL_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("case", _shape_cases(), ids=_case_id)
def test_kernel_matches_reference(device, dtype, backend, case):
    m, n, k, group_size, symmetric, act, with_bias = case
    _, packed, scales, zeros, g_idx = _weights(m + n + k, n, k, group_size, symmetric, act,
                                               device)
    x = _x(m, m, k, dtype, device)
    bias = torch.randn(n).to(device, dtype) if with_bias else None
    kw = dict(group_size=group_size, g_idx=g_idx, bias=bias)
    out = int4_gemm(x, packed, scales, zeros, backend=backend, **kw)
    want = int4_gemm(x, packed, scales, zeros, backend="reference", **kw)
    assert out.dtype == dtype and out.shape == (m, n)
    _check(out, want, dtype)


def _poisoned(t: torch.Tensor, extra_cols: int) -> torch.Tensor:
    """``t`` as the left columns of a wider buffer whose other columns are NaN (or, for an
    integer tensor, the largest value): a kernel reading past N or K shows in the result."""
    fill = float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max
    wide = torch.full((t.shape[0], t.shape[1] + extra_cols), fill, dtype=t.dtype,
                      device=t.device)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


@pytest.mark.parametrize(("device", "dtype", "backend"), KERNEL_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_kernel_reads_strided_inputs_and_nothing_past_them(device, dtype, backend, layout):
    m, n, k, group_size = 17, 80, 256, 64
    _, packed, scales, zeros, _ = _weights(21, n, k, group_size, False, False, device)
    x = _x(22, m, k, dtype, device)
    if layout == "transposed":
        x_view = x.t().contiguous().t()  # column-major (M, K)
    else:
        x_view = _poisoned(x, 24)[:, :]  # row stride K + 24, NaN beyond K
    assert not x_view.is_contiguous()
    args = (_poisoned(packed, 8), _poisoned(scales, 8), _poisoned(zeros, 8))
    out = int4_gemm(x_view, *args, group_size=group_size, backend=backend)
    want = int4_gemm(x, packed, scales, zeros, group_size=group_size, backend="reference")
    assert not out.isnan().any()
    _check(out, want, dtype)


@pytest.mark.parametrize(("device", "dtype", "backend"), KERNEL_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
def test_kernel_takes_batched_x_and_16_bit_scales(device, dtype, backend):
    n, k, group_size = 48, 256, 128
    _, packed, scales, zeros, _ = _weights(31, n, k, group_size, False, False, device)
    x = _x(32, 6, k, dtype, device).reshape(2, 3, k)
    for s in (scales.to(dtype), scales):
        out = int4_gemm(x, packed, s, zeros, group_size=group_size, backend=backend)
        want = int4_gemm(x, packed, s, zeros, group_size=group_size, backend="reference")
        assert out.shape == (2, 3, n)
        _check(out, want, dtype)


@pytest.mark.parametrize("split", [2, 3, 5])
@pytest.mark.parametrize("act_order", [False, True], ids=["contiguous", "act-order"])
def test_triton_split_k_matches_reference(split, act_order):
    """The decode path (split-K: float32 partial sums, summed, bias, one rounding), forced
    through its config; on the CPU the default never splits (no SM count)."""
    dtype = torch.bfloat16
    reasons = SPEC.reasons("triton", _small_problem(dtype))
    if reasons:
        pytest.skip("triton cannot run on the cpu here: " + "; ".join(reasons))
    m, n, k, group_size = 3, 80, 512, 64
    _, packed, scales, zeros, g_idx = _weights(41, n, k, group_size, False, act_order)
    x = _x(42, m, k, dtype)
    bias = torch.randn(n).to(dtype)
    call = Call(x, packed, scales, zeros, g_idx, bias, group_size,
                torch.full((m, n), float("nan"), dtype=dtype))
    SPEC.backend("triton").run(call, {"SPLIT_K": split, "BLOCK_K": 32})
    want = int4_gemm(x, packed, scales, zeros, group_size=group_size, g_idx=g_idx, bias=bias,
                     backend="reference")
    _check(call.out, want, dtype)


@pytest.mark.parametrize("case", [
    (3, 80, 256, 32, False, False, "x"), (17, 48, 512, 128, True, True, "fp32"),
    (5, 80, 264, -1, False, False, "fp32"), (2, 48, 256, 256, True, False, None),
    (4, 80, 256, 64, False, True, None),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_dequantize_then_gemm_matches_reference(case, dtype):
    """The config that dequantises the weight once and multiplies with torch's GEMM (the
    default from DEQUANT_MIN_M rows), forced here on small problems: against the reference with
    every group size, both schemes, act-order, a bias of x's dtype and a float32 one, reading
    strided inputs and nothing past them; and a one-hot x gives the dequantised weight bit for
    bit (the kernel's rounding is the reference's)."""
    reasons = SPEC.reasons("triton", _small_problem(dtype))
    if reasons:
        pytest.skip("triton cannot run on the cpu here: " + "; ".join(reasons))
    from kpt.ops.int4_gemm import _triton

    m, n, k, group_size, symmetric, act, bias_kind = case
    _, packed, scales, zeros, g_idx = _weights(61 + m, n, k, group_size, symmetric, act)
    x = _x(62, m, k, dtype)
    bias = {None: None, "x": torch.randn(n).to(dtype), "fp32": torch.randn(n)}[bias_kind]
    strided = [_poisoned(t, 8) if t is not None else None for t in (packed, scales, zeros)]
    call = Call(_poisoned(x, 16), *strided, g_idx, bias, group_size,
                torch.full((m, n), float("nan"), dtype=dtype))
    SPEC.backend("triton").run(call, dict(_triton.DEQUANT_CONFIG))
    want = int4_gemm(x, packed, scales, zeros, group_size=group_size, g_idx=g_idx, bias=bias,
                     backend="reference")
    _check(call.out, want, dtype)
    eye = torch.eye(k, dtype=dtype)[torch.randperm(k, generator=torch.Generator().manual_seed(m))]
    one_hot = Call(eye, packed, scales, zeros, g_idx, None, group_size,
                   torch.empty(k, n, dtype=dtype))
    SPEC.backend("triton").run(one_hot, dict(_triton.DEQUANT_CONFIG))
    w = dequantize_int4(packed, scales, zeros, group_size=group_size, g_idx=g_idx, dtype=dtype)
    assert torch.equal(one_hot.out.view(torch.int16), (eye @ w.t()).view(torch.int16))


def test_triton_dequantize_past_the_grid_limit_runs_the_fused_kernel(monkeypatch):
    """Columns past CUDA's grid limit (lowered here to 1 tile) take the fused kernel, not a
    failed launch; the result is the reference's either way."""
    reasons = SPEC.reasons("triton", _small_problem(torch.bfloat16))
    if reasons:
        pytest.skip("triton cannot run on the cpu here: " + "; ".join(reasons))
    from kpt.ops.int4_gemm import _triton

    monkeypatch.setattr(_triton, "MAX_GRID_Y", 1)
    ran = []
    monkeypatch.setattr(_triton, "_dequant_kernel", _Recorder(_triton._dequant_kernel, ran))
    _, packed, scales, zeros, _ = _weights(71, 200, 256, 64, False, False)  # 2 column tiles
    x = _x(72, 3, 256, torch.bfloat16)
    call = Call(x, packed, scales, zeros, None, None, 64,
                torch.full((3, 200), float("nan"), dtype=torch.bfloat16))
    _triton.run(call, dict(_triton.DEQUANT_CONFIG))
    assert not ran
    _check(call.out, int4_gemm(x, packed, scales, zeros, group_size=64, backend="reference"),
           torch.bfloat16)


class _Recorder:
    """A Triton kernel whose launches are recorded (``kernel[grid](...)``)."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


def test_triton_configs_lead_with_dequantize_from_its_threshold():
    from kpt.ops.int4_gemm import _triton

    def first_and_all(m: int):
        got = _triton.configs(m, 4096, 4096, 128, False, 132)
        return got[0], got

    for m in (1, 16, 63):
        assert _triton.DEQUANT_CONFIG not in first_and_all(m)[1]
    for m in (_triton.DEQUANT_TUNE_M, _triton.DEQUANT_MIN_M - 1):
        assert first_and_all(m)[1][-1] == _triton.DEQUANT_CONFIG != first_and_all(m)[0]
    for m in (_triton.DEQUANT_MIN_M, 4096):
        assert first_and_all(m)[0] == _triton.DEQUANT_CONFIG
    with pytest.raises(ValueError, match="DEQUANT config takes no other keys"):
        _triton.run(Call(torch.randn(300, 64).bfloat16(), *_weights(0, 48, 64, 32, False,
                                                                     False)[1:4], None, None,
                         32, torch.empty(300, 48, dtype=torch.bfloat16)),
                    {"DEQUANT": True, "BLOCK_M": 64})


def _small_problem(dtype: torch.dtype):
    _, packed, scales, zeros, _ = _weights(0, 48, 64, 32, False, False)
    x = _x(0, 3, 64, dtype)
    return problem_of(Call(x, packed, scales, zeros, None, None, 32, x.new_empty(3, 48)))


def test_empty_batch_gives_an_empty_output():
    _, packed, scales, zeros, _ = _weights(51, 48, 64, 32, True, False)
    out = int4_gemm(torch.randn(0, 64, dtype=torch.bfloat16), packed, scales, zeros,
                    group_size=32)
    assert out.shape == (0, 48) and out.dtype == torch.bfloat16


def test_cpu_dispatch_picks_the_reference():
    problem = _small_problem(torch.bfloat16)
    assert SPEC.choose(problem)[0].name == "reference"


# ---- bad input ------------------------------------------------------------------------------


def _good() -> dict:
    _, packed, scales, zeros, _ = _weights(61, 48, 128, 64, False, False)
    return dict(x=torch.randn(3, 128, dtype=torch.bfloat16), packed=packed, scales=scales,
                zeros=zeros, group_size=64)


BAD = {
    "x int": (dict(x=torch.ones(3, 128, dtype=torch.int32)), TypeError, "x must be one of"),
    "x scalar": (dict(x=torch.tensor(1.0)), ValueError, "scalar"),
    "K not a multiple of the group": (dict(x=torch.randn(3, 96),
                                           packed=torch.zeros(12, 48, dtype=torch.int32)),
                                      ValueError, "K=96 is not a multiple of group_size=64"),
    "group size 48": (dict(group_size=48), ValueError, "group_size must be one of"),
    "group size bool": (dict(group_size=True), ValueError, "group_size must be one of"),
    "packed shape": (dict(packed=torch.zeros(8, 48, dtype=torch.int32)), ValueError,
                     r"packed must be \(K // 8, N\)"),
    "packed dtype": (dict(packed=torch.zeros(16, 48, dtype=torch.int64)), TypeError,
                     "packed must be one of"),
    "packed 1-D": (dict(packed=torch.zeros(16, dtype=torch.int32)), ValueError,
                   "packed must have 2 dims"),
    "scales shape": (dict(scales=torch.ones(3, 48)), ValueError, "scales must be"),
    "scales dtype": (dict(scales=torch.ones(2, 48, dtype=torch.float64)), TypeError,
                     "scales must be one of"),
    "zeros dtype": (dict(zeros=torch.zeros(2, 48, dtype=torch.int32)), TypeError,
                    "zeros must be one of"),
    "zeros shape": (dict(zeros=torch.zeros(2, 40, dtype=torch.uint8)), ValueError,
                    "zeros must be"),
    "zeros past 15": (dict(zeros=torch.full((2, 48), 16, dtype=torch.uint8)), ValueError,
                      "0..15"),
    "g_idx length": (dict(g_idx=torch.zeros(64, dtype=torch.int32)), ValueError,
                     "g_idx must have K=128"),
    "g_idx range": (dict(g_idx=torch.full((128,), 2, dtype=torch.int32)), ValueError,
                    r"groups in 0..1"),
    "g_idx dtype": (dict(g_idx=torch.zeros(128, dtype=torch.int64)), TypeError, "g_idx"),
    "bias length": (dict(bias=torch.zeros(40, dtype=torch.bfloat16)), ValueError,
                    "bias must have N=48"),
    "bias dtype": (dict(bias=torch.zeros(48, dtype=torch.float16)), TypeError, "bias"),
    "unknown backend": (dict(backend="cutlass"), ValueError, "unknown backend"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_rejected_before_launch(name, monkeypatch):
    override, error, text = BAD[name]
    args = _good() | override
    x, packed, scales, zeros = (args.pop(n) for n in ("x", "packed", "scales", "zeros"))
    assert_rejected_before_launch(monkeypatch, SPEC, "int4_gemm", error, text,
                                  lambda: int4_gemm(x, packed, scales, zeros, **args))


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    (dict(w=torch.randn(4, 96), group_size=64), ValueError, "K=96 is not a multiple"),
    (dict(w=torch.randn(4, 20), group_size=-1), ValueError, "multiple of 8"),
    (dict(w=torch.randn(4, 64), group_size=16), ValueError, "group_size must be one of"),
    (dict(w=torch.randn(4, 64, dtype=torch.float64)), TypeError, "w must be one of"),
    (dict(w=torch.full((4, 64), float("inf")), group_size=32), ValueError, "finite"),
    (dict(w=torch.randn(4, 64), group_size=32, symmetric=1), TypeError, "bool"),
    (dict(w=torch.randn(4, 64), group_size=32, g_idx=torch.full((64,), 2, dtype=torch.int32)),
     ValueError, "g_idx"),
])
def test_pack_rejects_bad_input(kwargs, error, text):
    with pytest.raises(error, match=text) as info:
        pack_int4(**kwargs)
    assert "pack_int4" in str(info.value)


def test_dequantize_rejects_bad_input():
    args = _good()
    with pytest.raises(ValueError, match="dequantize_int4: scales must be"):
        dequantize_int4(args["packed"], args["scales"], args["zeros"], group_size=32)


# ---- torch.compile --------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    _, packed, scales, zeros, g_idx = _weights(71, 48, 128, 32, False, True)
    bias = torch.randn(48, dtype=torch.bfloat16)

    def step(x):
        return int4_gemm(x * 2, packed, scales, zeros, group_size=32, g_idx=g_idx,
                         bias=bias) + 1

    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), step(x), rtol=0, atol=0)


@pytest.mark.parametrize(("device", "dtype", "backend"), KERNEL_CASES + [
    (d, t, "reference") for d, t in DEVICE_CASES[:1]], ids=lambda v: str(v).removeprefix("torch."))
def test_g_idx_content_never_reads_outside_the_scales(device, dtype, backend, monkeypatch):
    """g_idx is read on the host only on the CPU or under KPT_CHECK=1. Without that check (as
    on a GPU), out-of-range groups are clamped into 0..G-1 by every backend: the result is the
    one of the clamped g_idx, and nothing is read past the scales (no fault, no NaN)."""
    module = sys.modules["kpt.ops.int4_gemm"]
    monkeypatch.setattr(module, "read_content", lambda t: False)
    n, k, group_size = 48, 256, 64
    _, packed, scales, zeros, g_idx = _weights(51, n, k, group_size, False, True, device)
    bad = g_idx.clone()
    bad[::7] = 10**6
    bad[3::11] = -5
    x = _x(52, 5, k, dtype, device)
    got = int4_gemm(x, packed, scales, zeros, group_size=group_size, g_idx=bad, backend=backend)
    clamped = bad.clamp(0, scales.shape[0] - 1)
    want = int4_gemm(x, packed, scales, zeros, group_size=group_size, g_idx=clamped,
                     backend="reference")
    assert not got.isnan().any()
    _check(got, want, dtype)
