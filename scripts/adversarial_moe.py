"""Adversarial scenarios of the MoE ops (``moe_route``, ``fused_moe``, ``kpt.ops.moe.align``),
registered into ``scripts/adversarial.py``'s table (which imports this file; run that one):
valid calls against float64 math written here (reference and Triton-interpreter backends,
views, expert parallelism, quantised experts), wrong shapes / dtypes / devices / types, expert
ids and expert maps out of range on the CPU, NaN / inf scalars and absurd sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adversarial import (
    AREAS,
    TOL,
    Lazy,
    Outcome,
    T,
    add,
    cu,
    expect_close,
    expect_error,
    expect_ok,
    meta,
    mismatch,
    randn,
    resolve,
)
from adversarial_gemm import ints, naive_dequant, refuse, torch_

AREAS.update({"moe": "moe"})
ROUTE = ("moe_route",)
FUSED = ("fused_moe",)
ALIGN = ("moe.align",)


# ---- float64 math ----------------------------------------------------------------------------


def naive_route(logits: Any, top_k: int, scoring: str = "softmax", renormalize: bool = True,
                groups: int | None = None, topk_groups: int | None = None, bias: Any = None,
                scaling: float = 1.0) -> tuple[Any, Any]:
    """(weights float64, ids int64) token by token, in Python: the documented selection."""
    torch = torch_()
    z = logits.double()
    s = z.softmax(-1) if scoring == "softmax" else z.sigmoid()
    sel = s if bias is None else s + bias.double()
    e = s.shape[1]
    weights, ids = [], []
    for t in range(s.shape[0]):
        row = [(-math.inf if math.isnan(v) else v) for v in sel[t].tolist()]
        allowed = set(range(e))
        if groups:
            per = e // groups
            score = [sum(sorted(row[g * per:(g + 1) * per], reverse=True)[:2])
                     for g in range(groups)]
            best = sorted(range(groups), key=lambda g: (-score[g], g))[:topk_groups]
            allowed = {x for g in best for x in range(g * per, (g + 1) * per)}
        chosen = sorted(allowed, key=lambda x: (-row[x], x))[:top_k]
        w = s[t, chosen]
        if renormalize:
            w = w / w.sum()
        weights.append(w * scaling)
        ids.append(chosen)
    if not ids:
        return torch.zeros(0, top_k, dtype=torch.float64), torch.zeros(0, top_k, dtype=torch.long)
    return torch.stack(weights), torch.tensor(ids)


def act(g: Any, activation: str) -> Any:
    torch = torch_()
    if activation == "silu":
        return g * torch.sigmoid(g)
    if activation == "gelu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


def naive_moe(x: Any, w13: Any, w2: Any, weights: Any, ids: Any, activation: str = "silu",
              expert_map: Any = None) -> Any:
    """float64, token by token; the intermediate rounded to x's dtype (the documented point)."""
    torch = torch_()
    t_, h = x.shape
    i = w2.shape[2]
    out = torch.zeros(t_, h, dtype=torch.float64)
    for t in range(t_):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            hid = w13[e].double() @ x[t].double()
            a = (act(hid[:i], activation) * hid[i:]).to(x.dtype).double()
            out[t] += float(weights[t, j]) * (w2[e].double() @ a)
    return out


def moe_inputs(t: int = 6, h: int = 32, i: int = 16, e: int = 8, k: int = 2,
               dtype: str = "bfloat16", seed: int = 0) -> dict:
    weights, ids = naive_route(randn(t, e, seed=seed + 1), k)  # no kpt call: no launch
    weights, ids = weights.float(), ids.int()
    return dict(x=randn(t, h, dtype=dtype, seed=seed + 2),
                w13=randn(e, 2 * i, h, dtype=dtype, seed=seed + 3, scale=h**-0.5),
                w2=randn(e, h, i, dtype=dtype, seed=seed + 4, scale=i**-0.5),
                weights=weights, ids=ids)


# ---- moe_route -------------------------------------------------------------------------------


def route_case(backend: str, t: int = 7, e: int = 16, top_k: int = 3, dtype: str = "float32",
               view: Callable[[Any], Any] | None = None, bias: bool = False,
               **options: Any) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops import moe_route

        logits = randn(t, e, dtype=dtype, seed=14, scale=2.0)
        logits = view(logits) if view is not None else logits
        b = randn(e, seed=15, scale=0.3) if bias else None
        kw = dict(options)
        want_w, want_ids = naive_route(logits, top_k, kw.get("scoring", "softmax"),
                                       kw.get("renormalize", True),
                                       kw.get("num_expert_groups"), kw.get("topk_groups"), b,
                                       kw.get("routed_scaling_factor", 1.0))

        def check() -> str | None:
            weights, ids = moe_route(logits, top_k, correction_bias=b, backend=backend, **kw)
            if ids.dtype != torch_().int32 or tuple(ids.shape) != (t, top_k):
                return f"ids {tuple(ids.shape)} {ids.dtype}"
            if not torch_().equal(ids.long(), want_ids):
                bad = (ids.long() != want_ids).any(-1).nonzero().flatten().tolist()
                return f"ids differ from the documented selection in rows {bad[:5]}"
            return mismatch(weights, want_w, 1e-5, "weights")

        return expect_ok(check, ROUTE)

    return run


for _name, _args in {
    "softmax top-3 of 16, reference": ("reference",),
    "softmax top-3 of 16, triton": ("triton",),
    "sigmoid, no renormalisation, scaling 2.5, triton": ("triton", 7, 16, 3, "float32", None,
                                                         False),
    "grouped top-k (4 groups, keep 2) with a correction bias, triton": ("triton", 7, 16, 3,
                                                                        "float32", None, True),
    "bf16 logits, triton": ("triton", 7, 16, 3, "bfloat16"),
    "top_k = E (every expert), triton": ("triton", 5, 8, 8),
    "no tokens (T = 0), triton": ("triton", 0),
    "no tokens (T = 0), reference": ("reference", 0),
    "one expert, top 1, triton": ("triton", 4, 1, 1),
    "logits a transposed view, triton": ("triton", 7, 16, 3, "float32",
                                         lambda x: x.T.contiguous().T),
    "logits rows expanded (stride 0: ties everywhere), triton":
        ("triton", 7, 16, 3, "float32", lambda x: x[:1].expand_as(x)),
    "logits every other column of a buffer, triton":
        ("triton", 7, 16, 3, "float32",
         lambda x: torch_().stack([x, x * 0 + math.nan], -1).flatten(-2)[:, ::2]),
}.items():
    _extra: dict = {}
    if "sigmoid" in _name:
        _extra = dict(scoring="sigmoid", renormalize=False, routed_scaling_factor=2.5)
    if "grouped" in _name:
        _extra = dict(scoring="sigmoid", num_expert_groups=4, topk_groups=2)
    add("moe", f"moe_route {_name}", f"moe_route {_name}: ids equal the documented selection "
        "(ties to the lower id), weights float64 math", route_case(*_args, **_extra))


def _route_nan(_tmp: Path) -> Outcome:
    from kpt.ops import moe_route

    logits = randn(4, 8, seed=16)
    logits[1, 3] = math.nan
    logits[2] = math.nan

    def check() -> str | None:
        for backend in ("reference", "triton"):
            for scoring in ("softmax", "sigmoid"):
                _, ids = moe_route(logits, 2, scoring=scoring, backend=backend)
                if not bool(((ids >= 0) & (ids < 8)).all()):
                    return f"{backend} {scoring}: ids {ids.tolist()} outside 0..7"
                if scoring == "sigmoid" and 3 in ids[1].tolist():
                    return f"{backend}: the NaN expert 3 was chosen for token 1"
        return None

    return expect_ok(check, ROUTE)


add("moe", "moe_route NaN logits: ids stay valid experts", "moe_route with a NaN logit and a "
    "row of NaN: documented, NaN never wins a selection and the ids stay in 0..E-1",
    _route_nan)


def route_bad(**override: Any) -> Callable[[], Any]:
    def call() -> Any:
        from kpt.ops import moe_route

        args = {**dict(logits=randn(6, 16), top_k=2), **resolve(override)}
        return moe_route(args.pop("logits"), args.pop("top_k"), **args)

    return call


refuse("moe", {
    "moe_route top_k 0": ("top_k=0", dict(top_k=0)),
    "moe_route top_k 17 of 16": ("top_k=17", dict(top_k=17)),
    "moe_route top_k 2.0": ("top_k=2.0", dict(top_k=2.0)),
    "moe_route top_k True": ("top_k=True", dict(top_k=True)),
    "moe_route top_k a tensor": ("top_k=torch.tensor(2)", dict(top_k=ints(2, dtype="int64"))),
    "moe_route scoring 'relu'": ("scoring='relu'", dict(scoring="relu")),
    "moe_route renormalize 1": ("renormalize=1", dict(renormalize=1)),
    "moe_route groups without topk_groups": ("num_expert_groups=4 alone",
                                             dict(num_expert_groups=4)),
    "moe_route 3 groups of 16 experts": ("num_expert_groups=3, topk_groups=1",
                                         dict(num_expert_groups=3, topk_groups=1)),
    "moe_route topk_groups above groups": ("num_expert_groups=4, topk_groups=5",
                                           dict(num_expert_groups=4, topk_groups=5)),
    "moe_route top_k above the kept experts": ("4 groups, keep 1 (4 experts), top_k 5",
                                               dict(num_expert_groups=4, topk_groups=1,
                                                    top_k=5)),
    "moe_route groups 0": ("num_expert_groups=0", dict(num_expert_groups=0, topk_groups=0)),
    "moe_route correction_bias of 15": ("correction_bias of 15", dict(correction_bias=T(15))),
    "moe_route correction_bias int": ("int correction_bias",
                                      dict(correction_bias=ints(*range(16)))),
    "moe_route correction_bias 2-D": ("correction_bias (1, 16)", dict(correction_bias=T(1, 16))),
    "moe_route correction_bias on meta": ("correction_bias on meta",
                                          dict(correction_bias=meta(16))),
    "moe_route scaling nan": ("routed_scaling_factor=nan", dict(routed_scaling_factor=math.nan)),
    "moe_route scaling inf": ("routed_scaling_factor=inf", dict(routed_scaling_factor=math.inf)),
    "moe_route scaling '2'": ("routed_scaling_factor='2'", dict(routed_scaling_factor="2")),
    "moe_route scaling True": ("routed_scaling_factor=True", dict(routed_scaling_factor=True)),
    "moe_route logits 1-D": ("logits (16,)", dict(logits=T(16))),
    "moe_route logits 3-D": ("logits (2, 3, 16)", dict(logits=T(2, 3, 16))),
    "moe_route logits int": ("integer logits", dict(logits=ints(*range(16), shape=(1, 16)))),
    "moe_route logits float64": ("float64 logits", dict(logits=T(6, 16, dtype="float64"))),
    "moe_route no experts": ("logits (6, 0)", dict(logits=T(6, 0))),
    "moe_route logits on meta": ("logits on meta", dict(logits=meta(6, 16))),
    "moe_route backend 'cuda' on the CPU": ("backend='cuda'", dict(backend="cuda")),
    "moe_route backend 'magic'": ("backend='magic'", dict(backend="magic")),
}, route_bad, "moe_route", ROUTE)


# ---- fused_moe -------------------------------------------------------------------------------


def fused_case(backend: str, dtype: str = "bfloat16", activation: str = "silu",
               shape: dict | None = None, view: Callable[[dict], dict] | None = None,
               ep: bool = False) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops import fused_moe

        torch = torch_()
        args = moe_inputs(dtype=dtype, **(shape or {}))
        if ep:  # 8 global experts, this rank holds 3 of them (rows 0..2 of w13 / w2)
            args["expert_map"] = torch.tensor([-1, 0, -1, 2, -1, -1, 1, -1], dtype=torch.int32)
            args["w13"], args["w2"] = args["w13"][:3], args["w2"][:3]
        if view is not None:
            args = view(args)
        want = naive_moe(args["x"], args["w13"], args["w2"], args["weights"], args["ids"],
                         activation, args.get("expert_map"))
        return expect_close(lambda: fused_moe(**args, activation=activation, backend=backend),
                            want, TOL[dtype], FUSED)

    return run


def _duplicate_ids(args: dict) -> dict:
    ids = args["ids"].clone()
    ids[:, 1] = ids[:, 0]  # both slots of every token name one expert
    return {**args, "ids": ids}


def _ids_int64_noncontig(args: dict) -> dict:
    ids = args["ids"].long().T.contiguous().T
    return {**args, "ids": ids, "weights": args["weights"].T.contiguous().T}


def _x_transposed(args: dict) -> dict:
    return {**args, "x": args["x"].T.contiguous().T}


def _x_expanded(args: dict) -> dict:
    return {**args, "x": args["x"][:1].expand_as(args["x"])}


def _weights_expanded_bf16(args: dict) -> dict:
    w = args["weights"].bfloat16()
    return {**args, "weights": w[:1].expand_as(w)}


def _w_noncontig(args: dict) -> dict:
    return {**args, "w13": args["w13"].transpose(1, 2).contiguous().transpose(1, 2),
            "w2": args["w2"].transpose(1, 2).contiguous().transpose(1, 2)}


def _w_expanded(args: dict) -> dict:
    return {**args, "w13": args["w13"][:1].expand_as(args["w13"]),
            "w2": args["w2"][:1].expand_as(args["w2"])}


for _name, _args in {
    "bf16 SwiGLU, reference": ("reference",),
    "bf16 SwiGLU, triton": ("triton",),
    "fp16 gelu, triton": ("triton", "float16", "gelu"),
    "bf16 gelu_tanh, triton": ("triton", "bfloat16", "gelu_tanh"),
    "fp32, reference": ("reference", "float32"),
    "top 1 of 4, triton": ("triton", "bfloat16", "silu", dict(e=4, k=1)),
    "every expert (top 8 of 8), triton": ("triton", "bfloat16", "silu", dict(k=8)),
    "no tokens (T = 0), triton": ("triton", "bfloat16", "silu", dict(t=0)),
    "odd sizes (H 24, I 12), triton": ("triton", "bfloat16", "silu", dict(h=24, i=12)),
    "expert parallelism (3 of 8 experts here), triton": ("triton", "bfloat16", "silu", None,
                                                         None, True),
    "expert parallelism, reference": ("reference", "bfloat16", "silu", None, None, True),
    "one expert twice for a token, triton": ("triton", "bfloat16", "silu", None,
                                             _duplicate_ids),
    "int64 ids and weights as transposed views, triton":
        ("triton", "bfloat16", "silu", None, _ids_int64_noncontig),
    "x a transposed view, triton": ("triton", "bfloat16", "silu", None, _x_transposed),
    "x rows expanded (stride 0), triton": ("triton", "bfloat16", "silu", None, _x_expanded),
    "bf16 weights expanded (stride 0), triton": ("triton", "bfloat16", "silu", None,
                                                 _weights_expanded_bf16),
    "w13 / w2 transposed views, triton": ("triton", "bfloat16", "silu", None, _w_noncontig),
    "w13 / w2 expanded over the experts (stride 0), triton":
        ("triton", "bfloat16", "silu", None, _w_expanded),
}.items():
    add("moe", f"fused_moe {_name}", f"fused_moe {_name}: against float64 math per token",
        fused_case(*_args))


def _quantized_experts(kind: str, backend: str) -> Callable[[Path], Outcome]:
    """fp8 (128x128 blocks) or int4 (g32) experts: the reference against float64 math of the
    dequantised experts (the activation quantisation of fp8 done as documented, with
    quantize_fp8), the Triton kernels against the reference."""

    def run(_tmp: Path) -> Outcome:
        from kpt.ops import dequantize_int4, fused_moe, moe_route, pack_int4, quantize_fp8

        torch = torch_()
        e, h, i, t = 3, 64, 128, 5
        x = randn(t, h, dtype="bfloat16", seed=20)
        weights, ids = moe_route(randn(t, e, seed=21), 2)
        w13f, w2f = randn(e, 2 * i, h, seed=22, scale=0.1), randn(e, h, i, seed=23, scale=0.1)
        if kind == "fp8":
            q13 = [quantize_fp8(w, "block", block=(128, 128)) for w in w13f]
            q2 = [quantize_fp8(w, "block", block=(128, 128)) for w in w2f]
            args = dict(w13=torch.stack([a for a, _ in q13]), w2=torch.stack([a for a, _ in q2]),
                        w13_scale=torch.stack([s for _, s in q13]),
                        w2_scale=torch.stack([s for _, s in q2]))
        else:
            p13 = [pack_int4(w, 32) for w in w13f]
            p2 = [pack_int4(w, 32) for w in w2f]
            args = dict(w13=torch.stack([p[0] for p in p13]), w2=torch.stack([p[0] for p in p2]),
                        w13_scale=torch.stack([p[1] for p in p13]),
                        w2_scale=torch.stack([p[1] for p in p2]),
                        w13_zeros=torch.stack([p[2] for p in p13]),
                        w2_zeros=torch.stack([p[2] for p in p2]))
        if backend != "reference":
            want = fused_moe(x, weights=weights, ids=ids, backend="reference", **args)
            return expect_close(lambda: fused_moe(x, weights=weights, ids=ids, backend=backend,
                                                  **args), want, TOL["bfloat16"], FUSED)
        if kind == "fp8":
            def deq(w8: Any, s: Any) -> Any:
                r = torch.arange(w8.shape[0])[:, None] // 128
                c = torch.arange(w8.shape[1])[None, :] // 128
                return w8.double() * s.double()[r, c]

            w13 = torch.stack([deq(a, s) for a, s in zip(args["w13"], args["w13_scale"])])
            w2 = torch.stack([deq(a, s) for a, s in zip(args["w2"], args["w2_scale"])])

            def fp8_round(a: Any) -> Any:
                a8, s = quantize_fp8(a.float(), "block")
                return (a8.double() * s.double().repeat_interleave(128, 1)[:, : a.shape[1]])

            want = torch.zeros(t, h, dtype=torch.float64)
            xq = fp8_round(x)
            for tok in range(t):
                for j in range(2):
                    ex = int(ids[tok, j])
                    hid = w13[ex] @ xq[tok]
                    a = (act(hid[:i], "silu") * hid[i:]).to(torch.bfloat16)
                    want[tok] += float(weights[tok, j]) * (w2[ex] @ fp8_round(a[None])[0])
        else:
            w13 = torch.stack([dequantize_int4(p, s, z, group_size=32, dtype=torch.bfloat16)
                               for p, s, z in zip(args["w13"], args["w13_scale"],
                                                  args["w13_zeros"])])
            w2 = torch.stack([naive_dequant(p, s, z, 32, None, torch.bfloat16)
                              for p, s, z in zip(args["w2"], args["w2_scale"], args["w2_zeros"])])
            want = naive_moe(x, w13, w2, weights, ids)
        # the intermediate is rounded (bf16, then e4m3 for fp8 experts) at the same point in
        # both, but from sums of a different order: an element may round one step apart
        tol = 0.1 if kind == "fp8" else TOL["bfloat16"]
        return expect_close(lambda: fused_moe(x, weights=weights, ids=ids, backend=backend,
                                              **args), want, tol, FUSED)

    return run


for _kind in ("fp8", "int4"):
    for _backend in ("reference", "triton"):
        add("moe", f"fused_moe {_kind} experts, {_backend}", f"fused_moe with {_kind} experts on "
            f"{_backend}: the reference against float64 math, triton against the reference",
            _quantized_experts(_kind, _backend))


def _nan_stays(what: str) -> Callable[[Path], Outcome]:
    """NaN in one token's x stays in its row; a NaN routing weight of a pair sent to another
    rank (expert_map -1) contributes nothing."""

    def run(_tmp: Path) -> Outcome:
        from kpt.ops import fused_moe

        torch = torch_()
        args = moe_inputs()
        if what == "x":
            args["x"][2, 5] = math.nan
        else:
            args["expert_map"] = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1], dtype=torch.int32)
            args["w13"], args["w2"] = args["w13"][:4], args["w2"][:4]
            remote = args["ids"] >= 4
            args["weights"] = args["weights"].masked_fill(remote, math.nan)

        def check() -> str | None:
            for backend in ("reference", "triton"):
                y = fused_moe(**args, backend=backend)
                rows = torch.isnan(y).any(-1).nonzero().flatten().tolist()
                expected = [2] if what == "x" else []
                if rows != expected:
                    return f"{backend}: NaN rows {rows}, expected {expected}"
            return None

        return expect_ok(check, FUSED)

    return run


add("moe", "fused_moe NaN in one token stays in its row", "fused_moe with x[2, 5] = NaN: only "
    "output row 2 is NaN (reference and triton)", _nan_stays("x"))
add("moe", "fused_moe NaN weight of a pair on another rank", "fused_moe with expert_map "
    "sending experts 4..7 elsewhere and NaN weights on exactly those pairs: no NaN in the "
    "output (they contribute zero)", _nan_stays("remote"))


def fused_bad(**override: Any) -> Callable[[], Any]:
    def call() -> Any:
        from kpt.ops import fused_moe

        args = {**moe_inputs(), **resolve(override)}
        return fused_moe(args.pop("x"), args.pop("w13"), args.pop("w2"), args.pop("weights"),
                         args.pop("ids"), **args)

    return call


def _ids_with(value: int, dtype: str = "int32") -> Lazy:
    def make() -> Any:
        ids = moe_inputs()["ids"].to(getattr(torch_(), dtype))
        ids[3, 1] = value
        return ids

    return Lazy(make)


def _fp8_experts(i: int = 16, scales: bool = False) -> dict:
    def w(*shape: int) -> Lazy:
        return Lazy(lambda: randn(*shape, scale=0.1).to(torch_().float8_e4m3fn))

    out = dict(w13=w(8, 2 * i, 32), w2=w(8, 32, i))
    if scales:
        out.update(w13_scale=T(8, 1, 1), w2_scale=T(8, 1, 1))
    return out


refuse("moe", {
    "fused_moe w13 fp16 for bf16 x": ("w13 float16, x bfloat16",
                                      dict(w13=T(8, 32, 32, dtype="float16"))),
    "fused_moe w2 of another dtype": ("w2 float32, w13 bfloat16", dict(w2=T(8, 32, 16))),
    "fused_moe w13 2-D": ("w13 (32, 32)", dict(w13=T(32, 32, dtype="bfloat16"))),
    "fused_moe no experts": ("w13 (0, 32, 32), w2 (0, 32, 16)", dict(
        w13=T(0, 32, 32, dtype="bfloat16"), w2=T(0, 32, 16, dtype="bfloat16"))),
    "fused_moe w13 of 31 rows": ("w13 (8, 31, 32)", dict(w13=T(8, 31, 32, dtype="bfloat16"))),
    "fused_moe w13 H mismatch": ("w13 (8, 32, 24) for H = 32",
                                 dict(w13=T(8, 32, 24, dtype="bfloat16"))),
    "fused_moe w2 I mismatch": ("w2 (8, 32, 15)", dict(w2=T(8, 32, 15, dtype="bfloat16"))),
    "fused_moe w2 of 7 experts": ("w2 (7, 32, 16)", dict(w2=T(7, 32, 16, dtype="bfloat16"))),
    "fused_moe fp8 experts without scales": ("fp8 w13/w2, no scales", _fp8_experts()),
    "fused_moe fp8 experts with I = 16": ("fp8 experts, I not a multiple of 128",
                                          _fp8_experts(scales=True)),
    "fused_moe scales for bf16 experts": ("w13_scale with bf16 experts",
                                          dict(w13_scale=T(8, 1, 1))),
    "fused_moe zeros for bf16 experts": ("w13_zeros with bf16 experts",
                                         dict(w13_zeros=ints(0, shape=(1, 1, 1)))),
    "fused_moe int4 experts without scales": ("int32 experts, no scales", dict(
        w13=ints(*[0] * 8 * 4 * 32, shape=(8, 4, 32)),
        w2=ints(*[0] * 8 * 2 * 32, shape=(8, 2, 32)))),
    "fused_moe ids 1-D": ("ids (6,)", dict(ids=ints(*range(6)))),
    "fused_moe ids float": ("float ids", dict(ids=T(6, 2))),
    "fused_moe ids of 5 tokens": ("ids (5, 2) for 6 tokens", dict(ids=ints(*[0] * 10,
                                                                       shape=(5, 2)))),
    "fused_moe ids top 0": ("ids (6, 0)", dict(ids=ints(shape=(6, 0)), weights=T(6, 0))),
    "fused_moe weights (6, 3)": ("weights (6, 3) for ids (6, 2)", dict(weights=T(6, 3))),
    "fused_moe weights int": ("integer weights", dict(weights=ints(*[1] * 12, shape=(6, 2)))),
    "fused_moe activation 'relu'": ("activation='relu'", dict(activation="relu")),
    "fused_moe activation None": ("activation=None", dict(activation=None)),
    "fused_moe id 8 of 8 experts": ("an id 8 (experts 0..7)", dict(ids=_ids_with(8))),
    "fused_moe id -1": ("an id -1", dict(ids=_ids_with(-1))),
    "fused_moe id 2**40 (int64)": ("an int64 id 2**40", dict(ids=_ids_with(2**40, "int64"))),
    "fused_moe expert_map to a missing expert": ("expert_map naming local expert 8 of 8", dict(
        expert_map=ints(0, 1, 2, 3, 4, 5, 6, 8))),
    "fused_moe expert_map -2": ("expert_map with -2", dict(expert_map=ints(0, 1, 2, 3, 4, 5, 6,
                                                                        -2))),
    "fused_moe ids past expert_map": ("expert_map of 4 entries, ids up to 7",
                                      dict(expert_map=ints(0, 1, 2, 3))),
    "fused_moe expert_map float": ("float expert_map", dict(expert_map=T(8))),
    "fused_moe expert_map 2-D": ("expert_map (1, 8)", dict(expert_map=ints(*range(8),
                                                                        shape=(1, 8)))),
    "fused_moe x on meta": ("x on the meta device", dict(x=meta(6, 32, dtype="bfloat16"))),
    "fused_moe x int": ("integer x", dict(x=ints(*[1] * 192, shape=(6, 32)))),
    "fused_moe backend 'cuda' on the CPU": ("backend='cuda'", dict(backend="cuda")),
    "fused_moe triton on fp32": ("backend='triton' with fp32 x and experts", dict(
        x=T(6, 32), w13=T(8, 32, 32), w2=T(8, 32, 16), backend="triton")),
}, fused_bad, "fused_moe", FUSED)


def _fp8_grad(_tmp: Path) -> Outcome:
    from kpt.ops import fused_moe

    torch = torch_()
    x = randn(4, 32, dtype="bfloat16").requires_grad_()
    w13 = randn(2, 256, 32, scale=0.1).to(torch.float8_e4m3fn)
    w2 = randn(2, 32, 128, scale=0.1).to(torch.float8_e4m3fn)
    ids = torch.zeros(4, 1, dtype=torch.int32)
    return expect_error(lambda: fused_moe(x, w13, w2, torch.ones(4, 1), ids,
                                          w13_scale=torch.ones(2, 2, 1),
                                          w2_scale=torch.ones(2, 1, 1)), FUSED)


add("moe", "refuse fused_moe fp8 experts with x requiring grad", "fused_moe of fp8 experts "
    "with x.requires_grad: documented inference only, must be refused", _fp8_grad)


# ---- align -----------------------------------------------------------------------------------


def naive_align(ids: Any, num_experts: int, block_m: int, expert_map: Any = None) -> dict:
    """Per local expert, the ascending pairs it serves, in Python."""
    flat = ids.reshape(-1).tolist()
    if expert_map is not None:
        flat = [int(expert_map[e]) for e in flat]
    return {e: [p for p, x in enumerate(flat) if x == e] for e in range(num_experts)}


def align_case(t: int, k: int, experts: int, block_m: int, ep: bool = False
               ) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops.moe import align, capacity

        torch = torch_()
        gen = torch.Generator().manual_seed(30)
        e_global = experts * 2 if ep else experts
        ids = torch.randint(0, e_global, (t, k), generator=gen, dtype=torch.int32)
        emap = None
        if ep:
            emap = torch.full((e_global,), -1, dtype=torch.int32)
            emap[torch.randperm(e_global, generator=gen)[:experts]] = torch.arange(
                experts, dtype=torch.int32)

        def check() -> str | None:
            sorted_pairs, block_expert, num_padded = align(ids, experts, block_m, emap)
            cap = capacity(t * k, experts, block_m)
            if sorted_pairs.shape[0] != cap or block_expert.shape[0] != cap // block_m:
                return f"sizes {sorted_pairs.shape[0]}, {block_expert.shape[0]} (capacity {cap})"
            want = naive_align(ids, experts, block_m, emap)
            at, sentinel = 0, t * k
            pairs = sorted_pairs.tolist()
            for e in range(experts):
                run_len = -(-len(want[e]) // block_m) * block_m
                got = pairs[at:at + run_len]
                if got != want[e] + [sentinel] * (run_len - len(want[e])):
                    return f"expert {e}: {got[:6]} != {want[e][:6]}"
                for b in range(at // block_m, (at + run_len) // block_m):
                    if int(block_expert[b]) != e:
                        return f"block {b} is labelled {int(block_expert[b])}, expected {e}"
                at += run_len
            if int(num_padded[0]) != at:
                return f"num_padded {int(num_padded[0])} != {at}"
            if any(p != sentinel for p in pairs[at:]) or \
                    any(int(b) != -1 for b in block_expert[at // block_m:]):
                return "entries past num_padded are not the sentinel / -1"
            return None

        return expect_ok(check, ALIGN)

    return run


for _name, _args in {
    "6 tokens x top 2 over 8 experts, block 4": (6, 2, 8, 4),
    "block_m 1": (5, 3, 4, 1),
    "block_m 64 (every expert padded)": (5, 2, 4, 64),
    "no tokens": (0, 2, 4, 16),
    "expert map (4 local of 8)": (7, 2, 4, 4, True),
}.items():
    add("moe", f"align {_name}", f"kpt.ops.moe.align {_name}: every local expert's pairs, "
        "ascending, padded with the sentinel; blocks labelled", align_case(*_args))


def align_bad(ids: Any = None, experts: Any = 8, block_m: Any = 4, expert_map: Any = None
              ) -> Callable[[], Any]:
    def call() -> Any:
        from kpt.ops.moe import align

        value = cu(*range(8), dtype="int32").reshape(4, 2) if ids is None else \
            resolve({"ids": ids})["ids"]
        emap = resolve({"m": expert_map})["m"]
        return align(value, experts, block_m, emap)

    return call


for _name, _call in {
    "num_experts 0": align_bad(experts=0),
    "num_experts 8.0": align_bad(experts=8.0),
    "block_m 0": align_bad(block_m=0),
    "block_m True": align_bad(block_m=True),
    "ids float": align_bad(T(4, 2)),
    "ids 1-D": align_bad(ints(*range(8))),
    "an id 8 of 8 experts": align_bad(ints(0, 1, 2, 3, 4, 5, 6, 8, shape=(4, 2))),
    "an id -3": align_bad(ints(0, 1, 2, 3, 4, 5, 6, -3, shape=(4, 2))),
    "expert_map naming local expert 8": align_bad(expert_map=ints(0, 1, 2, 3, 4, 5, 6, 8)),
    "ids past the expert_map": align_bad(expert_map=ints(0, 1, 2, 3)),
    "expert_map float": align_bad(expert_map=T(8)),
    "block_m 2**40 (capacity past memory)": align_bad(block_m=2**40),
    "num_experts 10**12 (capacity past memory)": align_bad(experts=10**12),
}.items():
    add("moe", f"refuse align {_name}", f"kpt.ops.moe.align with {_name}: must be refused",
        lambda _tmp, call=_call: expect_error(call, ALIGN + ("align",)))
