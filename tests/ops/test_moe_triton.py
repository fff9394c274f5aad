"""moe_route / fused_moe Triton kernels (kpt/ops/moe/_triton.py) against kpt.ops.moe.reference:
routing (softmax / sigmoid, bias, scaling, renormalize, DeepSeek grouped top-k, ties, NaN
and infinite logits, strided logits), the alignment kernels against ``reference.align``, the
fp8 activation quantiser against ``quantize_fp8`` bit for bit, and the fused experts in bf16 /
fp16 / fp8-block / int4 with every activation, expert_map with a quarter of the experts local,
T = 0, one expert receiving every pair, strided x, every listed config, and NaN-poisoned
workspaces and outputs. On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py
sets it), on small odd shapes so that the file stays fast on one core."""

from __future__ import annotations

import pytest
import torch

from kpt.ops import pack_int4, quantize_fp8
from kpt.ops._common import compare, triton_interpreting
from kpt.ops._registry import Problem
from kpt.ops.moe import (
    SPEC,
    FusedCall,
    RouteCall,
    _fused_args,
    _route_args,
    fused_moe,
    moe_route,
    problem_of,
    route_problem,
)
from kpt.ops.moe import reference as ref

_triton = pytest.importorskip("kpt.ops.moe._triton")

# The GPU when there is one (the Triton backend serves CUDA tensors), else the CPU under the
# interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreting(),
                       reason="runs the Triton kernels on CPU tensors: TRITON_INTERPRET=1"),
    # Padding tokens of a routing tile are all -inf: the interpreter's numpy warns on their
    # inf - inf (the rows are never stored).
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]

# Routing is float32 on both sides; exp / division may differ by a few ulps (GPU exp is an
# approximation): 1e-5 relative leaves a wide margin. ids must match exactly.
ROUTE_TOLERANCE = 1e-5
# Fused experts, bf16/fp16/int4: the same rounding points as the reference (int4 weights
# dequantised and rounded identically); only float32 sum orders differ, which can flip the
# rounding of an intermediate element or an output element by one unit (bf16 2^-8, fp16
# 2^-11): one unit bounds it norm-wise.
TOLERANCE = {torch.bfloat16: 2**-8, torch.float16: 2**-11}
# With x.dtype per-pair partials (PARTIAL_FP32=False) every w * yp is rounded once more before
# the sum over k (a rounding point the contract allows): two units.
PARTIAL_TOLERANCE = {torch.bfloat16: 2**-7, torch.float16: 2**-10}
# fp8: a different float32 order can flip an e4m3 rounding of the quantised intermediate (one
# e4m3 unit is 2^-3 of that element) and then the bf16 output; diluted over the I products of
# a row, 2^-6 norm-wise bounds a few such flips.
FP8_TOLERANCE = 2**-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- moe_route -----------------------------------------------------------------------------


def _route(logits, top_k, *, scoring="softmax", renormalize=True, groups=None, topk_groups=None,
           bias=None, scaling=1.0, config=None):
    """(weights, ids) of the Triton kernel and of the reference for one validated call."""
    top_k, g, tg, bias, scaling = _route_args(logits, top_k, scoring, renormalize, groups,
                                              topk_groups, bias, scaling)
    t = logits.shape[0]
    call = RouteCall(logits, top_k, scoring, renormalize, g, tg, bias, scaling,
                     torch.full((t, top_k), float("nan"), device=logits.device),
                     torch.full((t, top_k), -7, dtype=torch.int32, device=logits.device))
    _triton.run_route(call, config or _triton.route_configs(route_problem(call))[0])
    want = ref.route(logits.cpu(), top_k, scoring, renormalize, g, tg,
                     None if bias is None else bias.cpu(), scaling)
    return call.weights.cpu(), call.ids.cpu(), want


ROUTE_CASES = {
    "t0": dict(t=0, e=8, top_k=2),
    "t1-top1": dict(t=1, e=8, top_k=1),
    "softmax-no-renorm": dict(t=37, e=8, top_k=2, renormalize=False),
    "top_k=E": dict(t=37, e=8, top_k=8, ties=True),
    "sigmoid-bias-scale": dict(t=37, e=64, top_k=8, scoring="sigmoid", bias=True, scaling=2.5),
    "grouped-sigmoid-bias": dict(t=3, e=64, top_k=8, scoring="sigmoid", groups=8,
                                 topk_groups=3, bias=True),
    "grouped-softmax-ties": dict(t=37, e=64, top_k=8, groups=4, topk_groups=2, bias=True,
                                 ties=True),
    "groups-of-2": dict(t=37, e=12, top_k=3, scoring="sigmoid", groups=6, topk_groups=2),
    "groups-of-1": dict(t=5, e=12, top_k=3, scoring="sigmoid", groups=12, topk_groups=3),
    "odd-groups-fp16": dict(t=37, e=96, top_k=6, groups=3, topk_groups=2, bias=True,
                            dtype=torch.float16, renormalize=False, scaling=0.7),
    "deepseek-v3-bf16": dict(t=37, e=256, top_k=8, scoring="sigmoid", groups=8,
                             topk_groups=4, bias=True, scaling=2.5, dtype=torch.bfloat16),
    "e-not-pow2": dict(t=37, e=40, top_k=5, scoring="sigmoid", bias=True),
    "strided": dict(t=37, e=64, top_k=2, strided=True),
}


@pytest.mark.parametrize("case", list(ROUTE_CASES), ids=list(ROUTE_CASES))
def test_route_matches_reference(case):
    c = ROUTE_CASES[case]
    gen = _gen(len(case))
    t, e = c["t"], c["e"]
    logits = torch.randn(t, e, generator=gen) * 2
    if c.get("ties"):
        logits = (logits * 2).round() / 2  # a coarse grid: many equal scores, ties on the id
    logits = logits.to(c.get("dtype", torch.float32))
    if c.get("strided"):
        logits = torch.randn(e, 2 * t, generator=gen).t()[::2]  # neither dim contiguous
    bias = None
    if c.get("bias"):
        bias = torch.randn(e, generator=gen) * 0.1
        if c.get("ties"):
            bias = (bias * 10).round() / 10
    weights, ids, (want_w, want_ids) = _route(
        logits.to(DEVICE), c["top_k"], scoring=c.get("scoring", "softmax"),
        renormalize=c.get("renormalize", True), groups=c.get("groups"),
        topk_groups=c.get("topk_groups"), bias=None if bias is None else bias.to(DEVICE),
        scaling=c.get("scaling", 1.0))
    torch.testing.assert_close(ids, want_ids, rtol=0, atol=0)
    assert compare("weights", weights, want_w.float(), ROUTE_TOLERANCE) is None


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "grouped"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_non_finite_logits_select_valid_experts(scoring, grouped):
    """NaN selects as -inf (ids stay valid and deterministic); weights follow the scores."""
    logits = torch.randn(6, 16, generator=_gen(3))
    logits[0, 5] = float("nan")
    logits[1] = float("nan")
    logits[2, 3] = float("inf")
    logits[3] = float("-inf")
    logits[4, :8] = float("nan")  # one whole group of 8 when grouped
    groups = dict(groups=4, topk_groups=2) if grouped else {}
    weights, ids, (want_w, want_ids) = _route(logits.to(DEVICE), 4, scoring=scoring, **groups)
    torch.testing.assert_close(ids, want_ids, rtol=0, atol=0)
    assert ((ids >= 0) & (ids < 16)).all()
    torch.testing.assert_close(weights, want_w.float(), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_route_block_sizes_agree():
    """Every listed config gives the same result (tiles change nothing but the grid)."""
    logits = torch.randn(37, 64, generator=_gen(5)).to(DEVICE)
    problem = Problem.of(logits.device, logits.dtype, t=37, e=64, top_k=4, scoring="sigmoid",
                         renormalize=True, groups=8, topk_groups=2, bias=False)
    for config in _triton.route_configs(problem):
        weights, ids, (want_w, want_ids) = _route(logits, 4, scoring="sigmoid", groups=8,
                                                  topk_groups=2, config=config)
        torch.testing.assert_close(ids, want_ids, rtol=0, atol=0)
        assert compare("weights", weights, want_w.float(), ROUTE_TOLERANCE) is None


def test_route_supports_names_the_limit(monkeypatch):
    big = Problem.of(torch.device("cpu"), torch.float32, t=1, e=2048, top_k=8,
                     scoring="softmax", renormalize=True, groups=1, topk_groups=1, bias=False)
    assert any("2048" in r for r in _triton.route_supports(big))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("TRITON_INTERPRET" in r for r in _triton.route_supports(big))


# ---- alignment and the fp8 quantiser --------------------------------------------------------


ALIGN_CASES = {
    "t0": (0, 2, 8, 16, False),
    "one-pair": (1, 1, 8, 16, False),
    "odd": (37, 8, 64, 16, False),
    "expert-map": (37, 8, 64, 16, True),
    "block-1": (33, 3, 7, 1, False),
    "many-experts": (9, 3, 1000, 2, False),
    "many-chunks": (400, 8, 32, 64, True),
}


@pytest.mark.parametrize("case", list(ALIGN_CASES), ids=list(ALIGN_CASES))
def test_align_matches_reference(case, monkeypatch):
    t, k, e, block_m, with_map = ALIGN_CASES[case]
    gen = _gen(t + e)
    ids = torch.randint(0, e, (k, t), generator=gen, dtype=torch.int32).t()  # strided view
    expert_map, local = None, e
    if with_map:
        expert_map, local = _quarter_map(e, gen)
    _poison_workspaces(monkeypatch)
    got = _triton.align(ids.to(DEVICE), local, block_m,
                        None if expert_map is None else expert_map.to(DEVICE))
    want = ref.align(ids, local, block_m, expert_map)
    for name, g, w in zip(want._fields, got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0, msg=name)


def test_align_one_expert_takes_every_pair():
    ids = torch.full((300, 2), 3, dtype=torch.int32)
    ids[:, 1] = 5
    got = _triton.align(ids.to(DEVICE), 8, 16)
    for g, w in zip(got, ref.align(ids, 8, 16)):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)


def test_activation_quantiser_is_quantize_fp8():
    """_quant_x rounds as quantize_fp8(x, "block") does, bit for bit: rows of very different
    magnitudes (e4m3 subnormals included), an all-zero block (scale 1), a NaN block, a
    partial last block (H = 200)."""
    gen = _gen(11)
    x = torch.randn(19, 200, generator=gen) * torch.exp(3 * torch.randn(19, 1, generator=gen))
    x[2, :128] = 0
    x[3, 130] = float("nan")
    x[4, 7] = 1e-30  # a tiny value next to large ones: rounds to an e4m3 subnormal or zero
    for dtype in (torch.bfloat16, torch.float16):
        xd = x.to(dtype).to(DEVICE)
        q = torch.empty(19, 200, dtype=torch.float8_e4m3fn, device=DEVICE)
        s = torch.empty(19, 2, device=DEVICE)
        _triton._quant_x[(2, 2)](xd, q, s, 19, 200, xd.stride(0), xd.stride(1), q.stride(0),
                                 s.stride(0), s.stride(1), BLOCK_T=16)
        want_q, want_s = quantize_fp8(xd.cpu(), "block")
        torch.testing.assert_close(s.cpu(), want_s, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(q.cpu().float(), want_q.float(), rtol=0, atol=0,
                                   equal_nan=True)


# ---- fused_moe -----------------------------------------------------------------------------


def _quarter_map(e: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """An expert_map with a quarter of the e global experts local (random ones, local ids
    in a shuffled order)."""
    local = max(1, e // 4)
    expert_map = torch.full((e,), -1, dtype=torch.int32)
    expert_map[torch.randperm(e, generator=gen)[:local]] = torch.randperm(
        local, generator=gen).int()
    return expert_map, local


def _experts(seed: int, e: int, h: int, i: int, quant: str, dtype: torch.dtype,
             group: int = -1, zero_point: bool = False) -> dict:
    """w13 / w2 (and scales, zeros) of e random experts, gate/up outputs of unit scale."""
    gen = _gen(seed)
    w13 = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, i, generator=gen) / i**0.5
    if quant == "none":
        return dict(w13=w13.to(dtype), w2=w2.to(dtype))
    if quant == "fp8":
        out = {}
        for name, w in (("w13", w13), ("w2", w2)):
            pairs = [quantize_fp8(m, "block", block=(128, 128)) for m in w]
            out[name] = torch.stack([q for q, _ in pairs])
            out[f"{name}_scale"] = torch.stack([s for _, s in pairs])
        return out
    out = {}
    for name, w in (("w13", w13), ("w2", w2)):
        packs = [pack_int4(m, group, not zero_point) for m in w]
        out[name] = torch.stack([p[0] for p in packs])
        out[f"{name}_scale"] = torch.stack([p[1] for p in packs])
        if zero_point:
            out[f"{name}_zeros"] = torch.stack([p[2] for p in packs])
    return out


def _routing(seed: int, t: int, e: int, top_k: int, same: bool = False):
    """ids (distinct experts per token, or the same top_k experts for every token) and
    positive weights."""
    gen = _gen(seed)
    if same:
        ids = torch.arange(top_k, dtype=torch.int32).repeat(t, 1) + (e - top_k) // 2
    else:
        ids = torch.argsort(torch.rand(t, e, generator=gen), dim=1)[:, :top_k].int()
    return torch.rand(t, top_k, generator=gen) + 0.1, ids


def _fused_call(x, weights, ids, experts: dict, activation="silu", expert_map=None,
                poison_out=True) -> FusedCall:
    """A FusedCall validated by fused_moe's own checks, on DEVICE; out poisoned with NaN."""
    move = {k: v.to(DEVICE) for k, v in experts.items()}
    expert_map = None if expert_map is None else expert_map.to(DEVICE)
    x, weights, ids = x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE)
    fields = _fused_args(x, move["w13"], move["w2"], weights, ids, activation,
                         move.get("w13_scale"), move.get("w2_scale"), move.get("w13_zeros"),
                         move.get("w2_zeros"), expert_map)
    out = torch.full(x.shape, float("nan") if poison_out else 0.0, dtype=x.dtype, device=DEVICE)
    return FusedCall(x, move["w13"], move["w2"], weights, ids, activation, fields["quant"],
                     move.get("w13_scale"), move.get("w2_scale"), move.get("w13_zeros"),
                     move.get("w2_zeros"), fields["group13"], fields["group2"],
                     fields["expert_map"], out)


def _check_fused(call: FusedCall, config: dict | None, tol: float) -> None:
    cfg = config if config is not None else _triton.configs(problem_of(call))[0]
    _triton.run(call, cfg)
    cpu = FusedCall(*(v.cpu() if isinstance(v, torch.Tensor) else v
                      for v in vars(call).values()))
    want = ref.fused(cpu)
    assert not torch.isnan(call.out).any(), "unwritten or NaN output rows"
    assert compare("out", call.out, want, tol) is None, compare("out", call.out, want, tol)


def _poison_workspaces(monkeypatch) -> None:
    """Every scratch tensor of the kernels starts as garbage: NaN floats, -7 ints (a read
    before a write shows as NaN output or an out-of-bounds index)."""
    real = _triton._workspace

    def poisoned(shape, dtype, device):
        t = real(shape, dtype, device)
        return t.fill_(-7) if dtype in (torch.int32, torch.int64) else t.fill_(float("nan"))

    monkeypatch.setattr(_triton, "_workspace", poisoned)


FUSED_CASES = {
    # name: (T, H, I, E, top_k, dtype, activation, expert_map, same experts for all)
    "t0": (0, 64, 32, 8, 2, torch.bfloat16, "silu", False, False),
    "t1-top1": (1, 64, 32, 8, 1, torch.bfloat16, "silu", False, False),
    "t3-fp16": (3, 48, 32, 8, 2, torch.float16, "silu", False, False),
    "t37-e64-top8-ep": (37, 64, 32, 64, 8, torch.bfloat16, "silu", True, False),
    "t37-top1-ep": (37, 64, 32, 8, 1, torch.float16, "silu", True, False),
    "gelu": (37, 48, 32, 8, 2, torch.bfloat16, "gelu", False, False),
    "gelu-tanh-fp16": (37, 64, 32, 8, 2, torch.float16, "gelu_tanh", False, False),
    "one-expert-takes-all": (37, 64, 32, 8, 1, torch.bfloat16, "silu", False, True),
    "two-experts-take-all": (37, 64, 32, 8, 2, torch.float16, "silu", False, True),
}


@pytest.mark.parametrize("case", list(FUSED_CASES), ids=list(FUSED_CASES))
def test_fused_matches_reference(case, monkeypatch):
    t, h, i, e, top_k, dtype, act, with_map, same = FUSED_CASES[case]
    gen = _gen(t + e)
    expert_map, local = _quarter_map(e, gen) if with_map else (None, e)
    weights, ids = _routing(t, t, e, top_k, same=same)
    x = torch.randn(t, h, generator=gen).to(dtype)
    _poison_workspaces(monkeypatch)
    call = _fused_call(x, weights, ids, _experts(e, local, h, i, "none", dtype), act, expert_map)
    _check_fused(call, None, TOLERANCE[dtype])


@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_without_local_pairs_writes_zeros(top_k, monkeypatch):
    """No pair's expert is on this rank: every row of out is written, as zeros."""
    t, h, i, e = 9, 64, 32, 8
    weights, ids = _routing(15, t, e, top_k)
    expert_map = torch.full((e,), -1, dtype=torch.int32)
    x = torch.randn(t, h, generator=_gen(16)).to(torch.bfloat16)
    _poison_workspaces(monkeypatch)
    call = _fused_call(x, weights, ids, _experts(17, 2, h, i, "none", torch.bfloat16),
                       expert_map=expert_map)
    _triton.run(call, _triton.configs(problem_of(call))[0])
    assert (call.out == 0).all()


def test_fused_every_config():
    """Every config configs() lists (shrunk to the problem), both partial dtypes."""
    t, h, i, e, top_k, dtype = 21, 64, 48, 8, 2, torch.bfloat16
    gen = _gen(21)
    weights, ids = _routing(2, t, e, top_k)
    x = torch.randn(t, h, generator=gen).to(dtype)
    experts = _experts(3, e, h, i, "none", dtype)
    probe = _fused_call(x, weights, ids, experts)
    for config in _triton.configs(problem_of(probe)):
        tol = (TOLERANCE if config["PARTIAL_FP32"] else PARTIAL_TOLERANCE)[dtype]
        _check_fused(_fused_call(x, weights, ids, experts), config, tol)


def test_fused_fp16_partials_in_x_dtype():
    t, h, i, e, top_k, dtype = 37, 64, 32, 8, 4, torch.float16
    weights, ids = _routing(12, t, e, top_k)
    x = torch.randn(t, h, generator=_gen(13)).to(dtype)
    call = _fused_call(x, weights, ids, _experts(14, e, h, i, "none", dtype))
    config = _triton.configs(problem_of(call))[0] | dict(PARTIAL_FP32=False)
    _check_fused(call, config, PARTIAL_TOLERANCE[dtype])


def test_fused_reads_strided_x():
    """x with a row stride wider than H (a column slice): rows read through the stride."""
    t, h, i, e, top_k = 37, 64, 32, 8, 2
    gen = _gen(4)
    # Made on DEVICE before slicing: moving the slice there would copy it contiguous.
    wide = torch.randn(t, h + 24, generator=gen).to(DEVICE, torch.bfloat16)
    weights, ids = _routing(5, t, e, top_k)
    call = _fused_call(wide[:, 8:8 + h], weights, ids,
                       _experts(6, e, h, i, "none", torch.bfloat16))
    assert call.x.stride(0) == h + 24
    _check_fused(call, None, TOLERANCE[torch.bfloat16])


FP8_CASES = {
    "t3": (3, 64, 8, 2, False),
    "t37-top2": (37, 64, 8, 2, False),
    "t37-e64-top8-ep": (37, 48, 64, 8, True),
}


@pytest.mark.parametrize("case", list(FP8_CASES), ids=list(FP8_CASES))
def test_fused_fp8_matches_reference(case, monkeypatch):
    t, h, e, top_k, with_map = FP8_CASES[case]
    i = 128  # I must be a multiple of the 128-column scale block
    gen = _gen(t + h)
    expert_map, local = _quarter_map(e, gen) if with_map else (None, e)
    weights, ids = _routing(t, t, e, top_k)
    x = (torch.randn(t, h, generator=gen) * torch.exp(torch.randn(t, 1, generator=gen))).to(
        torch.bfloat16)
    _poison_workspaces(monkeypatch)
    call = _fused_call(x, weights, ids, _experts(e, local, h, i, "fp8", torch.bfloat16),
                       "silu", expert_map)
    _check_fused(call, None, FP8_TOLERANCE)


@pytest.mark.parametrize("group,zero_point", [(32, True), (-1, False), (64, False)],
                         ids=["g32-zp", "per-channel-sym", "g64-sym"])
def test_fused_int4_matches_reference(group, zero_point, monkeypatch):
    t, h, i, e, top_k = 37, 64, 64, 8, 2
    dtype = torch.float16 if zero_point else torch.bfloat16
    gen = _gen(group)
    weights, ids = _routing(7, t, e, top_k)
    x = torch.randn(t, h, generator=gen).to(dtype)
    _poison_workspaces(monkeypatch)
    call = _fused_call(x, weights, ids, _experts(8, e, h, i, "int4", dtype, group, zero_point))
    _check_fused(call, None, TOLERANCE[dtype])


def test_configs_and_supports():
    decode = Problem.of(torch.device(DEVICE), torch.bfloat16, t=32, h=2048, i=768, e=128,
                        e_global=128, top_k=8, quant="none", activation="silu", ep=False)
    prefill = Problem.of(torch.device(DEVICE), torch.bfloat16, t=4096, h=4096, i=14336, e=8,
                         e_global=8, top_k=2, quant="fp8", activation="silu", ep=False)
    assert _triton.configs(decode)[0]["BLOCK_M"] == 16
    # Qwen3-30B-A3B's prefill shape, 256 pairs per expert: bf16 takes the 128-row tiles (an
    # H100 measured them 1.18x faster there), fp8 keeps its medium ones below 512.
    qwen = dict(t=4096, h=2048, i=768, e=128, e_global=128, top_k=8, activation="silu",
                ep=False)
    assert _triton.configs(Problem.of(torch.device(DEVICE), torch.bfloat16, quant="none",
                                      **qwen))[0]["BLOCK_M"] == 128
    assert _triton.configs(Problem.of(torch.device(DEVICE), torch.bfloat16, quant="fp8",
                                      **qwen))[0]["BLOCK_N2"] == 128
    first = _triton.configs(prefill)[0]
    assert first["BLOCK_N"] == 128 and first["BLOCK_K"] == 128  # one scale block per tile
    too_many = Problem.of(torch.device(DEVICE), torch.bfloat16, t=1, h=64, i=32, e=2048,
                          e_global=2048, top_k=2, quant="none", activation="silu", ep=False)
    assert any("2048" in r for r in _triton.supports(too_many))
    fp32 = Problem.of(torch.device(DEVICE), torch.float32, t=1, h=64, i=32, e=8, e_global=8,
                      top_k=2, quant="none", activation="silu", ep=False)
    assert _triton.supports(fp32)


# ---- through the public functions ------------------------------------------------------------

_REGISTERED = "triton" in {b.name for b in SPEC.backends}


@pytest.mark.skipif(not _REGISTERED, reason="kpt.ops.moe has not registered its triton "
                                            "backend yet")
@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_public_functions_run_the_triton_backend(quant):
    t, h, e, top_k = 37, 64, 16, 4
    i = 128 if quant == "fp8" else 32
    gen = _gen(9)
    logits = torch.randn(t, e, generator=gen).to(DEVICE)
    weights, ids = moe_route(logits, top_k, scoring="sigmoid", num_expert_groups=4,
                             topk_groups=2, backend="triton")
    want_w, want_ids = moe_route(logits, top_k, scoring="sigmoid", num_expert_groups=4,
                                 topk_groups=2, backend="reference")
    torch.testing.assert_close(ids, want_ids, rtol=0, atol=0)
    x = torch.randn(t, h, generator=gen).to(DEVICE, torch.bfloat16)
    experts = {k: v.to(DEVICE) for k, v in _experts(10, e, h, i, quant, torch.bfloat16).items()}
    w13, w2 = experts.pop("w13"), experts.pop("w2")
    y = fused_moe(x, w13, w2, weights, ids, backend="triton", **experts)
    want = fused_moe(x, w13, w2, weights, ids, backend="reference", **experts)
    tol = FP8_TOLERANCE if quant == "fp8" else TOLERANCE[torch.bfloat16]
    assert compare("out", y, want, tol) is None
