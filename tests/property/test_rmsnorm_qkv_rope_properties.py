"""Properties of ``kpt.ops.rmsnorm_qkv_rope`` and ``rope_inv_freq`` on generated inputs
(issue 27).

* valid calls (odd hidden sizes, zero tokens, 1-D and 2-D token shapes, GQA, partial rotary,
  neox/gptj, bias as one tensor or row blocks, q/k norm, residual, positions of both int
  dtypes that are negative, huge, broadcast or 0-d, odd eps / theta / rope_scaling, inputs
  in padded, strided, broadcast and permuted layouts): the reference equals float64 math,
  and every backend that declares it can run the call (``SPEC.reasons``) plus the default
  dispatch equal the reference within ``TOLERANCE``;
* ``rope_inv_freq`` equals HF's formulas (default, linear, llama3) computed in float64;
* invalid arguments (types, shapes, dtypes, devices, sizes, scalars, malformed rope_scaling
  dicts, positions): a ValueError / TypeError naming ``rmsnorm_qkv_rope``;
* known bugs, one ``xfail(strict=True)`` test (or parameter) each, at the bottom.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from kpt.ops._common import compare, triton_interpreting
from kpt.ops.rmsnorm_qkv_rope import (
    SPEC,
    TOLERANCE,
    Call,
    problem_of,
    rmsnorm_qkv_rope,
    rope_inv_freq,
)
from tests.property.strategies import (
    check_close,
    expect_named_error,
    layouts,
    props,
    random_tensor,
    relayout,
    seeds,
)

OP = "rmsnorm_qkv_rope"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The reference against float64 math with no intermediate rounding (tests/ops's bound): up to
# six roundings to the dtype on each output add to a few ulps, 4u for bf16 and fp16. In fp32
# what is left is float32 arithmetic over hidden sizes < 50: 1e-5. The RoPE angle is taken
# from the spec as it is, float32 pos * inv_freq, so large positions do not count against it.
REFERENCE_VS_FLOAT64 = {torch.bfloat16: 4 * 2**-8, torch.float16: 4 * 2**-11,
                        torch.float32: 1e-5}
# rope_inv_freq against HF's formulas written out here (float32, HF's operation order): the
# same float32 expression up to the order of a multiply or two, so a few ulps; 1e-6 relative.
# (Against float64 the llama3 blend is ill-conditioned, (L / wavelen - low) / (high - low)
# with high - low small, so float32 itself is off by 1e-5 there: not a property of kpt.)
INV_FREQ_RTOL = 1e-6


# ---- rope_scaling -----------------------------------------------------------------------------

positive = st.floats(1e-3, 1e3)


@st.composite
def rope_scalings(draw):
    kind = draw(st.sampled_from(["none", "empty", "default", "linear", "llama3"]))
    if kind == "none":
        return None
    if kind == "empty":
        return {}
    if kind == "default":
        return {draw(st.sampled_from(["rope_type", "type"])): "default"}
    if kind == "linear":
        return {draw(st.sampled_from(["rope_type", "type"])): "linear", "factor": draw(positive)}
    low = draw(st.floats(0.1, 8.0))
    return {"rope_type": "llama3", "factor": draw(st.floats(1.0, 64.0)),
            "low_freq_factor": low, "high_freq_factor": low + draw(st.floats(0.1, 8.0)),
            "original_max_position_embeddings": draw(st.sampled_from([256, 8192, 2**20]))}


def hf_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """HF's ``_compute_default_rope_parameters`` / ``_compute_linear_scaling_rope_parameters``
    / ``_compute_llama3_parameters`` (transformers 4.48), written out in float32."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv = 1.0 / (theta**exponents)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor",
                                                  "high_freq_factor"))
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        llama = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * llama / factor + smooth * llama
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = torch.where(medium, smoothed, llama)
    return inv


@props(150)
@given(st.integers(1, 64).map(lambda n: 2 * n),
       st.one_of(st.floats(1.5, 1e7), st.integers(2, 10**6)), rope_scalings())
def test_rope_inv_freq_is_hfs(rotary_dim, theta, scaling):
    got = rope_inv_freq(rotary_dim, theta, scaling, torch.device("cpu"))
    assert got.dtype == torch.float32 and got.shape == (rotary_dim // 2,)
    torch.testing.assert_close(got, hf_inv_freq(rotary_dim, theta, scaling),
                               rtol=INV_FREQ_RTOL, atol=0)
    # cached per (size, theta, scaling, device): the same tensor again
    assert rope_inv_freq(rotary_dim, theta, scaling, torch.device("cpu")) is got


# ---- float64 truth ------------------------------------------------------------------------------


def float64_truth(a: dict) -> tuple[torch.Tensor, ...]:
    """The op with no intermediate rounding, on the inputs' values (float64), except the RoPE
    angle, which the spec forms in float32 (as HF does)."""
    x = a["x"].double()
    lead, hidden = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, hidden)
    h = x + a["residual"].double().reshape(-1, hidden) if a.get("residual") is not None else x
    eps = a["eps"]

    def norm(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w.double()

    weight = a["qkv_weight"]
    weight = torch.cat(list(weight)) if isinstance(weight, (list, tuple)) else weight
    qkv = norm(h, a["norm_weight"]) @ weight.double().t()
    bias = a.get("qkv_bias")
    if bias is not None:
        qkv = qkv + (torch.cat(list(bias)) if isinstance(bias, (list, tuple)) else bias).double()
    nq, nkv, d = a["num_q_heads"], a["num_kv_heads"], a["head_dim"]
    rd = a.get("rotary_dim") or d
    tokens = x.shape[0]
    q = qkv[:, : nq * d].reshape(tokens, nq, d)
    k = qkv[:, nq * d: (nq + nkv) * d].reshape(tokens, nkv, d)
    v = qkv[:, (nq + nkv) * d:].reshape(tokens, nkv, d)
    if a.get("q_norm_weight") is not None:
        q, k = norm(q, a["q_norm_weight"]), norm(k, a["k_norm_weight"])
    inv_freq = rope_inv_freq(rd, a["rope_theta"], a["rope_scaling"], torch.device("cpu"))
    pos = a["positions"].expand(lead).reshape(-1)
    angle = (pos.float()[:, None] * inv_freq[None, :]).double()
    c, s = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rope(t):
        rot, rest = t[..., :rd], t[..., rd:]
        if a["rope_style"] == "neox":
            x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
            out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).flatten(-2)
        return torch.cat([out, rest], -1)

    outs = [rope(q).reshape(*lead, nq, d), rope(k).reshape(*lead, nkv, d),
            v.reshape(*lead, nkv, d)]
    if a.get("residual") is not None:
        outs.append(h.reshape(*lead, hidden))
    return tuple(outs)


# ---- cases --------------------------------------------------------------------------------------


@st.composite
def valid_calls(draw) -> dict:
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.one_of(st.tuples(st.integers(0, 6)),
                          st.tuples(st.integers(1, 2), st.integers(0, 4))))
    hidden = draw(st.integers(1, 48))
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d = draw(st.sampled_from([2, 4, 6, 8, 16, 24, 32, 3, 5]))  # odd: the reference only
    # rotary_dim: None means head_dim, which must then be even
    partial = st.integers(1, d // 2).map(lambda n: 2 * n)
    rotary = draw(st.one_of(st.none(), partial) if d % 2 == 0 else partial)
    positions = draw(st.sampled_from(["arange", "random", "huge", "negative", "one", "0-d",
                                      "per_row", "expanded"]))
    return dict(
        dtype=dtype, lead=lead, hidden=hidden, num_q_heads=hkv * group, num_kv_heads=hkv,
        head_dim=d, rotary_dim=rotary, rope_style=draw(st.sampled_from(["neox", "gptj"])),
        bias=draw(st.sampled_from(["none", "tensor", "blocks"])),
        weight=draw(st.sampled_from(["tensor", "blocks", "adjacent_views"])),
        qk_norm=draw(st.booleans()), residual=draw(st.booleans()),
        eps=draw(st.one_of(st.sampled_from([1e-6, 1e-5]), st.floats(1e-12, 10.0))),
        rope_theta=draw(st.one_of(st.sampled_from([10000.0, 500000.0, 2]),
                                  st.floats(1.5, 1e7))),
        rope_scaling=draw(rope_scalings()), positions=positions,
        pos_dtype=draw(st.sampled_from([torch.int32, torch.int64])), seed=draw(seeds),
        layouts={name: (draw(layouts), draw(st.integers(0, 2)))
                 for name in ("x", "residual", "norm_weight", "qkv_weight", "qkv_bias")})


def make_args(case: dict) -> dict:
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, lead, hidden = case["dtype"], case["lead"], case["hidden"]
    nq, nkv, d = case["num_q_heads"], case["num_kv_heads"], case["head_dim"]
    rows = [nq * d, nkv * d, nkv * d]
    lay = case["layouts"]

    def rand(name, shape, scale=1.0, shift=0.0):
        t = random_tensor(gen, shape, dtype, scale, shift)
        return relayout(t, *lay[name]) if name in lay else t

    args = dict(x=rand("x", (*lead, hidden)),
                norm_weight=rand("norm_weight", (hidden,), 0.2, 1.0),
                num_q_heads=nq, num_kv_heads=nkv, head_dim=d, eps=case["eps"],
                rope_theta=case["rope_theta"], rope_scaling=case["rope_scaling"],
                rotary_dim=case["rotary_dim"], rope_style=case["rope_style"])
    weight = rand("qkv_weight", (sum(rows), hidden), hidden**-0.5)
    if case["weight"] == "blocks":  # three separate tensors (copied together)
        weight = [w.clone() for w in weight.split(rows)]
    elif case["weight"] == "adjacent_views":  # adjacent in one storage: joined without a copy
        weight = list(weight.contiguous().split(rows))
    args["qkv_weight"] = weight
    if case["bias"] != "none":
        bias = rand("qkv_bias", (sum(rows),), 0.5)
        args["qkv_bias"] = list(bias.split(rows)) if case["bias"] == "blocks" else bias
    if case["qk_norm"]:  # contiguous only: strided ones are a known Triton bug (below)
        args["q_norm_weight"] = random_tensor(gen, (d,), dtype, 0.2, 1.0)
        args["k_norm_weight"] = random_tensor(gen, (d,), dtype, 0.2, 1.0)
    if case["residual"]:
        args["residual"] = rand("residual", (*lead, hidden))
    pdt, kind = case["pos_dtype"], case["positions"]
    if kind == "arange":
        pos = torch.arange(math.prod(lead), dtype=pdt).reshape(lead)
    elif kind in ("random", "negative", "huge"):
        lo, hi = {"random": (0, 8192), "negative": (-8192, 0),
                  "huge": (-(2**31), 2**31 - 1)}[kind]
        pos = torch.randint(lo, hi, lead, generator=gen).to(pdt)
    elif kind == "one":
        pos = torch.tensor([7], dtype=pdt)
    elif kind == "0-d":
        pos = torch.tensor(5, dtype=pdt)
    elif kind == "per_row":  # one position per leading row, broadcast over the last dim
        pos = torch.arange(lead[0], dtype=pdt).reshape(lead[0], *([1] * (len(lead) - 1)))
    else:  # a stride-0 view over the tokens
        pos = torch.tensor([3], dtype=pdt).expand(lead)
    args["positions"] = pos
    return args


def runnable(args: dict) -> list[str]:
    x = args["x"]
    hidden = x.shape[-1]
    empty = x.new_empty(0)
    weight = args["qkv_weight"]
    bias = args.get("qkv_bias")
    call = Call(x.reshape(-1, hidden), args.get("residual"), args["norm_weight"],
                weight[0] if isinstance(weight, list) else weight,
                bias[0] if isinstance(bias, list) else bias, args.get("q_norm_weight"),
                args.get("k_norm_weight"), args["positions"], empty, args["num_q_heads"],
                args["num_kv_heads"], args["head_dim"], args["rotary_dim"] or args["head_dim"],
                args["eps"], args["rope_style"] == "neox", empty, empty, empty, None)
    problem = problem_of(call)
    names = [b.name for b in SPEC.backends if not SPEC.reasons(b, problem)]
    assert "reference" in names, "the reference must run every valid call"
    if args["head_dim"] % 2 == 0 and triton_interpreting():
        assert "triton" in names, "Triton (interpreter) must take every even head_dim"
    return names


# ---- valid inputs -------------------------------------------------------------------------------


@props(60)
@given(valid_calls())
def test_valid_calls_match_reference(case):
    args = make_args(case)
    dtype = case["dtype"]
    ref = rmsnorm_qkv_rope(**args, backend="reference")
    lead, nq, nkv, d = case["lead"], case["num_q_heads"], case["num_kv_heads"], case["head_dim"]
    shapes = [(*lead, nq, d), (*lead, nkv, d), (*lead, nkv, d)]
    if case["residual"]:
        shapes.append((*lead, case["hidden"]))
    assert [tuple(t.shape) for t in ref] == shapes and all(t.dtype == dtype for t in ref)
    for label, out, exact in zip("qkvr", ref, float64_truth(args)):
        check_close(compare(f"reference.{label}", out, exact, REFERENCE_VS_FLOAT64[dtype]))
    for backend in [*runnable(args), None]:
        outs = rmsnorm_qkv_rope(**args, backend=backend)
        event(f"compared {backend}")  # hypothesis statistics: what ran
        assert len(outs) == len(ref)
        for label, out, want in zip("qkvr", outs, ref):
            check_close(compare(f"{backend}.{label}", out, want, TOLERANCE[dtype]))


# ---- invalid inputs -----------------------------------------------------------------------------


def _base(draw) -> dict:
    gen = torch.Generator().manual_seed(draw(seeds))
    dtype = draw(st.sampled_from(DTYPES))
    return dict(x=random_tensor(gen, (3, 16), dtype), norm_weight=random_tensor(gen, (16,), dtype),
                qkv_weight=random_tensor(gen, (4 * 8, 16), dtype),
                positions=torch.arange(3), num_q_heads=2, num_kv_heads=1, head_dim=8)


bad_size = st.sampled_from([0, -1, -8, True, False, 2.0, "2", None, np.int64(2), [2]])
bad_positive = st.sampled_from([0, -1e-6, -1.0, math.nan, math.inf, -math.inf, "1e-6", None,
                                [1e-6], np.float32(1e-6), torch.tensor(1e-6), 1j])
bad_theta = st.sampled_from([0, -1.0, -10000.0, math.nan, math.inf, -math.inf, "10000", None,
                             torch.tensor(10000.0), 1j, [10000.0], True,
                             np.float32(10000.0)])
bad_scaling = st.sampled_from([
    "linear", ["linear"], [("rope_type", "linear"), ("factor", 2.0)], 2.0, True,
    {"rope_type": "yarn", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
    {"rope_type": None}, {"rope_type": ["linear"]}, {"rope_type": 3},
    {"rope_type": "linear"}, {"type": "linear", "factor": 0.0}, {"type": "linear", "factor": -1},
    {"type": "linear", "factor": math.nan}, {"type": "linear", "factor": math.inf},
    {"type": "linear", "factor": "2"}, {"type": "linear", "factor": True},
    {"type": "linear", "factor": [2.0]},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 0},
])


@st.composite
def invalid_calls(draw) -> dict:
    a = _base(draw)
    x, dtype = a["x"], a["x"].dtype
    other = draw(st.sampled_from([dt for dt in (*DTYPES, torch.float64) if dt != dtype]))
    kind = draw(st.sampled_from([
        "x_type", "x_dtype", "x_rank", "size", "heads_not_multiple", "rotary", "eps", "style",
        "norm_weight", "qkv_weight", "qkv_bias", "qk_norm", "residual", "positions", "theta",
        "scaling", "device", "backend"]))
    if kind == "x_type":
        a["x"] = draw(st.sampled_from([x.tolist(), x.float().numpy(), 1.0, None]))
    elif kind == "x_dtype":
        a["x"] = x.to(draw(st.sampled_from([torch.float64, torch.int32, torch.bool,
                                            torch.complex64])))
    elif kind == "x_rank":
        a["x"] = draw(st.sampled_from([x[0], x[0, 0]]))
    elif kind == "size":
        name = draw(st.sampled_from(["num_q_heads", "num_kv_heads", "head_dim", "rotary_dim"]))
        value = draw(bad_size)
        a[name] = 0 if value is None and name == "rotary_dim" else value  # None: head_dim
    elif kind == "heads_not_multiple":
        a["num_q_heads"], a["num_kv_heads"], a["head_dim"] = 3, 2, 4  # rows: (3 + 4) * 4
        a["qkv_weight"] = a["qkv_weight"][:28]
    elif kind == "rotary":
        a["rotary_dim"] = draw(st.sampled_from([1, 3, 7, 10, 16]))  # odd, or > head_dim 8
    elif kind == "eps":
        a["eps"] = draw(bad_positive)
    elif kind == "style":
        a["rope_style"] = draw(st.sampled_from(["gpt-j", "NEOX", "", None, ["neox"], True]))
    elif kind == "norm_weight":
        nw = a["norm_weight"]
        a["norm_weight"] = draw(st.sampled_from([nw[:-1], nw[None], nw.to(other),
                                                 nw.tolist(), torch.cat([nw, nw])]))
    elif kind == "qkv_weight":
        w = a["qkv_weight"]
        a["qkv_weight"] = draw(st.sampled_from([
            w[:-1], w[:, :-1], w.t(), w.to(other), w[0], [], (), [w[:8], w[8:].to(other)],
            [w[:8], w[8:, :-1]], w.numpy() if dtype != torch.bfloat16 else w.tolist(),
            [w[:8].tolist(), w[8:]], None]))
    elif kind == "qkv_bias":
        a["qkv_bias"] = draw(st.sampled_from([
            torch.zeros(31, dtype=dtype), torch.zeros(32, dtype=other),
            torch.zeros(1, 32, dtype=dtype), [torch.zeros(8, dtype=dtype)], [1.0] * 32,
            np.zeros(32, np.float32), torch.zeros(32, dtype=torch.int64)]))
    elif kind == "qk_norm":
        w = torch.ones(8, dtype=dtype)
        choice = draw(st.sampled_from(["only_q", "only_k", "length", "dtype", "rank", "list"]))
        if choice == "only_q":
            a["q_norm_weight"] = w
        elif choice == "only_k":
            a["k_norm_weight"] = w
        else:
            bad = {"length": w[:4], "dtype": w.to(other), "rank": w[None],
                   "list": w.tolist()}[choice]
            a["q_norm_weight"], a["k_norm_weight"] = w, bad
            if draw(st.booleans()):
                a["q_norm_weight"], a["k_norm_weight"] = bad, w
    elif kind == "residual":
        a["residual"] = draw(st.sampled_from([x[:2], x[:, :-1], x.to(other), x[None], x.tolist()]))
    elif kind == "positions":
        a["positions"] = draw(st.sampled_from([
            torch.arange(3.0), torch.arange(4), torch.arange(6).reshape(2, 3),
            torch.arange(3).reshape(3, 1), [0, 1, 2], np.arange(3), torch.arange(3) > 0,
            torch.arange(3, dtype=torch.int16), None]))
    elif kind == "theta":
        a["rope_theta"] = draw(bad_theta)
    elif kind == "scaling":
        a["rope_scaling"] = draw(bad_scaling)
    elif kind == "device":
        name = draw(st.sampled_from(["norm_weight", "qkv_weight", "positions", "residual"]))
        a[name] = (x if name == "residual" else a[name]).to("meta")
    else:
        a["backend"] = draw(st.sampled_from(["nope", "", "Triton", 0, ["reference"]]))
    a.setdefault("backend", draw(st.sampled_from([None, "reference", "triton"])))
    return a


@props(300)
@given(invalid_calls())
def test_invalid_arguments_raise_named_errors(args):
    expect_named_error(lambda: rmsnorm_qkv_rope(**args), OP)


@props(60)
@given(st.one_of(st.tuples(st.just("theta"), bad_theta),
                 st.tuples(st.just("rope_scaling"), bad_scaling)))
def test_rope_inv_freq_rejects_bad_arguments(bad):
    """(rotary_dim: test_rope_inv_freq_rejects_bad_rotary_dim.)"""
    name, value = bad
    args = dict(rotary_dim=16, theta=10000.0, rope_scaling=None, device=torch.device("cpu"))
    args[name] = value
    expect_named_error(lambda: rope_inv_freq(**args), OP)


# ---- known bugs ---------------------------------------------------------------------------------


def _small(dtype=torch.float16):
    gen = torch.Generator().manual_seed(0)
    x = random_tensor(gen, (3, 32), dtype)
    return dict(x=x, norm_weight=random_tensor(gen, (32,), dtype, 0.2, 1.0),
                qkv_weight=random_tensor(gen, (4 * 16, 32), dtype, 32**-0.5),
                positions=torch.arange(3), num_q_heads=2, num_kv_heads=1, head_dim=16)


@pytest.mark.skipif(not triton_interpreting(), reason="runs Triton under its interpreter")
@pytest.mark.parametrize("layout", ["strided", "broadcast"])
def test_triton_non_contiguous_qk_norm_weights(layout):
    args = _small()
    base = random_tensor(torch.Generator().manual_seed(1), (32,), torch.float16, 0.2, 1.0)
    args["q_norm_weight"] = base[::2] if layout == "strided" else base[:1].expand(16)
    args["k_norm_weight"] = base[1::2] if layout == "strided" else base[1:2].expand(16)
    got = rmsnorm_qkv_rope(**args, backend="triton")
    want = rmsnorm_qkv_rope(**args, backend="reference")
    for label, out, ref in zip("qkv", got, want):
        check_close(compare(f"triton.{label}", out, ref, TOLERANCE[torch.float16]))


def test_zero_hidden_size():
    args = _small()
    args.update(x=args["x"][:, :0], norm_weight=args["norm_weight"][:0],
                qkv_weight=args["qkv_weight"][:, :0])
    expect_named_error(lambda: rmsnorm_qkv_rope(**args), OP)


@pytest.mark.parametrize(("cached", "value"), [(1, True), (10000.0, np.float32(10000.0))],
                         ids=["bool", "numpy"])
def test_theta_validation_does_not_depend_on_the_cache(cached, value):
    """Regression (found by this suite, fixed in b75188f): rope_theta was validated only on
    a cache miss, so True passed once 1 was cached (True == 1), np.float32(10000) once the
    default 10000.0 was, and an unhashable theta raised 'unhashable type: list'."""
    rope_inv_freq(14, cached, None, torch.device("cpu"))
    expect_named_error(lambda: rope_inv_freq(14, value, None, torch.device("cpu")), OP)
    expect_named_error(lambda: rmsnorm_qkv_rope(**_small(), rope_theta=value), OP)


@pytest.mark.parametrize("rotary_dim", [0, -4, 5, 4.0, True, "4", None])
def test_rope_inv_freq_rejects_bad_rotary_dim(rotary_dim):
    expect_named_error(lambda: rope_inv_freq(rotary_dim, 10000.0, None, torch.device("cpu")),
                       OP)


def test_bool_eps_is_rejected():
    expect_named_error(lambda: rmsnorm_qkv_rope(**_small(), eps=True), OP)
