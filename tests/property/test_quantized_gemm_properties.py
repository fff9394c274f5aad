"""Properties of the quantised GEMMs on generated inputs (issue 27): ``fp8_gemm`` /
``quantize_fp8``, ``int4_gemm`` / ``pack_int4`` / ``dequantize_int4`` and ``kpt.quant``'s
round-to-nearest wrappers.

* valid calls (any M including 0, every scale granularity, both fp8 formats, group sizes and
  per channel, act-order, bias, operands as transposed, strided and stride-0 views): the
  reference equals float64 math of the same quantised operands, and every backend that can
  run the call (``SPEC.reasons``; Triton under the interpreter here) plus the default dispatch
  equal the reference;
* the quantisers' documented round-trip bounds;
* invalid arguments (types, shapes, dtypes, devices, group sizes, out-of-range zero points and
  act-order groups on the CPU): a ValueError / TypeError naming the op.
"""

from __future__ import annotations

import math

import torch
from hypothesis import event, given
from hypothesis import strategies as st

from kpt.ops import dequantize_int4, fp8_gemm, int4_gemm, pack_int4, quantize_fp8
from kpt.ops._common import compare
from kpt.ops.fp8_gemm import SPEC as FP8_SPEC
from kpt.ops.fp8_gemm import Call as Fp8Call
from kpt.ops.fp8_gemm import _validate as fp8_validate
from kpt.ops.fp8_gemm import problem_of as fp8_problem
from kpt.ops.int4_gemm import SPEC as INT4_SPEC
from kpt.ops.int4_gemm import Call as Int4Call
from kpt.ops.int4_gemm import problem_of as int4_problem
from kpt.quant import rtn_fp8, rtn_int4
from tests.property.strategies import (
    check_close,
    expect_named_error,
    named_error_or_result,
    props,
    random_tensor,
    seeds,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (mantissa bits, log2 of the subnormal spacing): quantize_fp8's documented round-trip bound.
FORMAT = {E4M3: (3, 9), E5M2: (2, 16)}
# A backend against the reference: the same exact fp8 (int4: rounded-weight) products summed
# in float32 in another order; the one output rounding may then land one unit apart where
# the float32 values straddle a boundary (bf16 2^-8, fp16 2^-11), norm-wise far less.
KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}
# The reference against float64 of the same operands: its one final rounding (half a unit)
# and float32 sums over K <= 288 (~1e-6 relative): one unit.
REFERENCE_TOLERANCE = KERNEL_TOLERANCE


def runnable(spec, problem) -> list[str]:
    names = [b.name for b in spec.backends if not spec.reasons(b, problem)]
    assert "reference" in names, "the reference must run every valid call"
    return names


# ---- fp8_gemm ---------------------------------------------------------------------------------


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """A scale broadcast to (rows, cols) float64, its granularity read off its shape."""
    s = scale.double()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(rows, cols)
    if tuple(s.shape) == (rows, 1):
        return s.expand(rows, cols)
    r = torch.arange(rows)[:, None] // block[0]
    c = torch.arange(cols)[None, :] // block[1]
    return s[r, c]


@st.composite
def fp8_calls(draw) -> dict:
    gen = torch.Generator().manual_seed(draw(seeds))
    m = draw(st.integers(0, 6))
    n = draw(st.sampled_from([16, 32, 48, 144]))
    k = draw(st.sampled_from([16, 48, 144, 272]))
    kind = draw(st.sampled_from([E4M3, E5M2]))
    grans = [draw(st.sampled_from(["tensor", "row", "block"])) for _ in range(2)]
    if m == 0 and grans[0] == "tensor":
        grans[0] = "row"  # an empty tensor has no per-tensor scale
    a = random_tensor(gen, (m, k), torch.float32, 2.0)
    w = random_tensor(gen, (n, k), torch.float32, 0.2)
    a8, sa = quantize_fp8(a, grans[0], kind, **({"block": (1, 128)} if grans[0] == "block"
                                                else {}))
    w8, sw = quantize_fp8(w, grans[1], kind, **({"block": (128, 128)} if grans[1] == "block"
                                                else {}))
    view = draw(st.sampled_from(["contiguous", "a_transposed", "w_rows_strided",
                                 "scales_expanded"]))
    if view == "a_transposed":
        a8 = a8.T.contiguous().T
    elif view == "w_rows_strided":
        big = torch.zeros(2 * n, k, dtype=kind)
        big[::2] = w8
        w8 = big[::2]
    elif view == "scales_expanded" and sa.dim() == 2 and sa.shape[0] > 0:
        sa = sa[:1].expand_as(sa)
    out = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    bias = random_tensor(gen, (n,), out) if draw(st.booleans()) else None
    return dict(a8=a8, w8=w8, a_scale=sa, w_scale=sw, out_dtype=out, bias=bias)


@props(40)
@given(fp8_calls())
def test_fp8_gemm_valid_calls_match_reference(args):
    a8, w8 = args["a8"], args["w8"]
    m, k = a8.shape
    n = w8.shape[0]
    want = (a8.double() * _expand(args["a_scale"], m, k, (1, 128))) @ \
        (w8.double() * _expand(args["w_scale"], n, k, (128, 128))).T
    if args["bias"] is not None:
        want = want + args["bias"].double()
    ref = fp8_gemm(**args, backend="reference")
    assert ref.shape == (m, n) and ref.dtype == args["out_dtype"]
    check_close(compare("reference", ref, want, REFERENCE_TOLERANCE[args["out_dtype"]]))
    gran_a, scale_a, gran_w, scale_w = fp8_validate(a8, w8, args["a_scale"], args["w_scale"],
                                                    args["out_dtype"], args["bias"])
    call = Fp8Call(a8, w8, scale_a, scale_w, gran_a, gran_w, args["bias"], ref)
    for backend in [*runnable(FP8_SPEC, fp8_problem(call)), None]:
        event(f"compared {backend}")
        got = fp8_gemm(**args, backend=backend)
        check_close(compare(f"{backend}", got, ref, KERNEL_TOLERANCE[args["out_dtype"]]))


def _fp8_base(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    a8, sa = quantize_fp8(random_tensor(gen, (5, 144), torch.float32), "row")
    w8, sw = quantize_fp8(random_tensor(gen, (32, 144), torch.float32), "row")
    return dict(a8=a8, w8=w8, a_scale=sa, w_scale=sw)


FP8_BAD = {
    "a8 float32": lambda a: dict(a, a8=a["a8"].float()),
    "w8 of the other format": lambda a: dict(a, w8=a["w8"].to(E5M2)),
    "a8 3-D": lambda a: dict(a, a8=a["a8"][None]),
    "K mismatch": lambda a: dict(a, w8=a["w8"][:, :128]),
    "N not a multiple of 16": lambda a: dict(a, w8=a["w8"][:24], w_scale=a["w_scale"][:24]),
    "a_scale float16": lambda a: dict(a, a_scale=a["a_scale"].half()),
    "a_scale of another shape": lambda a: dict(a, a_scale=torch.ones(5, 3)),
    "a_scale a float": lambda a: dict(a, a_scale=0.5),
    "w_scale 1-D": lambda a: dict(a, w_scale=a["w_scale"].flatten()),
    "scale on meta": lambda a: dict(a, a_scale=a["a_scale"].to("meta")),
    "out_dtype int32": lambda a: dict(a, out_dtype=torch.int32),
    "out_dtype a string": lambda a: dict(a, out_dtype="bfloat16"),
    "bias of N - 1": lambda a: dict(a, bias=torch.zeros(31, dtype=torch.bfloat16)),
    "bias int": lambda a: dict(a, bias=torch.zeros(32, dtype=torch.int32)),
    "backend unknown": lambda a: dict(a, backend="magic"),
    "backend cuda on the CPU": lambda a: dict(a, backend="cuda"),
}


@props(60)
@given(st.sampled_from(sorted(FP8_BAD)), seeds)
def test_fp8_gemm_rejects_bad_arguments(kind, seed):
    args = FP8_BAD[kind](_fp8_base(seed))
    expect_named_error(lambda: fp8_gemm(**args), "fp8_gemm", kind)


@props(60)
@given(seeds, st.sampled_from([E4M3, E5M2]), st.sampled_from(["tensor", "row", "block"]),
       st.integers(1, 7), st.integers(1, 300), st.sampled_from([(1, 128), (128, 128), (3, 5)]),
       st.floats(-30, 30), st.sampled_from(["contiguous", "transposed"]))
def test_quantize_fp8_round_trip(seed, kind, granularity, m, k, block, log_scale, layout):
    gen = torch.Generator().manual_seed(seed)
    x = random_tensor(gen, (m, k), torch.float32, 2.0**log_scale)
    if layout == "transposed":
        x = x.T.contiguous().T
    kw = {"block": block} if granularity == "block" else {}
    x8, scale = quantize_fp8(x, granularity, kind, **kw)
    assert x8.shape == x.shape and x8.dtype == kind and scale.dtype == torch.float32
    full = _expand(scale, m, k, block)
    mant, sub = FORMAT[kind]
    # the documented bound; (1 + 2^-20) and the 2^-126 floor: float32 rounding of x / scale
    bound = 2.0 ** -(mant + 1) * x.double().abs() * (1 + 2**-20) + 2.0 ** -(sub + 1) * full
    err = (x8.double() * full - x.double()).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


QUANTIZE_BAD = [
    lambda x: quantize_fp8(x.int()),
    lambda x: quantize_fp8(x.double()),
    lambda x: quantize_fp8(x, "row", torch.float16),
    lambda x: quantize_fp8(x, "channel"),
    lambda x: quantize_fp8(x, "block", block=(0, 128)),
    lambda x: quantize_fp8(x, "block", block=(True, 1)),
    lambda x: quantize_fp8(x, "row", block=(1, 128)),
    lambda x: quantize_fp8(x[:0], "tensor"),
    lambda x: quantize_fp8(x[:, :0], "row"),
    lambda x: quantize_fp8(x[0], "block"),
]


@props(30)
@given(st.integers(0, len(QUANTIZE_BAD) - 1), seeds)
def test_quantize_fp8_rejects_bad_arguments(index, seed):
    x = random_tensor(torch.Generator().manual_seed(seed), (4, 32), torch.float32)
    expect_named_error(lambda: QUANTIZE_BAD[index](x), "quantize_fp8")


# ---- int4_gemm --------------------------------------------------------------------------------


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """(K // 8, N) int32 -> (N, K) codes, nibble j of word i is channel 8i + j (int64 math)."""
    words = packed.long() & 0xFFFFFFFF
    return torch.stack([(words >> (4 * j)) & 0xF for j in range(8)], 1).reshape(
        -1, packed.shape[1]).T


def float64_weight(packed, scales, zeros, group_size, g_idx, dtype) -> torch.Tensor:
    """The (N, K) weight of the docstring: float32 (q - z) * s rounded to ``dtype``."""
    q = _unpack(packed)
    k = q.shape[1]
    g = (g_idx.long() if g_idx is not None else torch.zeros(k, dtype=torch.long)
         if group_size < 0 else torch.arange(k) // group_size)
    z = 8.0 if zeros is None else zeros.float().T[:, g]
    return ((q.float() - z) * scales.float().T[:, g]).to(dtype).double()


@st.composite
def int4_calls(draw) -> dict:
    gen = torch.Generator().manual_seed(draw(seeds))
    k = draw(st.sampled_from([32, 64, 128, 256]))
    n = draw(st.sampled_from([8, 24, 40]))
    group = draw(st.sampled_from([g for g in (32, 64, 128, 256, -1) if g < 0 or k % g == 0]))
    g_idx = None
    if group > 0 and draw(st.booleans()):
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[torch.randperm(k, generator=gen)] = (torch.arange(k) // group).int()
    w = random_tensor(gen, (n, k), torch.float32, 0.1)
    packed, scales, zeros = pack_int4(w, group, draw(st.booleans()), g_idx=g_idx)
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    lead = draw(st.sampled_from([(0,), (1,), (5,), (2, 3)]))
    x = random_tensor(gen, (*lead, k), dtype)
    view = draw(st.sampled_from(["contiguous", "x_transposed", "x_expanded", "scales_fp16",
                                 "scales_expanded"]))
    if view == "x_transposed" and x.dim() == 2:
        x = x.T.contiguous().T
    elif view == "x_expanded" and x.shape[0] > 0:
        x = x[:1].expand_as(x)
    elif view == "scales_fp16":
        scales = scales.half()
    elif view == "scales_expanded":
        scales = scales[:1].expand_as(scales)
        zeros = None if zeros is None else zeros[:1].expand_as(zeros)
    bias = random_tensor(gen, (n,), dtype) if draw(st.booleans()) else None
    return dict(x=x, packed=packed, scales=scales, zeros=zeros, group_size=group, g_idx=g_idx,
                bias=bias)


@props(40)
@given(int4_calls())
def test_int4_gemm_valid_calls_match_reference(args):
    x = args["x"]
    w = float64_weight(args["packed"], args["scales"], args["zeros"], args["group_size"],
                       args["g_idx"], x.dtype)
    want = x.double() @ w.T
    if args["bias"] is not None:
        want = want + args["bias"].double()
    ref = int4_gemm(**args, backend="reference")
    assert ref.shape == want.shape and ref.dtype == x.dtype
    check_close(compare("reference", ref, want, REFERENCE_TOLERANCE[x.dtype]))
    x2 = x.reshape(-1, x.shape[-1])
    call = Int4Call(x2, args["packed"], args["scales"], args["zeros"], args["g_idx"],
                    args["bias"], args["group_size"], ref.reshape(-1, ref.shape[-1]))
    for backend in [*runnable(INT4_SPEC, int4_problem(call)), None]:
        event(f"compared {backend}")
        got = int4_gemm(**args, backend=backend)
        check_close(compare(f"{backend}", got, ref, KERNEL_TOLERANCE[x.dtype]))


def _int4_base(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    packed, scales, zeros = pack_int4(random_tensor(gen, (24, 128), torch.float32), 32)
    return dict(x=random_tensor(gen, (5, 128), torch.bfloat16), packed=packed, scales=scales,
                zeros=zeros, group_size=32)


def _with(t: torch.Tensor, index: tuple, value: int) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


INT4_BAD = {
    "group_size 16": lambda a: dict(a, group_size=16),
    "group_size 32.0": lambda a: dict(a, group_size=32.0),
    "group_size True": lambda a: dict(a, group_size=True),
    "group_size 64 for scales of 32": lambda a: dict(a, group_size=64),
    "K not a multiple of 8": lambda a: dict(a, x=a["x"][:, :124]),
    "packed int64": lambda a: dict(a, packed=a["packed"].long()),
    "packed one row more": lambda a: dict(a, packed=torch.cat([a["packed"], a["packed"][:1]])),
    "scales of N - 1": lambda a: dict(a, scales=a["scales"][:, :23]),
    "scales int": lambda a: dict(a, scales=a["scales"].int()),
    "zeros int32": lambda a: dict(a, zeros=a["zeros"].int()),
    "a zero point of 16": lambda a: dict(a, zeros=_with(a["zeros"], (1, 2), 16)),
    "g_idx past the groups": lambda a: dict(a, g_idx=_with((torch.arange(128) // 32).int(),
                                                           (7,), 4)),
    "g_idx negative": lambda a: dict(a, g_idx=_with((torch.arange(128) // 32).int(), (7,), -1)),
    "g_idx int64": lambda a: dict(a, g_idx=torch.arange(128) // 32),
    "g_idx of K - 1": lambda a: dict(a, g_idx=(torch.arange(127) // 32).int()),
    "bias of N - 1": lambda a: dict(a, bias=torch.zeros(23, dtype=torch.bfloat16)),
    "bias of another half dtype": lambda a: dict(a, bias=torch.zeros(24, dtype=torch.float16)),
    "x int": lambda a: dict(a, x=a["x"].int()),
    "x float64": lambda a: dict(a, x=a["x"].double()),
    "x 0-d": lambda a: dict(a, x=a["x"][0, 0]),
    "packed on meta": lambda a: dict(a, packed=a["packed"].to("meta")),
    "triton on float32": lambda a: dict(a, x=a["x"].float(), backend="triton"),
}


@props(80)
@given(st.sampled_from(sorted(INT4_BAD)), seeds)
def test_int4_gemm_rejects_bad_arguments(kind, seed):
    args = INT4_BAD[kind](_int4_base(seed))
    expect_named_error(lambda: int4_gemm(args.pop("x"), args.pop("packed"), args.pop("scales"),
                                         args.pop("zeros"), **args), "int4_gemm", kind)


@props(40)
@given(seeds, st.sampled_from([8, 16]), st.sampled_from([32, 64, 128]),
       st.sampled_from([32, 64, -1]), st.booleans(), st.floats(-20, 10),
       st.sampled_from(["random", "constant_rows", "zeros", "transposed"]))
def test_pack_int4_round_trip(seed, n, k, group, symmetric, log_scale, kind):
    gen = torch.Generator().manual_seed(seed)
    w = random_tensor(gen, (n, k), torch.float32, 2.0**log_scale)
    if kind == "constant_rows":
        w = w[:, :1].expand(n, k)
    elif kind == "zeros":
        w = torch.zeros(n, k)
    elif kind == "transposed":
        w = w.T.contiguous().T
    result, message = named_error_or_result(lambda: pack_int4(w, group, symmetric),
                                            "pack_int4")
    if message is not None:
        assert group > 0 and k % group, message  # only a group size not dividing K
        return
    packed, scales, zeros = result
    back = dequantize_int4(packed, scales, zeros, group_size=group)
    check_close(compare("dequantize_int4", back,
                        float64_weight(packed, scales, zeros, group, None, torch.float32), 0.0))
    g = torch.zeros(k, dtype=torch.long) if group < 0 else torch.arange(k) // group
    half = scales.double().T[:, g] / 2 * (1 + 1e-6)  # float32 rounding of (q - z) * s
    assert bool(((back.double() - w.double()).abs() <= half).all())
    # kpt.quant's round-to-nearest is this very function
    assert all(a is b or torch.equal(a, b) for a, b in zip(rtn_int4(w, group, symmetric),
                                                            (packed, scales, zeros)))


PACK_BAD = [
    lambda w: pack_int4(w.masked_fill(w > 1, math.nan), 32),
    lambda w: pack_int4(w[None], 32),
    lambda w: pack_int4(w.int(), 32),
    lambda w: pack_int4(w[:0], 32),
    lambda w: pack_int4(w[:, :60], -1),
    lambda w: pack_int4(w, 32, "yes"),
    lambda w: pack_int4(w, 48),
    lambda w: pack_int4(w, 32, g_idx=(torch.arange(64) // 16).int()),
    lambda w: dequantize_int4(*pack_int4(w, 32), group_size=32, dtype=torch.int32),
    lambda w: dequantize_int4(*pack_int4(w, 32), group_size=64),
]


@props(40)
@given(st.integers(0, len(PACK_BAD) - 1), seeds)
def test_pack_and_dequantize_reject_bad_arguments(index, seed):
    w = random_tensor(torch.Generator().manual_seed(seed), (16, 64), torch.float32)
    expect_named_error(lambda: PACK_BAD[index](w), ("pack_int4", "dequantize_int4"))


@props(20)
@given(seeds, st.sampled_from(["row", "block", "tensor"]))
def test_rtn_fp8_is_what_fp8_gemm_reads(seed, granularity):
    gen = torch.Generator().manual_seed(seed)
    w = random_tensor(gen, (48, 160), torch.float32, 0.2)
    w8, sw = rtn_fp8(w, granularity)
    a8, sa = quantize_fp8(random_tensor(gen, (3, 160), torch.float32), "row")
    want = (a8.double() * sa.double()) @ (w8.double() * _expand(sw, 48, 160, (128, 128))).T
    check_close(compare("fp8_gemm(rtn_fp8)", fp8_gemm(a8, w8, sa, sw, out_dtype=torch.float32),
                        want, KERNEL_TOLERANCE[torch.float32]))
    expect_named_error(lambda: rtn_fp8(w, "channel"), "rtn_fp8")
    expect_named_error(lambda: rtn_fp8(w[0], granularity), "rtn_fp8")
