"""fp8_gemm / quantize_fp8: the quantiser's round-trip bound, zero / tiny / non-finite blocks; the
reference against float64 for every pair of granularities; the Triton kernel against the
reference on odd M and N, K multiples of 16 that are not powers of two, e4m3 and e5m2, bias and
every output dtype; NaN-poisoned strided views and transposed operands; bad input; dispatch
reasons; torch.compile."""

from __future__ import annotations

import itertools

import pytest
import torch

from kpt.ops import fp8_gemm, quantize_fp8
from kpt.ops._common import compare
from kpt.ops.fp8_gemm import A_BLOCK, FP8, SPEC, W_BLOCK, Call, problem_of
from kpt.ops.fp8_gemm import _triton as fp8_triton
from kpt.ops.fp8_gemm.reference import expand_scale
from tests.ops.rejects import assert_rejected_before_launch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_IDS = {E4M3: "e4m3", E5M2: "e5m2"}
# (mantissa bits, log2 of the subnormal spacing) of each fp8 format: the round-trip bound.
FORMAT = {E4M3: (3, 9), E5M2: (2, 16)}
GRAN_PAIRS = list(itertools.product(("tensor", "row", "block"), repeat=2))
GRAN_IDS = [f"{a}x{w}" for a, w in GRAN_PAIRS]
# A kernel and the reference sum the same exact fp8 products (their float32 products are exact)
# in another order and apply the scales at another point: float32 rounding only, measured
# ~1e-7 norm-wise at K = 144; 1e-5 leaves two decades. Rounded outputs may then differ by one
# unit in the last place where the float32 values straddle a rounding boundary: norm-wise far
# below one unit, so the bound is one unit (bf16 2^-8, fp16 2^-11).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}
# Where the kernel tests run: the GPU when there is one (the Triton backend serves CUDA
# tensors), else the CPU under the interpreter (tests/conftest.py sets TRITON_INTERPRET).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
    # fp8 tensor cores (Ada, Hopper) keep ~14 mantissa bits in their accumulator (DeepSeek-V3
    # report, section 3.3.2), not float32's 24: a 128-K block's sum carries ~2^-14 relative
    # error before the kernels promote it to float32, so float32 outputs agree to ~2^-13
    # norm-wise, and 2^-12 leaves a factor of two. Rounded outputs keep their one unit.
    TOLERANCE[torch.float32] = 2**-12


def _operands(seed: int, m: int, n: int, k: int, a_gran: str, w_gran: str,
              dtype: torch.dtype = E4M3, device: str = "cpu"):
    """Quantised random activations (rows of different magnitudes) and weight."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))
    w = torch.randn(n, k, generator=gen) * 0.05
    a8, sa = quantize_fp8(a, a_gran, dtype)
    w8, sw = quantize_fp8(w, w_gran, dtype, block=W_BLOCK if w_gran == "block" else None)
    bias = torch.randn(n, generator=gen)
    return tuple(t.to(device) for t in (a8, w8, sa, sw, bias))


def _dequant64(x8: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    full = scale.double()
    if scale.numel() != 1 and scale.shape != (x8.shape[0], 1):
        full = expand_scale(full, tuple(x8.shape), block)
    return x8.double() * full


def _gemm64(a8, w8, sa, sw, bias):
    y = _dequant64(a8, sa, A_BLOCK) @ _dequant64(w8, sw, W_BLOCK).T
    return y if bias is None else y + bias.double()


def _check(out, want, dtype):
    reason = compare("out", out, want, TOLERANCE[dtype])
    assert reason is None, reason


# ---- quantize_fp8 ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=FP8_IDS.get)
@pytest.mark.parametrize("granularity,block", [("tensor", None), ("row", None),
                                               ("block", A_BLOCK), ("block", W_BLOCK),
                                               ("block", (3, 40))])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda t: str(t).removeprefix("torch."))
def test_quantize_round_trip_is_within_half_an_fp8_unit(dtype, granularity, block, in_dtype):
    gen = torch.Generator().manual_seed(3)
    # Magnitudes spread over ~6 decades: some elements land in the fp8 subnormal range.
    x = (torch.randn(131, 272, generator=gen) * torch.exp(2 * torch.randn(131, 272,
                                                                          generator=gen)))
    x = x.to(in_dtype)
    x8, scale = quantize_fp8(x, granularity, dtype, block=block if granularity == "block"
                             else None)
    assert x8.dtype == dtype and x8.shape == x.shape and scale.dtype == torch.float32
    want_shape = {"tensor": (), "row": (131, 1)}.get(granularity)
    if granularity == "block":
        want_shape = (-(-131 // block[0]), -(-272 // block[1]))
    assert tuple(scale.shape) == want_shape
    full = expand_scale(scale, (131, 272), block) if granularity == "block" else scale
    xd, back = x.double(), x8.double() * full.double()
    mant, sub = FORMAT[dtype]
    # The bound of the docstring, times 1 + 2^-20 for the float32 division's rounding.
    bound = (2.0 ** -(mant + 1) * xd.abs() + 2.0 ** -(sub + 1) * full.double()) * (1 + 2**-20)
    assert ((xd - back).abs() <= bound).all()
    # Each block's largest element maps to (saturates at) the format's maximum, or one unit
    # below it where the division rounded down.
    fmax = torch.finfo(dtype).max
    peak = x8.float().abs()
    if granularity == "row":
        peak = peak.amax(dim=1)
    elif granularity == "tensor":
        peak = peak.amax()
    else:
        rows, cols = block
        padded = torch.nn.functional.pad(peak, (0, -272 % cols, 0, -131 % rows))
        peak = padded.reshape(padded.shape[0] // rows, rows, -1, cols).amax(dim=(1, 3))
    assert (peak <= fmax).all() and (peak >= fmax * (1 - 2.0 ** -mant)).all()


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=FP8_IDS.get)
def test_quantize_zero_and_tiny_blocks(dtype):
    x = torch.randn(4, 256)
    x[1] = 0.0
    x[2] = 1e-40  # float32 subnormal: amax / fp8 max underflows, the scale floors at 2^-126
    x8, scale = quantize_fp8(x, "row", dtype)
    assert scale[1].item() == 1.0 and (x8[1].float() == 0).all()
    assert scale[2].item() == 2.0**-126
    assert torch.isfinite(x8.float()).all() and (x8[2].float() != 0).all()
    # 1e-40 / 2^-126 = 0.0085: an e4m3 subnormal, an e5m2 normal; the docstring's bound.
    mant, sub = FORMAT[dtype]
    x2 = x[2].double()
    assert ((x8[2].double() * 2.0**-126 - x2).abs()
            <= 2.0 ** -(mant + 1) * x2.abs() + 2.0 ** -(sub + 1) * 2.0**-126).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_propagates_to_its_blocks_only(backend, bad):
    device = DEVICE if backend == "triton" else "cpu"
    if backend not in KERNELS + ["reference"]:
        pytest.skip("triton cannot run here: " + "; ".join(_triton_reasons()))
    _, w8, _, sw, _ = _operands(5, 5, 32, 144, "row", "block", device=device)
    a = torch.randn(5, 144, device=device)
    a[2, 130] = bad
    a8, sa = quantize_fp8(a, "block")
    # Row 2's second 1x128 block, and nothing else, is NaN.
    assert torch.isnan(sa[2, 1]) and torch.isfinite(sa[2, 0])
    assert torch.isfinite(sa[[0, 1, 3, 4]]).all()
    assert torch.isnan(a8[2, 128:].float()).all() and not torch.isnan(a8[2, :128].float()).any()
    y = fp8_gemm(a8, w8, sa, sw, backend=backend)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4]]).all()


BAD_QUANTIZE = {
    "int input": (dict(x=torch.ones(4, 4, dtype=torch.int32)), TypeError, "x must be one of"),
    "bad dtype": (dict(dtype=torch.float16), TypeError, "float8_e4m3fn or float8_e5m2"),
    "granularity": (dict(granularity="channel"), ValueError, "granularity"),
    "block with row": (dict(granularity="row", block=(1, 128)), ValueError, "block is for"),
    "block shape": (dict(granularity="block", block=(0, 128)), ValueError, "positive ints"),
    "block 3-D": (dict(x=torch.randn(2, 3, 4), granularity="block"), ValueError, "2-D"),
    "empty tensor": (dict(x=torch.randn(0, 4)), ValueError, "empty"),
    "empty rows": (dict(x=torch.randn(4, 0), granularity="row"), ValueError, "at least one"),
}


@pytest.mark.parametrize("name", list(BAD_QUANTIZE))
def test_quantize_rejects_bad_input(name):
    override, error, text = BAD_QUANTIZE[name]
    args = dict(x=torch.randn(4, 32), granularity="tensor") | override
    with pytest.raises(error, match=text) as info:
        quantize_fp8(args.pop("x"), args.pop("granularity"), **args)
    assert "quantize_fp8" in str(info.value)


# ---- fp8_gemm: reference ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=FP8_IDS.get)
@pytest.mark.parametrize("a_gran,w_gran", GRAN_PAIRS, ids=GRAN_IDS)
def test_reference_matches_float64(dtype, a_gran, w_gran):
    a8, w8, sa, sw, bias = _operands(7, 17, 144, 272, a_gran, w_gran, dtype)
    want = _gemm64(a8, w8, sa, sw, bias)
    out = fp8_gemm(a8, w8, sa, sw, bias=bias, out_dtype=torch.float32, backend="reference")
    # float32 products of the dequantised values and a K = 272 float32 sum: ~1e-7 norm-wise.
    assert compare("out", out, want, 1e-6) is None, compare("out", out, want, 1e-6)
    for out_dtype in (torch.bfloat16, torch.float16):
        got = fp8_gemm(a8, w8, sa, sw, bias=bias, out_dtype=out_dtype, backend="reference")
        assert got.dtype == out_dtype
        # One rounding of the float32 result: half a unit, below the one-unit bound.
        _check(got, want, out_dtype)


def test_reference_is_close_to_the_unquantised_product():
    """The quantisation itself: e4m3 per-row / per-channel gives ~2^-5 relative error."""
    gen = torch.Generator().manual_seed(9)
    a, w = torch.randn(33, 256, generator=gen), torch.randn(64, 256, generator=gen)
    a8, sa = quantize_fp8(a, "row")
    w8, sw = quantize_fp8(w, "row")
    out = fp8_gemm(a8, w8, sa, sw, out_dtype=torch.float32, backend="reference")
    # e4m3 rounds each operand by <= 2^-4 relative (random: ~2^-6 rms); a product of two
    # and the sum's averaging keep the result within 2^-4 norm-wise.
    assert compare("out", out, a @ w.T, 2**-4) is None


# ---- fp8_gemm: the Triton kernel against the reference ---------------------------------------


def _kernel_backends() -> list[str]:
    a8, w8, sa, sw, _ = _operands(0, 3, 16, 16, "tensor", "tensor", device=DEVICE)
    call = Call(a8, w8, sa.reshape(1, 1), sw.reshape(1, 1), "tensor", "tensor", None,
                torch.empty(3, 16, device=DEVICE))
    return [b.name for b in SPEC.backends
            if b.name != "reference" and not SPEC.reasons(b, problem_of(call))]


KERNELS = _kernel_backends()
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
M_SIZES = [1, 3, 17, 129]
NK_SIZES = [(48, 144), (144, 48)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=FP8_IDS.get)
@pytest.mark.parametrize("a_gran,w_gran", GRAN_PAIRS, ids=GRAN_IDS)
@pytest.mark.parametrize("m", M_SIZES)
def test_kernel_matches_reference(backend, dtype, a_gran, w_gran, m):
    # N, K, out dtype and bias vary with the case (every value of each is covered).
    index = M_SIZES.index(m) + GRAN_PAIRS.index((a_gran, w_gran))
    n, k = NK_SIZES[index % 2]
    out_dtype = OUT_DTYPES[index % 3]
    a8, w8, sa, sw, bias = _operands(m + index, m, n, k, a_gran, w_gran, dtype, DEVICE)
    bias = bias.to(out_dtype) if index % 2 else None
    got = fp8_gemm(a8, w8, sa, sw, bias=bias, out_dtype=out_dtype, backend=backend)
    want = fp8_gemm(a8, w8, sa, sw, bias=bias, out_dtype=out_dtype, backend="reference")
    assert got.shape == (m, n) and got.dtype == out_dtype
    _check(got, want.float(), out_dtype)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16],
                         ids=lambda t: "no-bias" if t is None else str(t).removeprefix("torch."))
def test_kernel_bias_and_out_dtypes(backend, out_dtype, bias_dtype):
    a8, w8, sa, sw, bias = _operands(21, 17, 48, 144, "block", "block", device=DEVICE)
    bias = None if bias_dtype is None else bias.to(bias_dtype)
    got = fp8_gemm(a8, w8, sa, sw, bias=bias, out_dtype=out_dtype, backend=backend)
    want = fp8_gemm(a8, w8, sa, sw, bias=bias, out_dtype=out_dtype, backend="reference")
    _check(got, want.float(), out_dtype)


@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=32),  # an N tile across two 128-row w scale blocks
    dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32),  # four K tiles per scale block
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=2),  # K tile > 128: per tensor/row only
], ids=["wide-n", "short-k", "long-k"])
@pytest.mark.parametrize("a_gran,w_gran", [("block", "block"), ("row", "tensor")],
                         ids=["blockxblock", "rowxtensor"])
def test_kernel_tile_configs(config, a_gran, w_gran):
    if "triton" not in KERNELS:
        pytest.skip("triton cannot run here: " + "; ".join(_triton_reasons()))
    a8, w8, sa, sw, bias = _operands(31, 37, 144, 272, a_gran, w_gran, device=DEVICE)
    sa2, sw2 = (s.reshape(1, 1) if s.numel() == 1 else s for s in (sa, sw))
    out = torch.full((37, 144), float("nan"), device=DEVICE)
    call = Call(a8, w8, sa2, sw2, a_gran, w_gran, bias, out)
    want = fp8_gemm(a8, w8, sa, sw, bias=bias, out_dtype=torch.float32, backend="reference")
    if config["BLOCK_K"] > 128 and "block" in (a_gran, w_gran):
        with pytest.raises(ValueError, match="must divide 128"):
            fp8_triton.run(call, config)
        return
    fp8_triton.run(call, config)
    _check(out, want, torch.float32)


def test_kernel_tile_config_below_the_fp8_dot_minimum_is_refused():
    """K tiles under 32 compile in the interpreter but not for an NVIDIA GPU (Triton's fp8
    tl.dot needs K >= 32): refused by name on every device, before any launch."""
    if "triton" not in KERNELS:
        pytest.skip("triton cannot run here: " + "; ".join(_triton_reasons()))
    a8, w8, sa, sw, bias = _operands(31, 37, 144, 272, "row", "tensor", device=DEVICE)
    out = torch.full((37, 144), float("nan"), device=DEVICE)
    call = Call(a8, w8, sa, sw.reshape(1, 1), "row", "tensor", bias, out)
    with pytest.raises(ValueError, match="BLOCK_K=16 is below 32"):
        fp8_triton.run(call, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16))
    assert out.isnan().all()


def _triton_reasons() -> list[str]:
    a8, w8, sa, sw, _ = _operands(0, 3, 16, 16, "tensor", "tensor", device=DEVICE)
    call = Call(a8, w8, sa.reshape(1, 1), sw.reshape(1, 1), "tensor", "tensor", None,
                torch.empty(3, 16, device=DEVICE))
    return SPEC.reasons("triton", problem_of(call))


def _poisoned_view(x: torch.Tensor, pad: int) -> torch.Tensor:
    """``x`` as a strided view inside a NaN-filled buffer (NaN in x's dtype, fp8 included)."""
    buf = torch.full((x.shape[0] + 2 * pad, x.shape[1] + 3 * pad), float("nan"),
                     device=x.device).to(x.dtype)
    view = buf[pad:pad + x.shape[0], 2 * pad:2 * pad + x.shape[1]]
    view.copy_(x)
    return view


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
@pytest.mark.parametrize("a_gran,w_gran", [("tensor", "tensor"), ("row", "row"),
                                           ("block", "block")],
                         ids=["tensorxtensor", "rowxrow", "blockxblock"])
def test_strided_views_in_nan_buffers(backend, a_gran, w_gran):
    """Operands and scales as views into NaN-filled buffers: nothing outside them is read."""
    a8, w8, sa, sw, bias = _operands(41, 17, 48, 144, a_gran, w_gran, device=DEVICE)
    want = fp8_gemm(a8, w8, sa, sw, bias=bias, backend=backend)
    views = [_poisoned_view(a8, 16), _poisoned_view(w8, 16)]
    for s in (sa, sw):
        views.append(s if s.dim() == 0 else _poisoned_view(s, 1))
    bias_view = torch.full((3 * 48,), float("nan"), device=DEVICE)[::3]
    bias_view.copy_(bias)
    assert not any(v.is_contiguous() for v in views[:2])
    got = fp8_gemm(*views, bias=bias_view, backend=backend)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same values, read in place


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_transposed_operands_are_read_in_place(backend):
    """a8 = (K, M)-contiguous .T and w8 = (K, N)-contiguous .T: accepted as they are."""
    a8, w8, sa, sw, bias = _operands(43, 17, 48, 144, "row", "block", device=DEVICE)
    a_t, w_t = a8.T.contiguous().T, w8.T.contiguous().T
    assert a_t.stride() == (1, 17) and w_t.stride() == (1, 48)
    got = fp8_gemm(a_t, w_t, sa, sw, bias=bias, out_dtype=torch.float32, backend=backend)
    want = fp8_gemm(a8, w8, sa, sw, bias=bias, out_dtype=torch.float32, backend=backend)
    # The kernel computes the same sums in the same order; the reference's float32 GEMM may
    # take another BLAS path for other strides (float32 rounding, as in TOLERANCE).
    _check(got, want, torch.float32)


def test_empty_m_gives_an_empty_output():
    a8, w8, sa, sw, _ = _operands(0, 0, 32, 32, "row", "row", device=DEVICE)
    for backend in KERNELS + ["reference"]:
        assert fp8_gemm(a8, w8, sa, sw, backend=backend).shape == (0, 32)


# ---- bad input, dispatch, compile -----------------------------------------------------------


def _good() -> dict:
    a8, w8, sa, sw, bias = _operands(1, 5, 32, 64, "row", "row")
    return dict(a8=a8, w8=w8, a_scale=sa, w_scale=sw, bias=bias)


BAD = {
    "a not fp8": (dict(a8=torch.randn(5, 64)), TypeError, "a8 must be one of"),
    "a 3-D": (dict(a8=torch.zeros(1, 5, 64).to(E4M3)), ValueError, "a8 must have 2 dims"),
    "mixed fp8": (dict(w8=torch.zeros(32, 64).to(E5M2)), TypeError, "w8 must be one of"),
    "K differs": (dict(w8=torch.zeros(32, 48).to(E4M3)), ValueError, "differ in K"),
    "N not /16": (dict(w8=torch.zeros(40, 64).to(E4M3), w_scale=torch.ones(40, 1),
                       bias=None), ValueError, "N = 40 must be a positive multiple of 16"),
    "K not /16": (dict(a8=torch.zeros(5, 72).to(E4M3), w8=torch.zeros(32, 72).to(E4M3)),
                  ValueError, "K = 72 must be a positive multiple of 16"),
    "scale dtype": (dict(a_scale=torch.ones(5, 1, dtype=torch.float16)), TypeError,
                    "a_scale must be one of"),
    "scale shape": (dict(a_scale=torch.ones(5, 2)), ValueError,
                    r"a_scale of shape \(5, 2\) must be one element"),
    "w scale 1-D": (dict(w_scale=torch.ones(32)), ValueError,
                    r"w_scale of shape \(32,\) must be one element .* \(32, 1\) \(per row\)"),
    "bias shape": (dict(bias=torch.ones(16)), ValueError, "bias has 16 elements"),
    "bias dtype": (dict(bias=torch.ones(32, dtype=torch.float64)), TypeError, "bias must be"),
    "out dtype": (dict(out_dtype=torch.float8_e4m3fn), TypeError, "out_dtype"),
    "backend": (dict(backend="cutlass"), ValueError, "unknown backend 'cutlass'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_rejected_before_launch(name, monkeypatch):
    override, error, text = BAD[name]
    args = _good() | override
    a8, w8, a_scale, w_scale = (args.pop(n) for n in ("a8", "w8", "a_scale", "w_scale"))
    assert_rejected_before_launch(monkeypatch, SPEC, "fp8_gemm", error, text,
                                  lambda: fp8_gemm(a8, w8, a_scale, w_scale, **args))


def test_triton_reasons_name_the_arch(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    problem = SPEC.example(torch.device("cuda", 0), torch.bfloat16)
    reasons = SPEC.unsupported(SPEC.backend("triton"), problem)
    assert reasons == ["fp8 tl.dot needs sm_89 or newer (Ada, Hopper), device is sm_80"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert SPEC.unsupported(SPEC.backend("triton"), problem) == []


def test_cpu_dispatch_picks_the_reference():
    a8, w8, sa, sw, _ = _operands(2, 3, 16, 32, "tensor", "row")
    call = Call(a8, w8, sa.reshape(1, 1), sw, "tensor", "row", None, torch.empty(3, 16))
    assert SPEC.choose(problem_of(call))[0].name == "reference"


def test_torch_compile_fullgraph():
    """Quantisation and the GEMM in one compiled graph, through the kpt::fp8_gemm custom op."""
    a8, w8, _, sw, bias = _operands(12, 9, 48, 144, "block", "block", device=DEVICE)
    x = torch.randn(9, 144, device=DEVICE)
    backend = KERNELS[0] if KERNELS else "reference"

    def step(x):
        xq, xs = quantize_fp8(x, "block")
        return fp8_gemm(xq, w8, xs, sw, bias=bias, backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), step(x), rtol=0, atol=0)


def test_fp8_dtypes_are_both_served():
    assert FP8 == {E4M3, E5M2}
    for backend in SPEC.backends:
        assert backend.dtypes == FP8


# ---- the one-launch activation quantizer (kpt/ops/fp8_gemm/_quantize_triton.py) --------------


def _activations(seed: int, m: int, k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Rows of very different magnitudes with the cases a scale must survive: zeros, a zero
    row, a NaN, an inf, values at the fp8 range's ends."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-30, 30, m, base=2.0)[:, None]
    x[0, :5] = 0
    if m > 1:
        x[1] = 0
    if m > 2:
        x[2, 7] = float("nan")
    if m > 3:
        x[3, k // 2] = float("-inf")
    if m > 4:
        x[4, :3] = torch.tensor([1e-40, -3e38, 2.5e-7])
    return x.to(device, dtype)


@pytest.mark.parametrize("fp8", [E4M3, E5M2], ids=FP8_IDS.get)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("m", "k", "cols"), [(5, 300, None), (6, 4096, None), (1, 17, None),
                                              (5, 300, 128), (6, 1024, 128), (2, 100, 128)])
def test_fused_activation_quantizer_is_the_reference_bit_for_bit(fp8, dtype, m, k, cols):
    """Per-row scales (cols None) and 1 x 128 blocks, with strided input: codes and scales
    equal the reference's, NaN where it has NaN. On the CPU under the interpreter the final
    cast is torch's (the interpreter's float32 -> fp8 conversion does not round to nearest);
    on a GPU it is the kernel's cvt.rn."""
    if _triton_reasons():
        pytest.skip("triton cannot run here: " + "; ".join(_triton_reasons()))
    from kpt.ops.fp8_gemm import _quantize_triton, reference

    x = _activations(m * k, m, k + 3, dtype, DEVICE)[:, :k]  # rows k + 3 apart
    got8, got = _quantize_triton.quantize(x, fp8, cols)
    want8, want = reference.quantize(x, "row" if cols is None else "block", fp8,
                                     None if cols is None else (1, cols))
    assert torch.equal(got8.view(torch.uint8), want8.view(torch.uint8))
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.reshape(got.shape).nan_to_num())


def test_quantize_fp8_takes_the_fused_kernel_only_where_it_applies():
    """Activation granularities of CUDA tensors only; on a GPU the public function's result
    is the reference's bit for bit either way."""
    import importlib

    module = importlib.import_module("kpt.ops.fp8_gemm")
    assert not module._fused_quantize(torch.randn(4, 256), "row", None)  # a CPU tensor
    assert module._activation_granularity("row", None, 4096)
    assert module._activation_granularity("block", (1, 128), 4096)
    assert not module._activation_granularity("block", (128, 128), 4096)  # weights
    assert not module._activation_granularity("tensor", None, 4096)
    # Past the grid's second dimension: the reference's ops instead of a failed launch.
    limit = module.MAX_FUSED_GROUPS
    assert module._activation_granularity("block", (1, 16), 16 * limit)
    assert not module._activation_granularity("block", (1, 16), 16 * limit + 1)
    if DEVICE == "cuda":
        from kpt.ops.fp8_gemm import reference

        x = _activations(3, 6, 512, torch.bfloat16, "cuda").reshape(2, 3, 512)
        for gran, block in (("row", None), ("block", (1, 128)), ("block", (128, 128))):
            got8, got = quantize_fp8(x if gran == "row" else x.reshape(6, 512), gran,
                                     block=block)
            want8, want = reference.quantize(x if gran == "row" else x.reshape(6, 512), gran,
                                             E4M3, block)
            assert torch.equal(got8.view(torch.uint8), want8.view(torch.uint8)), gran
            assert got.shape == want.shape and torch.equal(got.nan_to_num(), want.nan_to_num())
