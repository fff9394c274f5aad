"""moe's CUDA/HIP backends (``kpt.ops.moe._cuda``, kernels in ``csrc/moe``).

On any machine: reasons and configs (int4 experts' included), the tile tables against the
kernels' instantiations, the launchers against the binding and the C header, how the launcher
hands int4 scales and zero points over, that every csrc/moe kernel is in the compile checks
(tests/jit/test_compile_kernels.py: nvcc sm_90a and sm_80, hipcc gfx90a), and that the
backends are registered. On a GPU: routing (every option alone and combined, ties, NaN, the
DeepSeek-V3 shape) and alignment against the reference; fused_moe against the reference on odd
shapes, with every tile, both implementations (tensor cores and the portable tiles the HIP
build runs), both per-pair buffers, fp8 experts, int4 experts (every group size, symmetric
and zero-point, float32 / float16 / bfloat16 scales, K ending inside a k-tile), an expert map
with a quarter of the experts local, empty experts and one expert taking all, NaN-poisoned
workspace and output, misaligned and strided inputs, determinism, and CUDA graph replay with
new routing.

Registry-level behaviour (dispatch, validation) is test_moe.py's, which runs every registered
kernel backend against the reference too.
"""

from __future__ import annotations

import ast
import itertools
import math
import re

import pytest
import torch

from kpt.jit import csrc_dir
from kpt.ops._common import compare
from kpt.ops._registry import Problem
from kpt.ops.moe import (
    ROUTE_SPEC,
    SPEC,
    FusedCall,
    RouteCall,
    _cuda,
    align,
    capacity,
    fused_moe,
    moe_route,
    reference,
)
from tests.ops.jit_backends import forward_arguments, unusable

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
FP8 = getattr(torch, "float8_e4m3fn", None)
# A kernel against the reference: the same rounding points, float32 sums in another order; an
# intermediate value straddling a rounding boundary differs by one unit of x's dtype, which the
# down product averages: one unit norm-wise (bf16 2^-8, fp16 2^-10 with fp16's headroom).
# The x-dtype per-pair buffer adds one rounding of each weighted pair product (half a unit).
TOLERANCE = {BF16: 2**-7, FP16: 2**-9}
# fp8 experts: x is quantised to the same codes as the reference's; the products differ in
# float32 order only (sum(x8 w8) * scales against (x8 * xs) @ (w8 * ws)); but an intermediate
# value one bf16 unit off crosses an e4m3 rounding boundary with chance ~2^-5 (8 against 3
# mantissa bits) and then moves by a whole e4m3 step (up to 2^-3 of it). Where one value in
# three differs by a unit that is ~2^-3 * sqrt(2^-5 / 3) ~ 1.3% norm-wise at worst; measured
# 0.83% and 0.95% (H200, bf16, I = 128 and 384, one code flip in a few hundred).
FP8_TOLERANCE = 2**-6
# int4 experts: the kernels dequantise to exactly the reference's weight in x's dtype (the
# same float32 product, the same rounding), so the 16-bit tolerance holds: only the order of
# the float32 sums differs.
# Routing: float32 softmax / sigmoid in another order and a sum of <= 8 weights.
ROUTE_RTOL, ROUTE_ATOL = 1e-5, 1e-7


def _problem(device: str = "cuda", dtype: torch.dtype = BF16, **dims) -> Problem:
    base = dict(t=4096, h=2048, i=768, e=128, e_global=128, top_k=8, quant="none",
                activation="silu", ep=False)
    return Problem.of(torch.device(device, 0), dtype, **(base | dims))


def _route_problem(**dims) -> Problem:
    base = dict(t=4096, e=256, top_k=8, scoring="sigmoid", renormalize=True, groups=8,
                topk_groups=4, bias=True)
    return Problem.of(torch.device("cuda", 0), FP32, **(base | dims))


# ---- reasons and configs (any machine) -------------------------------------------------------


@pytest.mark.parametrize("dims", [
    dict(), dict(t=0), dict(t=1, e=8, e_global=8, top_k=1), dict(h=24, i=40),
    dict(e=1024, e_global=4096, ep=True), dict(activation="gelu_tanh"),
    dict(quant="fp8", h=7168, i=2048), dict(quant="fp8", h=272, i=128),
    dict(quant="int4"), dict(quant="int4", h=24, i=40, top_k=1),
    dict(quant="int4", h=7168, i=2048, group13=128, group2=128),
    dict(quant="int4", h=2048, i=768, group13=32, group2=256),
    dict(quant="int4", h=200, i=72, group13=200, group2=72),  # one group, K % 32 != 0
], ids=str)
def test_supported_problems(dims):
    assert _cuda.supports(_problem(**dims)) == []


@pytest.mark.parametrize(("dims", "text"), [
    (dict(h=20), "multiples of 8"),
    (dict(i=100), "multiples of 8"),
    (dict(quant="fp8", i=192), "I = 192 % 128"),
    (dict(quant="fp8", h=264), "H = 264 % 16"),
    (dict(quant="int4", i=100), "multiples of 8"),
    (dict(quant="int4", group13=512), "group13 = 512 must be one of"),
    (dict(quant="int4", i=800, group2=64), "group2 = 64 must be one of (32, 64, 128, 256) "
                                           "dividing K = 800"),
    (dict(quant="int4", h=2048, group13=96), "group13 = 96"),
    (dict(e=1025, e_global=1025), "1025 local experts"),
    (dict(t=2**28, top_k=8), "exceed int32"),
])
def test_unsupported_problems_say_why(dims, text):
    reasons = _cuda.supports(_problem(**dims))
    assert len(reasons) == 1 and text in reasons[0], reasons


def test_fp32_x_is_a_reason():
    for quant in ("none", "int4"):
        reasons = _cuda.supports(_problem(dtype=FP32, quant=quant))
        assert any("float16 or bfloat16" in r for r in reasons), quant


def test_route_reasons():
    assert _cuda.route_supports(_route_problem()) == []
    assert _cuda.route_supports(_route_problem(e=512, groups=1, topk_groups=1)) == []
    reasons = _cuda.route_supports(_route_problem(e=513, groups=1, topk_groups=1))
    assert len(reasons) == 1 and "513 experts > 512" in reasons[0]
    assert _cuda.route_configs(_route_problem()) == [{}]


@pytest.mark.parametrize(("dims", "block_m"), [
    (dict(t=32, e=128, e_global=128, top_k=8), 16),      # decode: 2 pairs per expert
    (dict(t=1024, e=128, e_global=128, top_k=8), 64),    # 64 per expert
    (dict(t=4096, e=128, e_global=128, top_k=8), 128),   # 256 per expert
    (dict(t=4096, e=8, e_global=8, top_k=2), 128),       # Mixtral prefill: 1024 per expert
])
def test_default_block_m_follows_pairs_per_expert(dims, block_m):
    first = _cuda.configs(_problem(**dims))[0]
    assert first == {"impl": "mma", "block_m": block_m, "partial_fp32": True}


def test_configs_differ_and_are_instantiated(monkeypatch):
    for quant in ("none", "fp8", "int4"):
        for top_k in (1, 8):
            cfgs = _cuda.configs(_problem(quant=quant, top_k=top_k))
            assert len({tuple(sorted(c.items())) for c in cfgs}) == len(cfgs)
            assert {c["block_m"] for c in cfgs} == set(_cuda.BLOCK_MS)
            assert any(not c["partial_fp32"] for c in cfgs) == (top_k > 1)
            for c in cfgs:
                assert c["block_m"] in _cuda.MMA_TILES[quant]
    monkeypatch.setattr(_cuda, "is_rocm", lambda: True)
    assert {c["impl"] for c in _cuda.configs(_problem())} == {"simt"}


def test_unknown_tiles_are_rejected_before_any_build():
    with pytest.raises(ValueError, match="no 'mma' tile with block_m 32"):
        _cuda._tile("mma", "none", 32)
    assert _cuda._tile("mma", "none", 128) == (128, 128)
    assert _cuda._tile("mma", "fp8", 128) == (128, 64)
    assert _cuda._tile("simt", "fp8", 16) == (16, 64)
    assert _cuda._tile("mma", "int4", 128) == (128, 64)
    assert _cuda._tile("simt", "int4", 64) == (64, 64)


def test_alignment_rules():
    t = torch.zeros(4, 16, dtype=BF16)
    assert _cuda._aligned(t)
    assert not _cuda._aligned(torch.zeros(4, 20, dtype=BF16)[:, :16])  # 40-byte rows
    assert not _cuda._aligned(t.view(-1)[1:17].view(1, 16))  # base off by 2 bytes
    assert not _cuda._aligned(t.t())
    assert _cuda._aligned(torch.zeros(3, 48, 32, dtype=torch.uint8))


def _call(x, w13, w2, weights, ids, activation="silu", expert_map=None, w13_scale=None,
          w2_scale=None, out=None, w13_zeros=None, w2_zeros=None) -> FusedCall:
    quant = {x.dtype: "none", torch.int32: "int4"}.get(w13.dtype, "fp8")
    group13 = group2 = 0
    if quant == "int4":  # fused_moe's rule: K / groups, K itself for one group
        group13, group2 = x.shape[1] // w13_scale.shape[1], w2.shape[1] * 8 // w2_scale.shape[1]
    return FusedCall(x, w13, w2, weights.float().contiguous(), ids.int().contiguous(),
                     activation, quant, w13_scale, w2_scale, w13_zeros, w2_zeros, group13,
                     group2, None if expert_map is None else expert_map.int().contiguous(),
                     torch.empty_like(x) if out is None else out)


def _int4_cpu_call(scale13: torch.dtype, scale2: torch.dtype, zeros: bool) -> FusedCall:
    h, i, e = 64, 40, 4
    x = torch.randn(3, h).bfloat16()
    w13 = torch.randint(-2**31, 2**31 - 1, (e, h // 8, 2 * i), dtype=torch.int32)
    w2 = torch.randint(-2**31, 2**31 - 1, (e, i // 8, h), dtype=torch.int32)
    s13, s2 = torch.rand(e, h // 32, 2 * i).to(scale13), torch.rand(e, 1, h).to(scale2)
    z13 = torch.randint(0, 16, (e, h // 32, 2 * i), dtype=torch.uint8) if zeros else None
    z2 = torch.randint(0, 16, (e, 1, h), dtype=torch.uint8) if zeros else None
    return _call(x, w13, w2, torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32),
                 w13_scale=s13, w2_scale=s2, w13_zeros=z13, w2_zeros=z2)


def test_int4_groups_of_a_call():
    call = _int4_cpu_call(FP32, FP32, True)
    assert (call.quant, call.group13, call.group2) == ("int4", 32, 40)  # w2: one group, K = I


def test_int4_tables_are_handed_over_as_the_kernels_read_them():
    """One scale dtype for both weights (float32, exactly, when they differ); tables with a
    misaligned base or not contiguous are copied, the rest passed as they are."""
    call = _int4_cpu_call(BF16, BF16, True)
    s13, s2, z13, z2 = _cuda._int4_tables(call)
    assert s13 is call.w13_scale and s2 is call.w2_scale and z13 is call.w13_zeros
    assert z2 is call.w2_zeros
    call = _int4_cpu_call(FP16, FP32, False)
    s13, s2, z13, z2 = _cuda._int4_tables(call)
    assert s13.dtype == s2.dtype == FP32 and z13 is None and z2 is None
    assert torch.equal(s13, call.w13_scale.float()) and s2 is call.w2_scale
    call = _int4_cpu_call(FP32, BF16, True)
    flat = torch.empty(call.w13_scale.numel() + 1)
    flat[1:] = call.w13_scale.reshape(-1)
    call.w13_scale = flat[1:].view(call.w13_scale.shape)  # base 4 bytes off
    wide = torch.zeros(*call.w2_zeros.shape[:2], 2 * call.h, dtype=torch.uint8)
    wide[..., ::2] = call.w2_zeros
    call.w2_zeros = wide[..., ::2]  # not contiguous
    s13, s2, z13, z2 = _cuda._int4_tables(call)
    assert s13.data_ptr() % 16 == 0 and torch.equal(s13, call.w13_scale)
    assert s2.dtype == FP32 and z2.is_contiguous() and torch.equal(z2, call.w2_zeros)
    assert z13 is call.w13_zeros


def test_run_needs_gpu_tensors_and_skips_empty_calls():
    x, w13, w2 = torch.randn(2, 16).bfloat16(), torch.randn(4, 16, 16).bfloat16(), \
        torch.randn(4, 16, 8).bfloat16()
    weights, ids = torch.rand(2, 2), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match="needs GPU tensors"):
        _cuda.run_cuda(_call(x, w13, w2, weights, ids), {})
    _cuda.run_cuda(_call(x[:0], w13, w2, weights[:0], ids[:0]), {})  # nothing built
    logits = torch.randn(0, 8)
    empty = RouteCall(logits, 2, "softmax", True, 1, 1, None, 1.0,
                      torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int32))
    _cuda.run_route(empty, {})


# ---- the launchers, the binding and the header agree (any machine) ---------------------------


def _binding_text() -> str:
    return (csrc_dir() / "moe" / "binding.cpp").read_text()


def _binding_args(name: str) -> list[str]:
    text = _binding_text()
    body = text[text.index(f'm.def("{name}"'):]
    return re.findall(r'py::arg\("(\w+)"\)', body[: body.index(";")])


@pytest.mark.parametrize("name", ["route", "align", "forward"])
def test_launchers_pass_every_binding_argument_in_order(name):
    """The binding first compiles on a GPU machine: check here that each launcher call has as
    many positional arguments as the binding declares, and the C++ signature the same count."""
    tree = ast.parse(open(_cuda.__file__).read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == name
             and not n.keywords]
    assert len(calls) == 1
    args = calls[0].args
    count = sum(3 if isinstance(a, ast.Starred) else 1 for a in args)  # *Alignment: 3 fields
    names = _binding_args(name)
    assert count == len(names)
    text = _binding_text()
    signature = text[text.index(f"void {name}("):]
    signature = signature[: signature.index(")")]
    assert signature.count(",") + 1 == len(names)


def test_forward_takes_the_int4_tables_in_order():
    """The launcher passes the int4 scales, zero points and group sizes (None and 0 for
    other experts) where the binding declares them, before the routing tensors."""
    args, names = forward_arguments(_cuda, _binding_text())
    assert args == len(names) == 19
    assert names[:13] == ["x", "w13", "w2", "w13_scale", "w2_scale", "w13_zeros", "w2_zeros",
                          "group13", "group2", "weights", "ids", "expert_map", "out"]
    tree = ast.parse(open(_cuda.__file__).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and isinstance(n.func, ast.Attribute) and n.func.attr == "forward")
    assert [ast.unparse(a) for a in call.args[3:9]] == [
        "s13", "s2", "z13", "z2", "call.group13", "call.group2"]


def _header_value(name: str) -> int:
    header = (csrc_dir() / "include" / "kpt" / "moe.h").read_text()
    return int(re.search(rf"#define {name} (\d+)", header).group(1))


def test_python_limits_match_the_header():
    assert _header_value("KPT_MOE_ROUTE_MAX_EXPERTS") == _cuda.ROUTE_MAX_EXPERTS
    assert _header_value("KPT_MOE_MAX_LOCAL_EXPERTS") == _cuda.MAX_LOCAL_EXPERTS
    header = (csrc_dir() / "include" / "kpt" / "moe.h").read_text()
    for name, code in _cuda.ACTIVATIONS.items():
        assert re.search(rf"KPT_MOE_{name.upper()} = {code}\b", header), name
    for name, code in _cuda.IMPLS.items():
        assert re.search(rf"KPT_MOE_IMPL_{name.upper()} = {code}\b", header), name
    for name, code in _cuda.QUANTS.items():
        assert re.search(rf"KPT_MOE_QUANT_{name.upper()} = {code}\b", header), name
    # The header's capacity formula is the reference's.
    assert "pairs + local_experts * (block_m - 1)" in header
    assert capacity(10, 3, 16) == 64


def test_tile_tables_match_the_kernels():
    mma = (csrc_dir() / "moe" / "gemm_mma.cu").read_text()
    launched = re.findall(r"launch_tile<T, kFp8, (\d+), (\d+),", mma)
    tiles = {(int(m), int(n)) for m, n in launched}
    for quant in ("none", "fp8"):
        assert set(_cuda.MMA_TILES[quant].items()) <= tiles, quant
    # int4: its own kernel, 64 columns per half; both halves of every block_m.
    int4 = re.findall(r"launch_int4_halves<T, (\d+), \d+, ([12]),", mma)
    assert {(int(m), int(h)) for m, h in int4} == {
        (bm, h) for bm in _cuda.MMA_TILES["int4"] for h in (1, 2)}
    assert "static constexpr int kBN = 64," in mma
    assert set(_cuda.MMA_TILES["int4"].values()) == {64}
    simt = (csrc_dir() / "moe" / "gemm_simt.cu").read_text()
    assert set(re.findall(r"launch_tile<T, kQuant, (\d+)>", simt)) == {
        str(bm) for bm in _cuda.SIMT_TILES["none"]}
    assert "constexpr int kBN = 64;" in simt
    assert all(table == _cuda.SIMT_TILES["none"] for table in _cuda.SIMT_TILES.values())
    assert set(_cuda.SIMT_TILES["none"].values()) == {64}


def test_int4_shared_memory_reads_are_conflict_free():
    """gemm_mma.cu's int4 tiles: each phase of 8 lanes (grp = lane // 4, quad = lane % 4) of
    a 16-byte shared load hits 8 distinct 16-byte bank groups, for the A rows (8 chunks,
    chunk c of row r at c ^ (r & 1) * 4) and the packed rows (halves * 16 chunks, chunk c of
    row r at c ^ (r & 3) * 2)."""
    def bank_groups(address) -> int:
        return len({address(lane // 4, lane % 4) % 8 for lane in range(8)})

    for mi, kb, phase in itertools.product(range(8), range(2), range(4)):
        def a_chunk(grp, quad, mi=mi, kb=kb, phase=phase):
            r, c = 16 * mi + grp + 2 * phase, 4 * kb + quad
            return r * 8 + (c ^ ((r & 1) << 2))
        assert bank_groups(a_chunk) == 8
    for halves, h, wn, kb, phase in itertools.product((1, 2), (0, 1), (0, 1), range(2),
                                                      range(4)):
        if h < halves:
            def b_chunk(grp, quad, h=h, wn=wn, kb=kb, phase=phase, halves=halves):
                r, c = 4 * kb + quad, 16 * h + 8 * wn + grp + 2 * phase
                return r * 16 * halves + (c ^ ((r & 3) << 1))
            assert bank_groups(b_chunk) == 8


def test_every_kernel_is_compile_checked():
    """tests/jit/test_compile_kernels.py compiles every csrc/*/*.cu for sm_90a, sm_80 (nvcc)
    and gfx90a (hipcc) whenever the compilers are present; csrc/moe declares no target limit,
    so each of its kernels is checked for all three."""
    from tests.jit.test_compile_kernels import KERNELS, declared_targets

    moe = sorted((csrc_dir() / "moe").glob("*.cu"))
    assert len(moe) == 5 and set(moe) <= set(KERNELS)
    assert all(declared_targets(p.read_text()) is None for p in moe)


def test_backends_are_registered():
    """The op tables list the cuda (sm_80+) and hip backends of both ops, and on CUDA devices
    the cuda routing kernel comes first."""
    for spec in (ROUTE_SPEC, SPEC):
        cuda, hip = spec.backend("cuda"), spec.backend("hip")
        assert (cuda.rocm, cuda.min_capability, hip.rocm) == (False, (8, 0), True)
    assert ROUTE_SPEC.priority["cuda"][0] == "cuda"
    assert SPEC.backend("cuda").dtypes == frozenset({BF16, FP16})


# ---- on a GPU --------------------------------------------------------------------------------


needs_gpu = pytest.mark.skipif(unusable(_cuda) is not None, reason=str(unusable(_cuda)))
IMPLS = ["simt"] if torch.version.hip else ["mma", "simt"]
RUN = _cuda.run_hip if torch.version.hip else _cuda.run_cuda


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


# ---- routing ---------------------------------------------------------------------------------

ROUTINGS = {
    "softmax": dict(),
    "softmax-raw": dict(renormalize=False),
    "sigmoid": dict(scoring="sigmoid"),
    "bias": dict(scoring="sigmoid", correction_bias=True),
    "grouped": dict(num_expert_groups=4, topk_groups=2),
    "scaled": dict(routed_scaling_factor=2.5, renormalize=False),
    "deepseek-v3": dict(scoring="sigmoid", correction_bias=True, num_expert_groups=8,
                        topk_groups=4, routed_scaling_factor=2.5),
    "grouped-softmax-bias": dict(correction_bias=True, num_expert_groups=8, topk_groups=3),
}
ROUTE_SHAPES = [(0, 8, 2), (1, 8, 1), (3, 64, 8), (257, 128, 8), (5, 256, 8), (17, 64, 2),
                (33, 256, 1), (9, 512, 8), (6, 40, 3)]


def _route_call(logits, top_k, scoring="softmax", renormalize=True, num_expert_groups=None,
                topk_groups=None, correction_bias=None, routed_scaling_factor=1.0):
    t = logits.shape[0]
    return RouteCall(logits, top_k, scoring, renormalize, num_expert_groups or 1,
                     topk_groups or 1, correction_bias, float(routed_scaling_factor),
                     torch.full((t, top_k), float("nan"), device=logits.device),
                     torch.full((t, top_k), -7, dtype=torch.int32, device=logits.device))


def _route_opts(name: str, e: int, k: int, gen: torch.Generator) -> dict:
    opts = dict(ROUTINGS[name])
    if opts.pop("correction_bias", False):
        opts["correction_bias"] = torch.randn(e, generator=gen, device="cuda") * 0.1
    groups = opts.get("num_expert_groups")
    if groups and (e % groups or k > opts["topk_groups"] * e // groups):
        opts["num_expert_groups"] = opts["topk_groups"] = None
    return opts


def _check_route(call: RouteCall, opts: dict) -> None:
    """The kernel's ids are the reference's, except where two selection scores are within
    float32 rounding of each other (the two compute softmax in another order): there both
    choices' reference scores must agree. Weights match where the ids do."""
    RUN_ROUTE(call, {})
    torch.cuda.synchronize()
    logits, k = call.logits, call.top_k
    want_w, want_ids = moe_route(logits, k, backend="reference", **opts)
    assert ((call.ids >= 0) & (call.ids < logits.shape[1])).all()
    same = (call.ids == want_ids).all(dim=1)
    if not same.all():
        s = reference.scores(logits, opts.get("scoring", "softmax"))
        bias = opts.get("correction_bias")
        sel = reference._no_nan(s if bias is None else s + bias)
        got = sel[~same].gather(1, call.ids[~same].long())
        want = sel[~same].gather(1, want_ids[~same].long())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(call.weights[same], want_w[same], rtol=ROUTE_RTOL,
                               atol=ROUTE_ATOL, equal_nan=True)


RUN_ROUTE = _cuda.run_route_hip if torch.version.hip else _cuda.run_route_cuda


@needs_gpu
@pytest.mark.parametrize("name", list(ROUTINGS))
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=str)
def test_route_matches_the_reference(name, dtype):
    gen = _gen(1)
    for t, e, k in ROUTE_SHAPES:
        logits = (torch.randn(t, e, generator=gen, device="cuda") * 2).to(dtype)
        opts = _route_opts(name, e, k, gen)
        _check_route(_route_call(logits, k, **opts), opts)


@needs_gpu
def test_route_reads_strided_logits():
    gen = _gen(2)
    base = torch.randn(256, 70, generator=gen, device="cuda")
    opts = dict(scoring="sigmoid", num_expert_groups=4, topk_groups=2,
                correction_bias=torch.randn(32, generator=gen, device="cuda"))
    for logits in (base.t()[:32].t(), base[::3, 5:37]):  # column-major; row stride 210
        _check_route(_route_call(logits, 6, **opts), opts)


@needs_gpu
def test_route_ties_go_to_the_lower_expert_and_group():
    """Integer logits: many exactly equal scores, identical in both implementations, so the
    ids must be identical: only the tie rules decide."""
    gen = _gen(3)
    logits = torch.randint(-2, 3, (300, 64), generator=gen, device="cuda").float()
    for opts in (dict(), dict(scoring="sigmoid"), dict(num_expert_groups=8, topk_groups=3),
                 dict(scoring="sigmoid", num_expert_groups=4, topk_groups=2,
                      correction_bias=torch.zeros(64, device="cuda"))):
        for k in (1, 2, 8):
            call = _route_call(logits, k, **opts)
            RUN_ROUTE(call, {})
            _, want = moe_route(logits, k, backend="reference", **opts)
            assert torch.equal(call.ids, want), (opts, k)
    call = _route_call(torch.zeros(3, 16, device="cuda") + 1.5, 4)
    RUN_ROUTE(call, {})
    assert call.ids.tolist() == [[0, 1, 2, 3]] * 3


@needs_gpu
def test_grouped_route_never_leaves_the_kept_groups():
    logits = torch.full((2, 8), -30.0, device="cuda")
    logits[:, 0], logits[:, 1], logits[:, 4] = 5.0, 4.0, 4.5
    logits[1, 2:4] = float("-inf")  # kept experts at -inf still beat the dropped group
    call = _route_call(logits, 4, num_expert_groups=2, topk_groups=1)
    RUN_ROUTE(call, {})
    assert call.ids[0].tolist() == [0, 1, 2, 3] and call.ids[1].tolist() == [0, 1, 2, 3]


@needs_gpu
def test_route_nan_never_wins_and_propagates():
    logits = torch.randn(4, 16, generator=_gen(4), device="cuda")
    logits[1, 3] = float("nan")
    logits[2] = float("nan")
    call = _route_call(logits, 4, scoring="sigmoid", renormalize=False)
    RUN_ROUTE(call, {})
    assert 3 not in call.ids[1].tolist() and ((call.ids >= 0) & (call.ids < 16)).all()
    assert call.ids[2].tolist() == [0, 1, 2, 3]  # all -inf for selection: lowest ids
    assert torch.isfinite(call.weights[[0, 1, 3]]).all() and torch.isnan(call.weights[2]).all()
    call = _route_call(logits, 4)  # softmax spreads a NaN over its row
    RUN_ROUTE(call, {})
    assert torch.isnan(call.weights[[1, 2]]).all() and torch.isfinite(call.weights[[0, 3]]).all()
    assert ((call.ids >= 0) & (call.ids < 16)).all()


@needs_gpu
def test_route_deepseek_v3_shape_and_graph_replay():
    """T=4096, E=256, sigmoid + bias + 8 groups keep 4, top 8, scaling 2.5 (the issue's
    target shape), captured in a CUDA graph and replayed on new logits."""
    gen = _gen(5)
    logits = torch.randn(4096, 256, generator=gen, device="cuda")
    opts = dict(scoring="sigmoid", correction_bias=torch.randn(256, generator=gen,
                                                               device="cuda") * 0.1,
                num_expert_groups=8, topk_groups=4, routed_scaling_factor=2.5)
    call = _route_call(logits, 8, **opts)
    _check_route(call, opts)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        RUN_ROUTE(call, {})
    logits.copy_(torch.randn(4096, 256, generator=gen, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    want_w, want_ids = moe_route(logits, 8, backend="reference", **opts)
    assert (call.ids == want_ids).all(dim=1).float().mean() > 0.99
    same = (call.ids == want_ids).all(dim=1)
    torch.testing.assert_close(call.weights[same], want_w[same], rtol=ROUTE_RTOL,
                               atol=ROUTE_ATOL)


# ---- alignment -------------------------------------------------------------------------------


def _quarter_map(e_global: int, seed: int) -> torch.Tensor:
    """A quarter of the global experts are local (in a shuffled order), the rest -1."""
    perm = torch.randperm(e_global, generator=torch.Generator().manual_seed(seed))
    local = perm[: e_global // 4]
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[local] = torch.arange(local.numel(), dtype=torch.int32)
    return expert_map.cuda()


def _ids(t: int, e: int, k: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    if mode == "one":  # every pair to the last expert
        return torch.full((t, k), e - 1, dtype=torch.int32, device="cuda")
    if mode == "few":  # most experts get nothing
        return torch.randint(0, min(e, 3), (t, k), generator=gen, device="cuda",
                             dtype=torch.int32)
    if t == 0:
        return torch.empty(0, k, dtype=torch.int32, device="cuda")
    return torch.rand(t, e, generator=gen, device="cuda").argsort(-1)[:, :k].int()


@needs_gpu
@pytest.mark.parametrize("t,e,k,block_m", [
    (0, 8, 2, 16), (1, 8, 1, 16), (3, 64, 8, 64), (257, 128, 8, 16), (257, 256, 8, 128),
    (4096, 8, 2, 128), (5000, 64, 8, 64), (37, 1024, 4, 16),
])
@pytest.mark.parametrize("mode", ["random", "few", "one", "quarter-local"])
def test_align_matches_the_reference_exactly(t, e, k, block_m, mode):
    """Deterministic and stable: the kernel's alignment is the reference's bit for bit (the
    bigger shapes run several chunks and the multi-round rank loop)."""
    gen = _gen(t + e)
    emap = _quarter_map(e, t) if mode == "quarter-local" else None
    local = e // 4 if emap is not None else e
    ids = _ids(t, e, k, "random" if emap is not None else mode, gen)
    got = _cuda.align(ids, local, block_m, emap)
    want = align(ids, local, block_m, emap)
    for name, g, w in zip(("sorted_pairs", "block_expert", "num_padded"), got, want):
        assert torch.equal(g, w), name


# ---- fused experts ---------------------------------------------------------------------------


def _experts(seed: int, t: int, h: int, i: int, e: int, k: int, dtype: torch.dtype,
             mode: str = "random"):
    gen = _gen(seed)
    x = torch.randn(t, h, generator=gen, device="cuda").to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device="cuda") / math.sqrt(h)).to(dtype)
    w2 = (torch.randn(e, h, i, generator=gen, device="cuda") / math.sqrt(i)).to(dtype)
    weights = torch.rand(t, k, generator=gen, device="cuda") + 0.1
    return x, w13, w2, weights, _ids(t, e, k, mode, gen)


def _reference(call: FusedCall) -> torch.Tensor:
    return fused_moe(call.x, call.w13, call.w2, call.weights, call.ids,
                     activation=call.activation, w13_scale=call.w13_scale,
                     w2_scale=call.w2_scale, w13_zeros=call.w13_zeros,
                     w2_zeros=call.w2_zeros, expert_map=call.expert_map, backend="reference")


def _check(call: FusedCall, config: dict, tol: float) -> None:
    call.out.fill_(float("nan"))
    RUN(call, config)
    torch.cuda.synchronize()
    want = _reference(call)
    reason = compare("out", call.out, want.float(), tol)
    assert reason is None, (reason, config)


def _check_every_tile(call: FusedCall, impl: str, tol: float) -> None:
    """_check with every block_m, each with both per-pair buffers (float32, x's dtype)."""
    for block_m in _cuda.BLOCK_MS:
        for partial_fp32 in (True, False):
            _check(call, dict(impl=impl, block_m=block_m, partial_fp32=partial_fp32), tol)


EXPERT_SHAPES = [  # t, h, i, e, k, ids mode
    (1, 64, 32, 8, 1, "random"), (3, 48, 40, 64, 8, "random"), (257, 200, 136, 8, 2, "random"),
    (37, 64, 32, 128, 8, "few"), (33, 32, 16, 8, 2, "one"), (5, 32, 8, 256, 8, "random"),
    (129, 264, 72, 16, 1, "random"), (0, 32, 16, 8, 2, "random"),
]


@needs_gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("case", range(len(EXPERT_SHAPES)),
                         ids=[f"T{s[0]}-H{s[1]}-I{s[2]}-E{s[3]}-k{s[4]}-{s[5]}"
                              for s in EXPERT_SHAPES])
def test_fused_matches_the_reference_with_every_tile(case, dtype, impl):
    t, h, i, e, k, mode = EXPERT_SHAPES[case]
    x, w13, w2, weights, ids = _experts(case, t, h, i, e, k, dtype, mode)
    call = _call(x, w13, w2, weights, ids)
    _check_every_tile(call, impl, TOLERANCE[dtype])


@needs_gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_activations(activation, impl):
    x, w13, w2, weights, ids = _experts(7, 65, 128, 96, 16, 4, BF16)
    call = _call(x, w13, w2, weights, ids, activation)
    _check(call, dict(impl=impl, block_m=64), TOLERANCE[BF16])


@needs_gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t,k", [(45, 8), (70, 1)])
def test_expert_map_with_a_quarter_local(t, k, impl):
    """Pairs routed to other ranks add nothing; tokens with no local expert get zeros (the
    output is NaN-poisoned first)."""
    e_global = 64
    x, w13_all, w2_all, weights, ids = _experts(20 + k, t, 64, 32, e_global, k, BF16)
    emap = _quarter_map(e_global, 21)
    local = torch.nonzero(emap >= 0).flatten()
    order = emap[local].argsort()
    call = _call(x, w13_all[local[order]], w2_all[local[order]], weights, ids,
                 expert_map=emap)
    for block_m in _cuda.BLOCK_MS:
        _check(call, dict(impl=impl, block_m=block_m), TOLERANCE[BF16])
    no_local = (emap[ids.long()] < 0).all(dim=1)
    assert (call.out[no_local] == 0).all()
    if k == 1:  # three quarters of the tokens have no local expert
        assert no_local.float().mean() > 0.5


def _fp8_experts(seed: int, t: int, h: int, i: int, e: int, k: int, dtype: torch.dtype):
    from kpt.ops import quantize_fp8

    x, w13, w2, weights, ids = _experts(seed, t, h, i, e, k, torch.float32)
    q13 = [quantize_fp8(w, "block", block=(128, 128)) for w in w13]
    q2 = [quantize_fp8(w, "block", block=(128, 128)) for w in w2]
    return (x.to(dtype), torch.stack([q[0] for q in q13]), torch.stack([q[0] for q in q2]),
            weights, ids, torch.stack([q[1] for q in q13]), torch.stack([q[1] for q in q2]))


@needs_gpu
@pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("t,h,i,e,k", [(19, 256, 128, 8, 2), (3, 272, 256, 64, 8),
                                       (130, 400, 384, 16, 1)])
def test_fp8_experts_match_the_reference(t, h, i, e, k, dtype, impl):
    """H = 272 and 400: a partial last 128-block of H (scales and codes past it unread)."""
    x, w13, w2, weights, ids, s13, s2 = _fp8_experts(t + h, t, h, i, e, k, dtype)
    call = _call(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2)
    for block_m in _cuda.BLOCK_MS:
        _check(call, dict(impl=impl, block_m=block_m), FP8_TOLERANCE)


def _int4_experts(seed: int, t: int, h: int, i: int, e: int, k: int, dtype: torch.dtype,
                  group13: int, group2: int, symmetric: bool, scale_dtypes=(FP32, FP32),
                  mode: str = "random"):
    """int4 experts by pack_int4 (group -1: one group), scales cast to scale_dtypes (the
    reference reads the same cast values); returns _call's arguments."""
    from kpt.ops import pack_int4

    x, w13, w2, weights, ids = _experts(seed, t, h, i, e, k, FP32, mode)
    packed = []
    for w, group, sdtype in ((w13, group13, scale_dtypes[0]), (w2, group2, scale_dtypes[1])):
        parts = [pack_int4(we, group, symmetric) for we in w]
        packed.append((torch.stack([q for q, _, _ in parts]),
                       torch.stack([sc for _, sc, _ in parts]).to(sdtype),
                       None if symmetric else torch.stack([z for _, _, z in parts])))
    (q13, s13, z13), (q2, s2, z2) = packed
    return dict(x=x.to(dtype), w13=q13, w2=q2, weights=weights, ids=ids, w13_scale=s13,
                w2_scale=s2, w13_zeros=z13, w2_zeros=z2)


def _int4_call(args: dict, **extra) -> FusedCall:
    args = dict(args)
    return _call(args.pop("x"), args.pop("w13"), args.pop("w2"), args.pop("weights"),
                 args.pop("ids"), **args, **extra)


INT4_CASES = [  # t, h, i, e, k, group13, group2, symmetric, scale dtypes
    (19, 256, 128, 8, 2, 128, 128, False, (FP32, FP32)),
    (3, 128, 64, 64, 8, 32, 32, True, (FP32, FP32)),      # a group per k32 block
    (130, 512, 256, 16, 1, 256, 64, False, (BF16, BF16)),
    (33, 96, 96, 8, 2, 32, 32, False, (FP16, FP16)),      # K ends after half a k-tile of 64
    (45, 200, 72, 8, 4, -1, -1, False, (FP32, FP32)),     # one group; K % 32 == 8
    (7, 264, 40, 16, 8, -1, -1, True, (BF16, FP32)),      # mixed scale dtypes
]


@needs_gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("case", INT4_CASES,
                         ids=[f"T{c[0]}-H{c[1]}-I{c[2]}-E{c[3]}-k{c[4]}-g{c[5]}.{c[6]}-"
                              f"{'sym' if c[7] else 'zp'}-{c[8][0]}.{c[8][1]}"
                              .replace("torch.", "") for c in INT4_CASES])
def test_int4_experts_match_the_reference(case, dtype, impl):
    """Every group size (32 .. 256 and one group over K), symmetric and zero-point, float32 /
    bfloat16 / float16 scales (and two different ones), K ending inside a k-tile and inside a
    k32 block (H = 200, 264; I = 40, 72); every tile, both per-pair buffers."""
    t, h, i, e, k, g13, g2, symmetric, sdtypes = case
    call = _int4_call(_int4_experts(t + h + i, t, h, i, e, k, dtype, g13, g2, symmetric,
                                    sdtypes))
    _check_every_tile(call, impl, TOLERANCE[dtype])


@needs_gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_int4_expert_map_and_unread_experts(impl):
    """A quarter of the experts local; NaN scales of an expert no pair reaches are never read
    (its rows of the packed weight are garbage too)."""
    e_global, t, k = 64, 45, 8
    args = _int4_experts(40, t, 128, 64, e_global, k, BF16, 64, 64, False)
    emap = _quarter_map(e_global, 41)
    local = torch.nonzero(emap >= 0).flatten()
    order = local[emap[local].argsort()]
    for name in ("w13", "w2", "w13_scale", "w2_scale", "w13_zeros", "w2_zeros"):
        args[name] = args[name][order].contiguous()
    call = _int4_call(args, expert_map=emap)
    for block_m in _cuda.BLOCK_MS:
        _check(call, dict(impl=impl, block_m=block_m), TOLERANCE[BF16])
    args = _int4_experts(42, 7, 64, 32, 8, 2, BF16, 32, 32, True, mode="few")
    args["w13_scale"][7] = float("nan")  # "few": no pair routes to experts >= 3
    args["w2_scale"][6] = float("nan")
    args["w13"][7] = -1
    call = _int4_call(args)
    _check(call, dict(impl=impl, block_m=16), TOLERANCE[BF16])
    assert torch.isfinite(call.out).all()


@needs_gpu
def test_int4_misaligned_scales_and_the_public_function():
    """Scales at an odd offset (copied by the launcher), then fused_moe(backend=...) with
    int4 experts, the path the registry takes."""
    args = _int4_experts(43, 29, 128, 64, 8, 2, BF16, 32, 64, False)
    flat = torch.empty(args["w13_scale"].numel() + 1, device="cuda")
    flat[1:] = args["w13_scale"].reshape(-1)
    args["w13_scale"] = flat[1:].view(args["w13_scale"].shape)
    call = _int4_call(args)
    for impl in IMPLS:
        _check(call, dict(impl=impl, block_m=16), TOLERANCE[BF16])
    backend = "hip" if torch.version.hip else "cuda"
    x, w13, w2, weights, ids = (args.pop(n) for n in ("x", "w13", "w2", "weights", "ids"))
    got = fused_moe(x, w13, w2, weights, ids, backend=backend, **args)
    want = fused_moe(x, w13, w2, weights, ids, backend="reference", **args)
    assert compare("out", got, want.float(), TOLERANCE[BF16]) is None


@needs_gpu
def test_misaligned_and_strided_inputs_are_served():
    """x with a padded row stride, x and the experts at an odd element offset (copied by the
    launcher), a non-contiguous output (written through a temporary)."""
    x, w13, w2, weights, ids = _experts(30, 41, 64, 48, 8, 2, BF16)
    padded = torch.empty(41, 72, dtype=BF16, device="cuda")
    padded[:, :64] = x
    flat13 = torch.empty(w13.numel() + 1, dtype=BF16, device="cuda")
    flat13[1:] = w13.reshape(-1)
    shifted = flat13[1:].view(w13.shape)
    out = torch.empty(64, 41, dtype=BF16, device="cuda").t()
    for xx, ww in ((padded[:, :64], w13), (x, shifted)):
        call = _call(xx, ww, w2, weights, ids, out=out)
        _check(call, _cuda.configs(_problem(t=41, h=64, i=48, e=8, e_global=8, top_k=2))[0],
               TOLERANCE[BF16])


@needs_gpu
def test_nan_poisoned_workspace_is_never_read():
    """The caching allocator hands the workspace out of blocks freshly filled with NaN bits
    (0xff bytes: NaN in every float type, -1 in the index buffers): nothing unwritten may
    reach the output."""
    x, w13, w2, weights, ids = _experts(31, 257, 128, 64, 64, 8, BF16, "few")
    call = _call(x, w13, w2, weights, ids)
    for impl in IMPLS:
        for block_m in _cuda.BLOCK_MS:
            for partial_fp32 in (True, False):
                poison = [torch.full((n,), 0xFF, dtype=torch.uint8, device="cuda")
                          for n in (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24) for _ in "ab"]
                del poison
                _check(call, dict(impl=impl, block_m=block_m, partial_fp32=partial_fp32),
                       TOLERANCE[BF16])


@needs_gpu
def test_nan_in_a_token_stays_in_its_row_and_unused_experts_are_unread():
    x, w13, w2, weights, ids = _experts(32, 7, 32, 16, 8, 2, BF16, "few")
    x[4, 5] = float("nan")
    w13[7] = float("nan")  # "few": no pair routes to experts >= 3
    w2[6] = float("nan")
    call = _call(x, w13, w2, weights, ids)
    for impl in IMPLS:
        RUN(call, dict(impl=impl, block_m=16))
        assert torch.isnan(call.out[4]).all() and torch.isfinite(call.out[[0, 1, 2, 3, 5, 6]]).all()


@needs_gpu
def test_results_are_deterministic():
    x, w13, w2, weights, ids = _experts(33, 300, 128, 64, 16, 4, BF16)
    call = _call(x, w13, w2, weights, ids)
    RUN(call, {})
    first = call.out.clone()
    for _ in range(3):
        RUN(call, {})
        assert torch.equal(call.out, first)


@needs_gpu
def test_graph_replay_follows_new_routing():
    """One capture (alignment, GEMMs, sum; workspace from the graph's pool), replayed after
    the ids and weights changed in place: nothing is planned from host-side routing."""
    x, w13, w2, weights, ids = _experts(34, 96, 128, 64, 32, 4, BF16)
    call = _call(x, w13, w2, weights, ids)
    config = _cuda.configs(_problem(t=96, h=128, i=64, e=32, e_global=32, top_k=4))[0]
    RUN(call, config)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        RUN(call, config)
    gen = _gen(35)
    call.ids.copy_(_ids(96, 32, 4, "few", gen))
    call.weights.copy_(torch.rand(96, 4, generator=gen, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert compare("out", call.out, _reference(call).float(), TOLERANCE[BF16]) is None


@needs_gpu
@pytest.mark.parametrize("shape", [
    (32, 2048, 768, 128, 8),   # decode, Qwen3-30B-A3B layer
    (4096, 2048, 768, 128, 8),  # prefill, the same layer
    (1024, 4096, 14336, 8, 2),  # Mixtral layer (the bench uses T = 4096)
], ids=["decode-E128-k8", "prefill-E128-k8", "mixtral-T1024"])
def test_benchmark_shapes_match_the_reference(shape):
    """The shapes bench/bench_moe.py times, with the default config of each."""
    t, h, i, e, k = shape
    x, w13, w2, weights, ids = _experts(36, t, h, i, e, k, BF16)
    call = _call(x, w13, w2, weights, ids)
    problem = _problem(t=t, h=h, i=i, e=e, e_global=e, top_k=k)
    _check(call, _cuda.configs(problem)[0], TOLERANCE[BF16])


@needs_gpu
def test_public_functions_dispatch_to_the_backend():
    """Through moe_route / fused_moe with backend= (the registry's path to these launchers)."""
    backend = "hip" if torch.version.hip else "cuda"
    x, w13, w2, _, _ = _experts(37, 50, 64, 32, 16, 4, BF16)
    logits = torch.randn(50, 16, generator=_gen(38), device="cuda")
    weights, ids = moe_route(logits, 4, backend=backend)
    want_w, want_ids = moe_route(logits, 4, backend="reference")
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=ROUTE_RTOL, atol=ROUTE_ATOL)
    got = fused_moe(x, w13, w2, weights, ids, backend=backend)
    want = fused_moe(x, w13, w2, weights, ids, backend="reference")
    assert compare("out", got, want.float(), TOLERANCE[BF16]) is None
