"""Properties of the MoE ops on generated inputs (issue 27): ``moe_route``, ``fused_moe`` and
``kpt.ops.moe.align``.

* valid routing (softmax / sigmoid, grouped top-k, correction bias, scaling, T = 0, top_k up
  to E, logits as transposed, strided or stride-0 views): ids are the documented selection
  (descending score, ties to the lower id) computed here token by token, weights float64 math;
  every backend that can run the call and the default dispatch agree with the reference;
* valid experts (bf16 / fp16 / fp32, every activation, expert parallelism, one expert twice for
  a token, views): the reference equals float64 math with the documented intermediate
  rounding, and every runnable backend equals the reference;
* alignment: any ids and expert map give each local expert's pairs in order, padded with the
  sentinel, or a ValueError naming ``moe.align`` (ids out of range on the CPU, absurd sizes);
* invalid arguments: a ValueError / TypeError naming the op.
"""

from __future__ import annotations

import math

import torch
from hypothesis import event, given
from hypothesis import strategies as st

from kpt.ops import fused_moe, moe_route
from kpt.ops._common import compare
from kpt.ops.moe import (
    ROUTE_SPEC,
    SPEC,
    FusedCall,
    RouteCall,
    _fused_args,
    align,
    capacity,
    problem_of,
    route_problem,
)
from tests.property.strategies import (
    check_close,
    expect_named_error,
    named_error_or_result,
    props,
    random_tensor,
    seeds,
)

# Routing weights: float32 softmax / sigmoid of the same logits, gathered and divided in
# another order than float64 math: a few float32 ulps.
WEIGHTS_TOLERANCE = 1e-5
# fused_moe's reference against float64 math: the intermediate and the output are rounded to
# x's dtype at the same points (half a unit each) plus float32 sums: one unit norm-wise
# (bf16 2^-8, fp16 2^-11); fp32 rounds nothing but its sums.
REFERENCE_TOLERANCE = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 1e-5}
# A kernel against the reference: the same rounding points, float32 sums in another order; an
# intermediate value that straddles a rounding boundary lands one unit apart and the down
# product averages such steps: one unit norm-wise (fp16 two, for its smaller headroom).
KERNEL_TOLERANCE = {torch.bfloat16: 2**-7, torch.float16: 2**-9, torch.float32: 1e-5}


def runnable(spec, problem) -> list[str]:
    names = [b.name for b in spec.backends if not spec.reasons(b, problem)]
    assert "reference" in names, "the reference must run every valid call"
    return names


# ---- moe_route --------------------------------------------------------------------------------


def float64_route(logits, top_k, scoring, renormalize, groups, topk_groups, bias, scaling):
    s = logits.double().softmax(-1) if scoring == "softmax" else logits.double().sigmoid()
    sel = s if bias is None else s + bias.double()
    e = s.shape[1]
    ids, weights = [], []
    for t in range(s.shape[0]):
        row = [-math.inf if math.isnan(v) else v for v in sel[t].tolist()]
        allowed = range(e)
        if groups:
            per = e // groups
            score = [sum(sorted(row[g * per:(g + 1) * per], reverse=True)[:2])
                     for g in range(groups)]
            kept = sorted(range(groups), key=lambda g: (-score[g], g))[:topk_groups]
            allowed = [x for g in kept for x in range(g * per, (g + 1) * per)]
        chosen = sorted(allowed, key=lambda x: (-row[x], x))[:top_k]
        w = s[t, chosen]
        weights.append((w / w.sum() if renormalize else w) * scaling)
        ids.append(chosen)
    if not ids:
        return torch.zeros(0, top_k, dtype=torch.float64), torch.zeros(0, top_k,
                                                                        dtype=torch.long)
    return torch.stack(weights), torch.tensor(ids)


@st.composite
def route_calls(draw) -> dict:
    gen = torch.Generator().manual_seed(draw(seeds))
    e = draw(st.sampled_from([1, 3, 8, 16, 32]))
    t = draw(st.integers(0, 7))
    groups = topk_groups = None
    divisors = [g for g in (2, 4, 8) if e % g == 0 and e // g >= 2]
    if divisors and draw(st.booleans()):
        groups = draw(st.sampled_from(divisors))
        topk_groups = draw(st.integers(1, groups))
    limit = e if groups is None else topk_groups * (e // groups)
    top_k = draw(st.integers(1, min(limit, 8)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    logits = random_tensor(gen, (t, e), dtype, 2.0)
    view = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))
    if view == "transposed":
        logits = logits.T.contiguous().T
    elif view == "strided":
        logits = torch.stack([logits, torch.full_like(logits, math.nan)], -1)[..., 0]
    elif view == "expanded" and t > 0:
        logits = logits[:1].expand_as(logits)
    bias = random_tensor(gen, (e,), torch.float32, 0.3) if draw(st.booleans()) else None
    return dict(logits=logits, top_k=top_k, scoring=draw(st.sampled_from(["softmax",
                                                                          "sigmoid"])),
                renormalize=draw(st.booleans()), num_expert_groups=groups,
                topk_groups=topk_groups, correction_bias=bias,
                routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 0.1])))


@props(60)
@given(route_calls())
def test_route_valid_calls_match_reference(args):
    want_w, want_ids = float64_route(*args.values())
    ref_w, ref_ids = moe_route(**args, backend="reference")
    assert torch.equal(ref_ids.long(), want_ids), "the reference's ids are not the selection"
    check_close(compare("reference.weights", ref_w, want_w, WEIGHTS_TOLERANCE))
    logits, top_k = args["logits"], args["top_k"]
    groups = args["num_expert_groups"] or 1
    call = RouteCall(logits, top_k, args["scoring"], args["renormalize"], groups,
                     args["topk_groups"] or 1, args["correction_bias"],
                     args["routed_scaling_factor"], ref_w, ref_ids)
    for backend in [*runnable(ROUTE_SPEC, route_problem(call)), None]:
        event(f"compared {backend}")
        weights, ids = moe_route(**args, backend=backend)
        assert torch.equal(ids, ref_ids), f"{backend}: ids differ from the reference's"
        check_close(compare(f"{backend}.weights", weights, ref_w, WEIGHTS_TOLERANCE))


ROUTE_BAD = {
    "top_k 0": dict(top_k=0), "top_k past E": dict(top_k=17), "top_k 2.0": dict(top_k=2.0),
    "top_k True": dict(top_k=True), "scoring relu": dict(scoring="relu"),
    "renormalize 1": dict(renormalize=1), "groups alone": dict(num_expert_groups=4),
    "groups not dividing E": dict(num_expert_groups=3, topk_groups=1),
    "topk_groups past groups": dict(num_expert_groups=4, topk_groups=5),
    "top_k past the kept experts": dict(num_expert_groups=4, topk_groups=1, top_k=5),
    "bias of E - 1": dict(correction_bias=torch.zeros(15)),
    "bias int": dict(correction_bias=torch.zeros(16, dtype=torch.int32)),
    "scaling nan": dict(routed_scaling_factor=math.nan),
    "scaling inf": dict(routed_scaling_factor=math.inf),
    "scaling a string": dict(routed_scaling_factor="2"),
    "logits 3-D": dict(logits=torch.zeros(1, 6, 16)),
    "logits int": dict(logits=torch.zeros(6, 16, dtype=torch.int32)),
    "logits float64": dict(logits=torch.zeros(6, 16, dtype=torch.float64)),
    "no experts": dict(logits=torch.zeros(6, 0)),
    "bias on meta": dict(correction_bias=torch.zeros(16, device="meta")),
    "backend unknown": dict(backend="magic"), "backend cuda on the CPU": dict(backend="cuda"),
}


@props(60)
@given(st.sampled_from(sorted(ROUTE_BAD)), seeds)
def test_route_rejects_bad_arguments(kind, seed):
    args = dict(logits=random_tensor(torch.Generator().manual_seed(seed), (6, 16),
                                     torch.float32), top_k=2)
    args.update(ROUTE_BAD[kind])
    expect_named_error(lambda: moe_route(args.pop("logits"), args.pop("top_k"), **args),
                       "moe_route", kind)


# ---- fused_moe --------------------------------------------------------------------------------


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return g * torch.sigmoid(g)
    if activation == "gelu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


def float64_moe(x, w13, w2, weights, ids, activation, expert_map) -> torch.Tensor:
    i = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) if expert_map is None else int(expert_map[int(ids[t, j])])
            if e < 0:
                continue
            hid = w13[e].double() @ x[t].double()
            a = (_act(hid[:i], activation) * hid[i:]).to(x.dtype).double()
            out[t] += float(weights[t, j]) * (w2[e].double() @ a)
    return out


@st.composite
def fused_calls(draw) -> dict:
    gen = torch.Generator().manual_seed(draw(seeds))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    t, h, i = draw(st.integers(0, 5)), draw(st.sampled_from([16, 24, 32])), \
        draw(st.sampled_from([8, 12, 16]))
    e_global = draw(st.integers(1, 6))
    top_k = draw(st.integers(1, min(e_global, 3)))
    ids = torch.stack([torch.randperm(e_global, generator=gen)[:top_k] for _ in range(t)]) \
        if t else torch.zeros(0, top_k, dtype=torch.long)
    if t and top_k > 1 and draw(st.booleans()):
        ids[:, 1] = ids[:, 0]  # one expert twice for a token
    ids = ids.to(draw(st.sampled_from([torch.int32, torch.int64])))
    expert_map, e = None, e_global
    if draw(st.booleans()):  # expert parallelism: a random subset lives here
        local = torch.randperm(e_global, generator=gen)[: draw(st.integers(1, e_global))]
        expert_map = torch.full((e_global,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(local.numel(), dtype=torch.int32)
        e = local.numel()
    x = random_tensor(gen, (t, h), dtype)
    w13 = random_tensor(gen, (e, 2 * i, h), dtype, h**-0.5)
    w2 = random_tensor(gen, (e, h, i), dtype, i**-0.5)
    weights = torch.rand(t, top_k, generator=gen).to(draw(st.sampled_from([torch.float32,
                                                                           dtype])))
    view = draw(st.sampled_from(["contiguous", "x_transposed", "x_expanded", "w_transposed",
                                 "weights_expanded"]))
    if view == "x_transposed" and t > 1:
        x = x.T.contiguous().T
    elif view == "x_expanded" and t > 0:
        x = x[:1].expand_as(x)
    elif view == "w_transposed":
        w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)
        w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
    elif view == "weights_expanded" and t > 0:
        weights = weights[:1].expand_as(weights)
    return dict(x=x, w13=w13, w2=w2, weights=weights, ids=ids,
                activation=draw(st.sampled_from(["silu", "gelu", "gelu_tanh"])),
                expert_map=expert_map)


@props(40)
@given(fused_calls())
def test_fused_valid_calls_match_reference(args):
    dtype = args["x"].dtype
    want = float64_moe(*args.values())
    ref = fused_moe(**args, backend="reference")
    assert ref.shape == args["x"].shape and ref.dtype == dtype
    check_close(compare("reference", ref, want, REFERENCE_TOLERANCE[dtype]))
    fields = _fused_args(args["x"], args["w13"], args["w2"], args["weights"], args["ids"],
                         args["activation"], None, None, None, None, args["expert_map"])
    call = FusedCall(args["x"], args["w13"], args["w2"], args["weights"], args["ids"],
                     args["activation"], fields["quant"], None, None, None, None, 0, 0,
                     fields["expert_map"], ref)
    for backend in [*runnable(SPEC, problem_of(call)), None]:
        event(f"compared {backend}")
        got = fused_moe(**args, backend=backend)
        check_close(compare(f"{backend}", got, ref, KERNEL_TOLERANCE[dtype]))


def _fused_base(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(x=random_tensor(gen, (6, 32), torch.bfloat16),
                w13=random_tensor(gen, (8, 32, 32), torch.bfloat16, 0.2),
                w2=random_tensor(gen, (8, 32, 16), torch.bfloat16, 0.2),
                weights=torch.rand(6, 2, generator=gen),
                ids=torch.randint(0, 8, (6, 2), generator=gen, dtype=torch.int32))


def _set(t: torch.Tensor, value: int) -> torch.Tensor:
    t = t.clone()
    t[3, 1] = value
    return t


FUSED_BAD = {
    "w13 of another dtype": lambda a: dict(a, w13=a["w13"].half()),
    "w2 of another dtype": lambda a: dict(a, w2=a["w2"].float()),
    "w13 2-D": lambda a: dict(a, w13=a["w13"][0]),
    "no experts": lambda a: dict(a, w13=a["w13"][:0], w2=a["w2"][:0]),
    "w13 odd rows": lambda a: dict(a, w13=a["w13"][:, :31]),
    "w2 of other sizes": lambda a: dict(a, w2=a["w2"][:, :, :15]),
    "fp8 experts without scales": lambda a: dict(a, w13=a["w13"].to(torch.float8_e4m3fn),
                                                 w2=a["w2"].to(torch.float8_e4m3fn)),
    "scales for bf16 experts": lambda a: dict(a, w13_scale=torch.ones(8, 1, 1)),
    "zeros for bf16 experts": lambda a: dict(a, w13_zeros=torch.zeros(8, 1, 1,
                                                                      dtype=torch.uint8)),
    "ids 1-D": lambda a: dict(a, ids=a["ids"][:, 0]),
    "ids float": lambda a: dict(a, ids=a["ids"].float()),
    "ids of another T": lambda a: dict(a, ids=a["ids"][:5]),
    "weights of another shape": lambda a: dict(a, weights=a["weights"][:, :1]),
    "weights int": lambda a: dict(a, weights=a["weights"].int()),
    "activation relu": lambda a: dict(a, activation="relu"),
    "an id past the experts": lambda a: dict(a, ids=_set(a["ids"], 8)),
    "a negative id": lambda a: dict(a, ids=_set(a["ids"], -1)),
    "an int64 id of 2**40": lambda a: dict(a, ids=_set(a["ids"].long(), 2**40)),
    "expert_map to a missing expert": lambda a: dict(a, expert_map=torch.tensor(
        [0, 1, 2, 3, 4, 5, 6, 8], dtype=torch.int32)),
    "expert_map -2": lambda a: dict(a, expert_map=torch.tensor([0, 1, 2, 3, 4, 5, 6, -2])),
    "ids past the expert_map": lambda a: dict(a, expert_map=torch.arange(4, dtype=torch.int32)),
    "expert_map float": lambda a: dict(a, expert_map=torch.zeros(8)),
    "x on meta": lambda a: dict(a, x=a["x"].to("meta")),
    "backend cuda on the CPU": lambda a: dict(a, backend="cuda"),
    "triton on float32": lambda a: dict(a, x=a["x"].float(), w13=a["w13"].float(),
                                        w2=a["w2"].float(), backend="triton"),
}


@props(80)
@given(st.sampled_from(sorted(FUSED_BAD)), seeds)
def test_fused_rejects_bad_arguments(kind, seed):
    args = FUSED_BAD[kind](_fused_base(seed))
    expect_named_error(lambda: fused_moe(**args), "fused_moe", kind)


# ---- align ------------------------------------------------------------------------------------


@props(80)
@given(seeds, st.integers(0, 9), st.integers(1, 4), st.integers(1, 9), st.integers(1, 17),
       st.booleans(), st.sampled_from([0, 1, -1, 2]))
def test_align_groups_every_pair_or_refuses(seed, t, k, experts, block_m, ep, stray):
    """``stray``: 0 for ids in range, else one id moved past either end (1: the last expert
    + 1 of the global range, -1: -1, 2: a huge id), which must be refused on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    e_global = 2 * experts if ep else experts
    ids = torch.randint(0, e_global, (t, k), generator=gen, dtype=torch.int32)
    if stray and ids.numel():
        ids.view(-1)[0] = {1: e_global, -1: -1, 2: 2**30}[stray]
    emap = None
    if ep:
        emap = torch.full((e_global,), -1, dtype=torch.int32)
        emap[torch.randperm(e_global, generator=gen)[:experts]] = torch.arange(
            experts, dtype=torch.int32)
    result, message = named_error_or_result(lambda: align(ids, experts, block_m, emap),
                                            ("moe.align",))
    if message is not None:
        assert stray and ids.numel(), f"refused valid ids: {message}"
        return
    assert not (stray and ids.numel()), "an id out of range was accepted"
    pairs, blocks, padded = result
    cap = capacity(t * k, experts, block_m)
    assert pairs.shape == (cap,) and blocks.shape == (cap // block_m,)
    flat = ids.view(-1).tolist() if emap is None else [int(emap[i]) for i in ids.view(-1)]
    at, sentinel = 0, t * k
    for e in range(experts):
        mine = [p for p, x in enumerate(flat) if x == e]
        run = -(-len(mine) // block_m) * block_m
        assert pairs[at:at + run].tolist() == mine + [sentinel] * (run - len(mine))
        assert blocks[at // block_m:(at + run) // block_m].tolist() == [e] * (run // block_m)
        at += run
    assert int(padded[0]) == at
    assert (pairs[at:] == sentinel).all() and (blocks[at // block_m:] == -1).all()


@props(30)
@given(st.sampled_from([dict(num_experts=0), dict(num_experts=8.0), dict(block_m=0),
                        dict(block_m=True), dict(block_m=2**40), dict(num_experts=10**12),
                        dict(ids=torch.zeros(6)), dict(ids=torch.zeros(6, dtype=torch.int32)),
                        dict(expert_map=torch.zeros(8))]))
def test_align_rejects_bad_arguments(bad):
    args = dict(ids=torch.zeros(3, 2, dtype=torch.int32), num_experts=8, block_m=4)
    args.update(bad)
    expect_named_error(lambda: align(**args), "moe.align")
