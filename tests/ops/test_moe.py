"""moe_route / fused_moe / align: the reference against an independent float64 oracle (plain
Python routing, per-pair expert products); every routing option alone and combined, ties;
T = 0, 1, 3, 257, E = 8 .. 256, top_k 1, 2, 8; empty experts and one expert taking all; fp8
block-scaled and int4 experts against their dequantised products; expert_map with a quarter
of the experts local; alignment invariants; gradients; torch.compile; bad input. Every kernel
backend that can run here (Triton under the interpreter on the CPU; CUDA and Triton on a GPU)
is checked against the reference on the same cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kpt.ops import fused_moe, moe_route, pack_int4, quantize_fp8
from kpt.ops._common import compare
from kpt.ops.moe import ROUTE_SPEC, SPEC, align, capacity, reference
from tests.ops.rejects import assert_rejected_before_launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DTYPE_IDS = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}
# fused_moe against float64: the intermediate activations are rounded to x's dtype (half a
# unit: bf16 2^-9, fp16 2^-12 relative) and so is the output; the float32 sums add ~1e-6.
# Norm-wise the error stays below one unit of the dtype; fp32 has no intermediate rounding.
TOLERANCE = {BF16: 2**-8, FP16: 2**-11, FP32: 1e-5}
# A kernel against the reference: the same rounding points, float32 sums in another order;
# an intermediate value straddling a rounding boundary differs by one unit, which the down
# product averages: one unit norm-wise (bf16 2^-8, fp16 2^-10 with fp16's smaller headroom).
KERNEL_TOLERANCE = {BF16: 2**-7, FP16: 2**-9, FP32: 1e-5}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- routing ---------------------------------------------------------------------------------


def _oracle_route(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool,
                  groups: int, topk_groups: int, bias: torch.Tensor | None, scaling: float):
    """Plain-Python float64 routing, written from the docstring's rules."""
    weights, ids = [], []
    for row in logits.double().tolist():
        if scoring == "softmax":
            peak = max(row)
            exps = [math.exp(v - peak) for v in row]
            s = [v / sum(exps) for v in exps]
        else:
            s = [1 / (1 + math.exp(-v)) for v in row]
        sel = [v + (0.0 if bias is None else float(bias[j])) for j, v in enumerate(s)]
        e = len(row)
        kept = set(range(e))
        if groups > 1:
            per = e // groups
            score = [sum(sorted(sel[g * per:(g + 1) * per], reverse=True)[:2])
                     for g in range(groups)]
            best = sorted(range(groups), key=lambda g: (-score[g], g))[:topk_groups]
            kept = {j for g in best for j in range(g * per, (g + 1) * per)}
        chosen = sorted(kept, key=lambda j: (-sel[j], j))[:top_k]
        w = [s[j] for j in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append([v * scaling for v in w])
        ids.append(chosen)
    return (torch.tensor(weights, dtype=torch.float64).reshape(-1, top_k),
            torch.tensor(ids, dtype=torch.int64).reshape(-1, top_k))


ROUTINGS = {
    "softmax": dict(),
    "softmax-raw": dict(renormalize=False),
    "sigmoid": dict(scoring="sigmoid"),
    "bias": dict(scoring="sigmoid", correction_bias=True),
    "grouped": dict(num_expert_groups=4, topk_groups=2),
    "scaled": dict(routed_scaling_factor=2.5, renormalize=False),
    "deepseek-v3": dict(scoring="sigmoid", correction_bias=True, num_expert_groups=8,
                        topk_groups=4, routed_scaling_factor=2.5),
}
SHAPES = [(0, 8, 2), (1, 8, 1), (3, 64, 8), (257, 128, 8), (5, 256, 8), (17, 64, 2)]


def _route_args(name: str, t: int, e: int, k: int, seed: int, device: str = "cpu",
                dtype: torch.dtype = FP32):
    opts = dict(ROUTINGS[name])
    gen = _gen(seed)
    logits = (torch.randn(t, e, generator=gen) * 2).to(dtype).to(device)
    if opts.pop("correction_bias", False):
        opts["correction_bias"] = (torch.randn(e, generator=gen) * 0.1).to(device)
    groups = opts.get("num_expert_groups")
    if groups and (e % groups or k > opts["topk_groups"] * e // groups):
        opts["num_expert_groups"] = opts["topk_groups"] = None
    return logits, opts


def _oracle_of(logits, k, opts):
    return _oracle_route(logits.float().cpu(), k, opts.get("scoring", "softmax"),
                         opts.get("renormalize", True), opts.get("num_expert_groups") or 1,
                         opts.get("topk_groups") or 1,
                         None if opts.get("correction_bias") is None
                         else opts["correction_bias"].cpu(),
                         opts.get("routed_scaling_factor", 1.0))


@pytest.mark.parametrize("name", list(ROUTINGS))
@pytest.mark.parametrize("t,e,k", SHAPES, ids=[f"T{t}-E{e}-k{k}" for t, e, k in SHAPES])
def test_reference_route_matches_the_float64_oracle(name, t, e, k):
    logits, opts = _route_args(name, t, e, k, seed=t * 7 + e + k)
    weights, ids = moe_route(logits, k, backend="reference", **opts)
    want_w, want_ids = _oracle_of(logits, k, opts)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert weights.shape == ids.shape == (t, k)
    # Random float32 scores are far apart (no near ties at these sizes): the same experts.
    assert torch.equal(ids.long(), want_ids)
    # float32 softmax / sigmoid and a sum of <= 8 terms: a few float32 units.
    torch.testing.assert_close(weights.double(), want_w, rtol=1e-6, atol=1e-7)


def test_route_ties_go_to_the_lower_expert_and_group():
    # Integer logits with many equal values: equal scores, so only the tie rule decides.
    gen = _gen(3)
    logits = torch.randint(-2, 3, (64, 32), generator=gen).float()
    for opts in (dict(), dict(scoring="sigmoid"), dict(num_expert_groups=8, topk_groups=3),
                 dict(scoring="sigmoid", num_expert_groups=4, topk_groups=2,
                      correction_bias=torch.zeros(32))):
        for k in (1, 2, 8):
            _, ids = moe_route(logits, k, backend="reference", **opts)
            _, want = _oracle_of(logits, k, opts)
            assert torch.equal(ids.long(), want), opts
    # All equal: experts 0..k-1, in order.
    _, ids = moe_route(torch.zeros(3, 16) + 1.5, 4, backend="reference")
    assert ids.tolist() == [[0, 1, 2, 3]] * 3


def test_grouped_route_never_leaves_the_kept_groups():
    # Group 0 holds the two best experts; group 1 holds an expert nearly as good as them and
    # then -inf experts; with topk_groups = 1 only group 0's experts may be chosen, even when
    # top_k asks for all of its experts.
    logits = torch.full((1, 8), -30.0)
    logits[0, 0], logits[0, 1], logits[0, 4] = 5.0, 4.0, 4.5
    _, ids = moe_route(logits, 4, num_expert_groups=2, topk_groups=1, backend="reference")
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3]
    _, ids = moe_route(logits, 2, backend="reference")
    assert ids[0].tolist() == [0, 4]


def test_route_nan_never_wins_and_propagates():
    logits = torch.randn(4, 16, generator=_gen(4))
    logits[1, 3] = float("nan")
    weights, ids = moe_route(logits, 4, scoring="sigmoid", renormalize=False,
                             backend="reference")
    assert 3 not in ids[1].tolist() and ((ids >= 0) & (ids < 16)).all()
    assert torch.isfinite(weights).all()  # sigmoid: the NaN stays in its own expert
    weights, ids = moe_route(logits, 4, backend="reference")  # softmax spreads it over row 1
    assert torch.isnan(weights[1]).all() and torch.isfinite(weights[[0, 2, 3]]).all()
    assert ((ids >= 0) & (ids < 16)).all()


def test_route_gradient_matches_autograd_through_the_oracle_formula():
    gen = _gen(5)
    logits = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    for opts in (dict(), dict(renormalize=False, routed_scaling_factor=2.0),
                 dict(scoring="sigmoid", correction_bias=torch.randn(16, generator=gen))):
        lg = logits.float().clone().requires_grad_(True)
        weights, ids = moe_route(lg, 3, backend="reference", **opts)
        dw = torch.randn(weights.shape, generator=gen)
        (weights * dw).sum().backward()
        z = logits.clone().requires_grad_(True)
        s = z.softmax(-1) if opts.get("scoring", "softmax") == "softmax" else z.sigmoid()
        w = s.gather(1, ids.long())
        if opts.get("renormalize", True):
            w = w / w.sum(-1, keepdim=True)
        (w * opts.get("routed_scaling_factor", 1.0) * dw.double()).sum().backward()
        torch.testing.assert_close(lg.grad.double(), z.grad, rtol=1e-5, atol=1e-6)


# ---- experts ---------------------------------------------------------------------------------


def _experts(seed: int, t: int, h: int, i: int, e: int, k: int, dtype: torch.dtype,
             device: str = "cpu", ids_mode: str = "random"):
    """x, w13, w2 (scaled so the hidden values are O(1)), routing weights and ids."""
    gen = _gen(seed)
    x = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * i, h, generator=gen) / math.sqrt(h)
    w2 = torch.randn(e, h, i, generator=gen) / math.sqrt(i)
    weights = torch.rand(t, k, generator=gen) + 0.1
    if ids_mode == "one":  # every pair to expert e - 1; k distinct slots impossible: repeat
        ids = torch.full((t, k), e - 1)
    elif ids_mode == "few":  # most experts get nothing
        ids = torch.randint(0, min(e, 3), (t, k), generator=gen)
    else:
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else \
            torch.empty(0, k, dtype=torch.int64)
    to = lambda v, d=None: v.to(device=device, dtype=d or v.dtype)  # noqa: E731
    return (to(x, dtype), to(w13, dtype), to(w2, dtype), to(weights),
            to(ids.to(torch.int32)))


def _oracle_moe(x, w13, w2, weights, ids, activation="silu", round_to=None,
                expert_map=None) -> torch.Tensor:
    """float64 per pair, from the docstring: y[t] = sum_j w * W2 (act(W1 x) * W3 x)."""
    x, w13, w2, weights = (v.double().cpu() for v in (x, w13, w2, weights))
    i = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            hid = w13[e] @ x[t]
            gate = hid[:i]
            act = {"silu": F.silu(gate), "gelu": F.gelu(gate),
                   "gelu_tanh": F.gelu(gate, approximate="tanh")}[activation]
            a = act * hid[i:]
            if round_to is not None:
                a = a.to(round_to).double()
            out[t] += weights[t, j] * (w2[e] @ a)
    return out


EXPERT_SHAPES = [  # t, h, i, e, k
    (0, 32, 16, 8, 2), (1, 48, 24, 8, 1), (3, 40, 16, 64, 8), (257, 32, 16, 8, 2),
    (5, 32, 8, 256, 8), (37, 24, 40, 128, 8),
]


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("t,h,i,e,k", EXPERT_SHAPES,
                         ids=[f"T{s[0]}-H{s[1]}-I{s[2]}-E{s[3]}-k{s[4]}" for s in EXPERT_SHAPES])
def test_reference_matches_float64(dtype, t, h, i, e, k):
    x, w13, w2, weights, ids = _experts(t + e, t, h, i, e, k, dtype)
    out = fused_moe(x, w13, w2, weights, ids, backend="reference")
    assert out.shape == (t, h) and out.dtype == dtype
    want = _oracle_moe(x, w13, w2, weights, ids)
    assert compare("out", out, want, TOLERANCE[dtype]) is None, compare("out", out, want,
                                                                        TOLERANCE[dtype])


def test_reference_in_float64_is_the_oracle():
    """With float64 inputs nothing rounds: the reference is the formula to 1e-12."""
    x, w13, w2, weights, ids = _experts(1, 9, 24, 16, 8, 2, torch.float64)
    for activation in ("silu", "gelu", "gelu_tanh"):
        out = reference.fused(_call(x, w13, w2, weights, ids, activation))
        want = _oracle_moe(x, w13, w2, weights, ids, activation)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def _call(x, w13, w2, weights, ids, activation="silu", expert_map=None):
    from kpt.ops.moe import FusedCall

    return FusedCall(x, w13, w2, weights, ids, activation, "none", None, None, None, None, 0,
                     0, expert_map, torch.empty_like(x))


@pytest.mark.parametrize("mode", ["one", "few"])
def test_empty_experts_and_one_expert_taking_everything(mode):
    x, w13, w2, weights, ids = _experts(2, 33, 32, 16, 64, 8, BF16, ids_mode=mode)
    out = fused_moe(x, w13, w2, weights, ids, backend="reference")
    want = _oracle_moe(x, w13, w2, weights, ids)
    assert compare("out", out, want, TOLERANCE[BF16]) is None


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_activations(activation):
    x, w13, w2, weights, ids = _experts(3, 11, 32, 24, 8, 2, BF16)
    out = fused_moe(x, w13, w2, weights, ids, activation=activation, backend="reference")
    want = _oracle_moe(x, w13, w2, weights, ids, activation)
    assert compare("out", out, want, TOLERANCE[BF16]) is None


def _quarter_map(e_global: int, seed: int) -> torch.Tensor:
    """A quarter of the global experts are local (in a shuffled order), the rest -1."""
    perm = torch.randperm(e_global, generator=_gen(seed))
    local = perm[: e_global // 4]
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[local] = torch.arange(local.numel(), dtype=torch.int32)
    return expert_map


def test_expert_map_keeps_the_local_quarter():
    e_global = 32
    x, w13_all, w2_all, weights, ids = _experts(4, 29, 32, 16, e_global, 4, BF16)
    expert_map = _quarter_map(e_global, 5)
    local = torch.nonzero(expert_map >= 0).flatten()
    order = expert_map[local].argsort()
    w13, w2 = w13_all[local[order]], w2_all[local[order]]
    out = fused_moe(x, w13, w2, weights, ids, expert_map=expert_map, backend="reference")
    want = _oracle_moe(x, w13, w2, weights, ids, expert_map=expert_map)
    assert compare("out", out, want, TOLERANCE[BF16]) is None
    # The sum over ranks of the partial outputs is the whole layer.
    total = torch.zeros(x.shape, dtype=torch.float64)
    for shift in range(4):
        emap = torch.roll(torch.arange(e_global) // 8 == shift, 0)
        m = torch.where(emap, torch.arange(e_global) % 8, -1).to(torch.int32)
        ranks = torch.nonzero(m >= 0).flatten()
        total += fused_moe(x, w13_all[ranks], w2_all[ranks], weights, ids, expert_map=m,
                           backend="reference").double()
    full = fused_moe(x, w13_all, w2_all, weights, ids, backend="reference").double()
    # Four bf16-rounded partial sums against one: a few bf16 units.
    assert compare("ranks", total, full, 2**-7) is None


def test_fp8_experts_against_their_dequantised_product():
    t, h, i, e, k = 19, 256, 128, 8, 2
    x, w13, w2, weights, ids = _experts(6, t, h, i, e, k, FP32)
    q13 = [quantize_fp8(w, "block", block=(128, 128)) for w in w13]
    q2 = [quantize_fp8(w, "block", block=(128, 128)) for w in w2]
    w13_8, s13 = torch.stack([q[0] for q in q13]), torch.stack([q[1] for q in q13])
    w2_8, s2 = torch.stack([q[0] for q in q2]), torch.stack([q[1] for q in q2])
    xb = x.to(BF16)
    out = fused_moe(xb, w13_8, w2_8, weights, ids, w13_scale=s13, w2_scale=s2,
                    backend="reference")
    # The spec's rounding points exactly: x and the intermediate quantised 1x128 to e4m3.
    deq = lambda w8, s: w8.double() * s.double().repeat_interleave(128, 0)[:w8.shape[0]] \
        .repeat_interleave(128, 1)[:, :w8.shape[1]]  # noqa: E731
    w13_d = torch.stack([deq(a, b) for a, b in zip(w13_8, s13)])
    w2_d = torch.stack([deq(a, b) for a, b in zip(w2_8, s2)])
    x8, xs = quantize_fp8(xb, "block")
    x_d = x8.double() * xs.double().repeat_interleave(128, 1)[:, :h]
    # Only the intermediate's e4m3 quantisation is missing from this oracle: it rounds each
    # value by up to 2^-4 (rms ~2^-6), averaged over I = 128 products: within 2^-4.
    want = _oracle_moe(x_d, w13_d, w2_d, weights, ids, round_to=BF16)
    assert compare("fp8", out, want, 2**-4) is None
    # And against the unquantised bf16 experts: the e4m3 rounding of x, weights and the
    # intermediate, ~2^-5 norm-wise.
    assert compare("fp8 vs bf16", out, _oracle_moe(xb, w13, w2, weights, ids), 2**-3) is None


@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False), (-1, False)])
def test_int4_experts_against_their_dequantised_product(group, symmetric):
    t, h, i, e, k = 13, 128, 64, 8, 2
    x, w13, w2, weights, ids = _experts(7, t, h, i, e, k, BF16)
    p13 = [pack_int4(w.float(), group, symmetric) for w in w13]
    p2 = [pack_int4(w.float(), group, symmetric) for w in w2]
    stack = lambda ps, n: None if ps[0][n] is None else torch.stack([p[n] for p in ps])  # noqa
    out = fused_moe(x, stack(p13, 0), stack(p2, 0), weights, ids, w13_scale=stack(p13, 1),
                    w2_scale=stack(p2, 1), w13_zeros=stack(p13, 2), w2_zeros=stack(p2, 2),
                    backend="reference")
    from kpt.ops import dequantize_int4

    g13, g2 = (h if group == -1 else group), (i if group == -1 else group)
    w13_d = torch.stack([dequantize_int4(*p, group_size=g13, dtype=BF16) for p in p13])
    w2_d = torch.stack([dequantize_int4(*p, group_size=g2, dtype=BF16) for p in p2])
    want = _oracle_moe(x, w13_d, w2_d, weights, ids, round_to=BF16)
    assert compare("int4", out, want, TOLERANCE[BF16]) is None


# ---- alignment -------------------------------------------------------------------------------


@pytest.mark.parametrize("t,e,k,block_m", [(0, 8, 2, 16), (1, 8, 1, 16), (37, 64, 8, 16),
                                           (257, 8, 2, 64), (5, 256, 8, 32)])
@pytest.mark.parametrize("ep", [False, True], ids=["all-local", "quarter-local"])
def test_align_invariants(t, e, k, block_m, ep):
    gen = _gen(t + e)
    ids = torch.randint(0, e, (t, k), generator=gen, dtype=torch.int32)
    expert_map = _quarter_map(e, t) if ep else None
    e_local = e // 4 if ep else e
    al = align(ids, e_local, block_m, expert_map)
    cap = capacity(t * k, e_local, block_m)
    assert al.sorted_pairs.shape == (cap,) and al.block_expert.shape == (cap // block_m,)
    used = int(al.num_padded)
    assert used % block_m == 0 and used <= cap
    local = ids.long().flatten() if expert_map is None else expert_map.long()[ids.long()].flatten()
    pairs = al.sorted_pairs[:used].long()
    sentinel = t * k
    assert (al.sorted_pairs[used:] == sentinel).all()
    assert (al.block_expert[used // block_m:] == -1).all()
    seen = []
    for b in range(used // block_m):
        block = pairs[b * block_m:(b + 1) * block_m]
        real = block[block != sentinel]
        assert real.numel() > 0
        expert = int(al.block_expert[b])
        assert (local[real] == expert).all()
        seen.append(real)
    seen = torch.cat(seen) if seen else torch.empty(0, dtype=torch.long)
    want = torch.nonzero(local >= 0).flatten()
    assert torch.equal(torch.sort(seen).values, want)  # every local pair exactly once
    # Experts ascending, pairs ascending inside an expert.
    key = local[seen] * (sentinel + 1) + seen
    assert (key[1:] > key[:-1]).all()


# ---- gradients, compile ----------------------------------------------------------------------


def test_gradients_match_the_float64_oracle():
    t, h, i, e, k = 11, 24, 16, 8, 3
    x, w13, w2, weights, ids = _experts(8, t, h, i, e, k, torch.float64)
    leaves = [v.float().clone().requires_grad_(True) for v in (x, w13, w2, weights)]
    out = fused_moe(*leaves, ids)
    dout = torch.randn(out.shape, generator=_gen(9))
    (out * dout).sum().backward()
    ref = [v.clone().requires_grad_(True) for v in (x, w13, w2, weights)]
    (_oracle_moe_graph(*ref, ids) * dout.double()).sum().backward()
    for name, got, want in zip(("x", "w13", "w2", "weights"), leaves, ref):
        # float32 recomputation: ~1e-6 relative norm-wise.
        assert compare(name, got.grad, want.grad, 1e-5) is None, (name, compare(
            name, got.grad, want.grad, 1e-5))


def _oracle_moe_graph(x, w13, w2, weights, ids):
    i = w2.shape[2]
    rows = []
    for t in range(x.shape[0]):
        acc = 0
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            hid = w13[e] @ x[t]
            acc = acc + weights[t, j] * (w2[e] @ (F.silu(hid[:i]) * hid[i:]))
        rows.append(acc)
    return torch.stack(rows)


def test_bf16_gradients_flow_to_every_input_and_match_float32():
    x, w13, w2, weights, ids = _experts(10, 21, 32, 16, 16, 2, BF16)
    outs = []
    for dtype in (BF16, FP32):
        leaves = [v.to(dtype).clone().requires_grad_(True) for v in (x, w13, w2, weights)]
        fused_moe(*leaves[:3], leaves[3], ids).float().square().sum().backward()
        outs.append([v.grad.float() for v in leaves])
    for name, got, want in zip(("x", "w13", "w2", "weights"), *outs):
        # bf16 matmuls in the recomputation: a few bf16 units norm-wise.
        assert compare(name, got, want, 2**-5) is None, (name, compare(name, got, want, 2**-5))


def test_quantised_experts_refuse_gradients():
    t, h, i, e, k = 3, 128, 128, 2, 1
    x, w13, w2, weights, ids = _experts(11, t, h, i, e, k, BF16)
    w13_8, s13 = zip(*[quantize_fp8(w, "block", block=(128, 128)) for w in w13])
    w2_8, s2 = zip(*[quantize_fp8(w, "block", block=(128, 128)) for w in w2])
    args = (torch.stack(w13_8), torch.stack(w2_8), weights, ids)
    kw = dict(w13_scale=torch.stack(s13), w2_scale=torch.stack(s2))
    with pytest.raises(ValueError, match="fused_moe: fp8 experts are inference only"):
        fused_moe(x.requires_grad_(True), *args, **kw)
    with torch.no_grad():
        assert fused_moe(x, *args, **kw).shape == (t, h)


def test_torch_compile_fullgraph():
    x, w13, w2, _, _ = _experts(12, 9, 32, 16, 8, 2, FP32)
    router = torch.randn(8, 32, generator=_gen(13))

    def layer(x):
        weights, ids = moe_route(x @ router.T, 2)
        return fused_moe(x, w13, w2, weights, ids) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_nan_poisoned_inputs_stay_in_their_rows():
    """A NaN token poisons its own output row only; NaN weights of unused experts (no pair
    routes to them) are never read."""
    x, w13, w2, weights, ids = _experts(14, 7, 32, 16, 8, 2, BF16, ids_mode="few")
    x[4, 5] = float("nan")
    w13[7] = float("nan")  # expert 7 receives nothing ("few": ids < 3)
    w2[6] = float("nan")
    out = fused_moe(x, w13, w2, weights, ids, backend="reference")
    assert torch.isnan(out[4]).all() and torch.isfinite(out[[0, 1, 2, 3, 5, 6]]).all()


# ---- kernel backends against the reference ---------------------------------------------------


def _runnable(spec, problem) -> list[str]:
    return [b.name for b in spec.backends
            if b.name != "reference" and not spec.reasons(b, problem)]


def _kernels() -> list[str]:
    x, w13, w2, weights, ids = _experts(0, 3, 32, 16, 8, 2, BF16, DEVICE)
    from kpt.ops.moe import problem_of

    return _runnable(SPEC, problem_of(_call(x, w13, w2, weights, ids)))


def _route_kernels() -> list[str]:
    from kpt.ops.moe import RouteCall, route_problem

    logits = torch.randn(3, 8, device=DEVICE)
    call = RouteCall(logits, 2, "softmax", True, 1, 1, None, 1.0, logits, logits)
    return _runnable(ROUTE_SPEC, route_problem(call))


KERNELS = _kernels()
ROUTE_KERNELS = _route_kernels()
KERNEL_CASES = [  # t, h, i, e, k, dtype, ids mode, activation
    (1, 64, 32, 8, 2, BF16, "random", "silu"), (3, 48, 40, 64, 8, FP16, "random", "gelu"),
    (37, 64, 32, 128, 8, BF16, "few", "silu"), (33, 32, 16, 8, 2, BF16, "one", "gelu_tanh"),
    (257, 128, 64, 16, 2, BF16, "random", "silu"), (0, 32, 16, 8, 2, BF16, "random", "silu"),
]


def _skip_without(kernels: list[str]) -> None:
    if not kernels:
        pytest.skip("no kernel backend can run here (reasons: python -m kpt.info)")


@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
@pytest.mark.parametrize("backend", KERNELS or ["none"])
def test_kernels_match_reference(backend, case):
    _skip_without(KERNELS)
    t, h, i, e, k, dtype, mode, activation = KERNEL_CASES[case]
    x, w13, w2, weights, ids = _experts(case, t, h, i, e, k, dtype, DEVICE, mode)
    got = fused_moe(x, w13, w2, weights, ids, activation=activation, backend=backend)
    want = fused_moe(x, w13, w2, weights, ids, activation=activation, backend="reference")
    reason = compare("out", got, want.float(), KERNEL_TOLERANCE[dtype])
    assert reason is None, reason


@pytest.mark.parametrize("backend", KERNELS or ["none"])
def test_kernels_expert_map(backend):
    _skip_without(KERNELS)
    e_global = 64
    x, w13_all, w2_all, weights, ids = _experts(20, 45, 64, 32, e_global, 8, BF16, DEVICE)
    expert_map = _quarter_map(e_global, 21).to(DEVICE)
    local = torch.nonzero(expert_map >= 0).flatten()
    order = expert_map[local].argsort()
    w13, w2 = w13_all[local[order]], w2_all[local[order]]
    got = fused_moe(x, w13, w2, weights, ids, expert_map=expert_map, backend=backend)
    want = fused_moe(x, w13, w2, weights, ids, expert_map=expert_map, backend="reference")
    assert compare("out", got, want.float(), KERNEL_TOLERANCE[BF16]) is None


@pytest.mark.parametrize("name", list(ROUTINGS))
@pytest.mark.parametrize("backend", ROUTE_KERNELS or ["none"])
def test_route_kernels_match_reference(backend, name):
    _skip_without(ROUTE_KERNELS)
    for t, e, k in SHAPES:
        for dtype in (FP32, BF16):
            logits, opts = _route_args(name, t, e, k, t + e, DEVICE, dtype)
            weights, ids = moe_route(logits, k, backend=backend, **opts)
            want_w, want_ids = moe_route(logits, k, backend="reference", **opts)
            assert torch.equal(ids, want_ids), (t, e, k, dtype)
            torch.testing.assert_close(weights, want_w, rtol=1e-5, atol=1e-6)


# ---- bad input -------------------------------------------------------------------------------


def _good_fused() -> dict:
    x, w13, w2, weights, ids = _experts(30, 5, 32, 16, 8, 2, BF16)
    return dict(x=x, w13=w13, w2=w2, weights=weights, ids=ids)


BAD_FUSED = {
    "x 3-D": (dict(x=torch.randn(1, 5, 32, dtype=BF16)), ValueError, "x must have 2 dims"),
    "x int": (dict(x=torch.ones(5, 32, dtype=torch.int32)), TypeError, "x must be one of"),
    "w13 dtype": (dict(w13=torch.randn(8, 32, 32, dtype=FP16)), TypeError, "w13 must be x's"),
    "w13 H": (dict(w13=torch.randn(8, 32, 24, dtype=BF16)), ValueError, "must be .E, 2I, H"),
    "w2 shape": (dict(w2=torch.randn(8, 32, 8, dtype=BF16)), ValueError, "w2 has shape"),
    "w2 dtype": (dict(w2=torch.randn(8, 32, 16, dtype=FP16)), TypeError, "w2 .* must have"),
    "ids rows": (dict(ids=torch.zeros(4, 2, dtype=torch.int32)), ValueError, "ids of shape"),
    "ids dtype": (dict(ids=torch.zeros(5, 2)), TypeError, "ids must be one of"),
    "ids range": (dict(ids=torch.full((5, 2), 8, dtype=torch.int32)), ValueError,
                  "ids must be experts 0..7"),
    "ids negative": (dict(ids=torch.full((5, 2), -1, dtype=torch.int32)), ValueError,
                     "ids must be experts"),
    "weights shape": (dict(weights=torch.rand(5, 3)), ValueError, "weights has shape"),
    "activation": (dict(activation="relu"), ValueError, "activation must be one of"),
    "scale on bf16": (dict(w13_scale=torch.ones(8, 1, 1)), ValueError, "w13_scale is for fp8"),
    "zeros on bf16": (dict(w2_zeros=torch.ones(8, 1, 1, dtype=torch.uint8)), ValueError,
                      "w2_zeros is for int4"),
    "map range": (dict(expert_map=torch.tensor([0, 1, 9, -1], dtype=torch.int32)),
                  ValueError, "expert_map values"),
    "backend": (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
}


@pytest.mark.parametrize("name", list(BAD_FUSED))
def test_fused_bad_input_is_rejected_before_launch(name, monkeypatch):
    override, error, text = BAD_FUSED[name]
    args = _good_fused() | override
    pos = [args.pop(n) for n in ("x", "w13", "w2", "weights", "ids")]
    assert_rejected_before_launch(monkeypatch, SPEC, "fused_moe", error, text,
                                  lambda: fused_moe(*pos, **args))


def test_fp8_and_int4_shape_rules():
    x = torch.randn(3, 64, dtype=BF16)
    w13 = torch.randn(2, 96, 64).to(torch.float8_e4m3fn)
    w2 = torch.randn(2, 64, 48).to(torch.float8_e4m3fn)
    ids, weights = torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1)
    with pytest.raises(ValueError, match="fp8 experts need I = 48 to be a multiple of 128"):
        fused_moe(x, w13, w2, weights, ids)
    w13 = torch.randn(2, 256, 64).to(torch.float8_e4m3fn)
    w2 = torch.randn(2, 64, 128).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="fp8 experts need w13_scale"):
        fused_moe(x, w13, w2, weights, ids)
    with pytest.raises(ValueError, match=r"w13_scale has shape \(2, 1, 1\)"):
        fused_moe(x, w13, w2, weights, ids, w13_scale=torch.ones(2, 1, 1),
                  w2_scale=torch.ones(2, 1, 1))
    packed13 = torch.zeros(2, 8, 64, dtype=torch.int32)
    packed2 = torch.zeros(2, 4, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="int4 experts need w13_scale"):
        fused_moe(x, packed13, packed2, weights, ids)
    with pytest.raises(ValueError, match="implies group size 16"):
        fused_moe(x, packed13, packed2, weights, ids, w13_scale=torch.ones(2, 4, 64),
                  w2_scale=torch.ones(2, 1, 64))


BAD_ROUTE = {
    "logits 1-D": (dict(logits=torch.randn(8)), ValueError, "logits must have 2 dims"),
    "logits int": (dict(logits=torch.ones(3, 8, dtype=torch.int64)), TypeError, "logits"),
    "top_k 0": (dict(top_k=0), ValueError, "top_k must be an int in 1 .. 8"),
    "top_k > E": (dict(top_k=9), ValueError, "top_k must be an int in 1 .. 8"),
    "scoring": (dict(scoring="relu"), ValueError, "scoring must be one of"),
    "renormalize": (dict(renormalize=1), TypeError, "renormalize must be a bool"),
    "groups alone": (dict(num_expert_groups=2), ValueError, "go together"),
    "groups divide": (dict(num_expert_groups=3, topk_groups=1), ValueError, "must divide"),
    "too few kept": (dict(top_k=4, num_expert_groups=4, topk_groups=1), ValueError,
                     "exceeds the 2 experts"),
    "bias shape": (dict(correction_bias=torch.randn(7)), ValueError, "correction_bias has 7"),
    "scaling": (dict(routed_scaling_factor=float("inf")), ValueError, "finite number"),
}


@pytest.mark.parametrize("name", list(BAD_ROUTE))
def test_route_bad_input_is_rejected_before_launch(name, monkeypatch):
    override, error, text = BAD_ROUTE[name]
    args = dict(logits=torch.randn(3, 8), top_k=2) | override
    logits, top_k = args.pop("logits"), args.pop("top_k")
    assert_rejected_before_launch(monkeypatch, ROUTE_SPEC, "moe_route", error, text,
                                  lambda: moe_route(logits, top_k, **args))


def test_align_rejects_bad_input():
    with pytest.raises(ValueError, match="moe.align: block_m"):
        align(torch.zeros(3, 2, dtype=torch.int32), 8, 0)
    with pytest.raises(TypeError, match="moe.align: ids must be one of"):
        align(torch.zeros(3, 2), 8, 16)
