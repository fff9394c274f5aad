"""Adversarial scenarios of ``kpt.quant`` (round-to-nearest wrappers, GPTQ, GPTQ / AWQ
checkpoint import, ``Calibrator``, ``quantize_model``), registered into
``scripts/adversarial.py``'s table (which imports this file; run that one): results against
the formats ``fp8_gemm`` / ``int4_gemm`` read and against round-to-nearest, bad arguments,
singular Hessians, non-finite calibration data and malformed checkpoint tensors.
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
    expect_error,
    expect_ok,
    meta,
    mismatch,
    randn,
    resolve,
)
from adversarial_gemm import g_idx_with, ints, naive_fp8_gemm, refuse, torch_

AREAS.update({"quant": "kpt.quant"})

Q = "kpt.quant"


def _rtn_int4_same(_tmp: Path) -> Outcome:
    from kpt.ops import pack_int4
    from kpt.quant import rtn_int4

    torch = torch_()
    w = randn(16, 64)

    def check() -> str | None:
        got, want = rtn_int4(w, 32), pack_int4(w, 32)
        same = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, want))
        return None if same else "rtn_int4 differs from pack_int4"

    return expect_ok(check, ("rtn_int4", "pack_int4"))


add("quant", "rtn_int4 is pack_int4", "kpt.quant.rtn_int4(w, 32) returns pack_int4(w, 32)",
    _rtn_int4_same)


def _rtn_fp8(granularity: str) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops import fp8_gemm, quantize_fp8
        from kpt.quant import rtn_fp8

        torch = torch_()
        w = randn(48, 160, scale=0.2)
        a8, sa = quantize_fp8(randn(3, 160), "row")

        def check() -> str | None:
            w8, sw = rtn_fp8(w, granularity)
            y = fp8_gemm(a8, w8, sa, sw, out_dtype=torch.float32)
            return mismatch(y, naive_fp8_gemm(a8, sa, w8, sw), 1e-5, "fp8_gemm(rtn_fp8)")

        return expect_ok(check, ("rtn_fp8", "fp8_gemm"))

    return run


for _g in ("row", "block", "tensor"):
    add("quant", f"rtn_fp8 {_g} feeds fp8_gemm", f"rtn_fp8(w, {_g!r}) is read by fp8_gemm as "
        "the weight it encodes", _rtn_fp8(_g))


def _gptq_case(act_order: bool, symmetric: bool, group: int) -> Callable[[Path], Outcome]:
    """GPTQ on a layer with calibration inputs: its output error on those inputs is no larger
    than round-to-nearest's (what GPTQ minimises), and int4_gemm reads the result."""

    def run(_tmp: Path) -> Outcome:
        from kpt.ops import dequantize_int4, int4_gemm, pack_int4
        from kpt.quant import gptq_int4

        torch = torch_()
        w = randn(16, 64, seed=10, scale=0.3)
        x = randn(256, 64, seed=11) * (1 + 4 * (torch.arange(64) % 5 == 0))

        def check() -> str | None:
            res = gptq_int4(w, x, group, symmetric, act_order)
            deq = dequantize_int4(*res[:3], group_size=group, g_idx=res.g_idx)
            rtn = dequantize_int4(*pack_int4(w, group, symmetric), group_size=group)
            err = ((x @ (deq - w).T) ** 2).sum().item()
            err_rtn = ((x @ (rtn - w).T) ** 2).sum().item()
            if not err <= err_rtn * 1.0001:  # GPTQ minimises this output error
                return f"GPTQ output error {err:.4g} above round-to-nearest's {err_rtn:.4g}"
            y = int4_gemm(x[:3].bfloat16(), *res[:3], group_size=group, g_idx=res.g_idx)
            return mismatch(y, x[:3].bfloat16().double() @ deq.bfloat16().double().T,
                            TOL["bfloat16"], "int4_gemm(gptq)")

        return expect_ok(check, ("gptq_int4",))

    return run


add("quant", "gptq_int4 g32 zero-point beats RTN", "gptq_int4 (group 32, zero points) on "
    "calibration inputs: output error <= RTN's, int4_gemm reads it", _gptq_case(False, False, 32))
add("quant", "gptq_int4 act-order symmetric beats RTN", "gptq_int4 (act_order, symmetric, "
    "group 32)", _gptq_case(True, True, 32))
add("quant", "gptq_int4 per channel beats RTN", "gptq_int4 (group_size -1)",
    _gptq_case(False, False, -1))


def gptq_bad(**override: Any) -> Callable[[], Any]:
    def call() -> Any:
        from kpt.quant import gptq_int4

        args = {**dict(weight=randn(16, 64), hessian_or_inputs=randn(32, 64), group_size=32),
                **resolve(override)}
        return gptq_int4(**args)

    return call


def _nan_inputs() -> Any:
    x = randn(32, 64)
    x[3, 3] = float("nan")
    return x


refuse("quant", {
    "gptq damp nan": ("damp=nan", dict(damp=math.nan)),
    "gptq damp inf": ("damp=inf", dict(damp=math.inf)),
    "gptq damp -0.1": ("damp=-0.1", dict(damp=-0.1)),
    "gptq damp 0 on a singular Hessian": ("a rank-1 Hessian with damp=0", dict(
        damp=0.0, hessian_or_inputs=Lazy(lambda: randn(1, 64)))),
    "gptq block_size 0": ("block_size=0", dict(block_size=0)),
    "gptq block_size 2.5": ("block_size=2.5", dict(block_size=2.5)),
    "gptq act_order 'yes'": ("act_order='yes'", dict(act_order="yes")),
    "gptq NaN in the inputs": ("calibration inputs with a NaN",
                               dict(hessian_or_inputs=Lazy(_nan_inputs))),
    "gptq inputs of K = 32": ("inputs (32, 32) for a K = 64 weight",
                              dict(hessian_or_inputs=T(32, 32))),
    "gptq Hessian (64, 63)": ("is_hessian=True with a (64, 63) tensor",
                              dict(hessian_or_inputs=T(64, 63), is_hessian=True)),
    "gptq no tokens": ("inputs of shape (0, 64)", dict(hessian_or_inputs=T(0, 64))),
    "gptq weight 1-D": ("a 1-D weight", dict(weight=T(64))),
    "gptq weight int": ("an integer weight", dict(weight=Lazy(lambda: randn(16, 64).int()))),
    "gptq inputs on meta": ("inputs on the meta device",
                            dict(hessian_or_inputs=meta(32, 64))),
    "gptq group_size 100": ("group_size=100", dict(group_size=100)),
}, gptq_bad, "gptq_int4", ("gptq_int4",))


def _rtn_fp8_bad(weight: Any, granularity: str = "row") -> Callable[[], Any]:
    def call() -> Any:
        from kpt.quant import rtn_fp8

        return rtn_fp8(resolve({"w": weight})["w"], granularity)

    return call


for _name, _call in {
    "rtn_fp8 granularity 'channel'": _rtn_fp8_bad(T(16, 32), "channel"),
    "rtn_fp8 weight 1-D": _rtn_fp8_bad(T(32)),
    "rtn_fp8 weight int": _rtn_fp8_bad(Lazy(lambda: randn(16, 32).int())),
    "rtn_fp8 weight a list": _rtn_fp8_bad([[1.0, 2.0]]),
}.items():
    add("quant", f"refuse {_name}", f"kpt.quant.{_name}: must be refused",
        lambda _tmp, call=_call: expect_error(call, ("rtn_fp8", "quantize_fp8")))


def _gptq_checkpoint(n: int = 16, k: int = 64, group: int = 32, v1: bool = True,
                     sym: bool = False) -> dict:
    """A GPTQ checkpoint's tensors written here from random codes: qweight (K // 8, N),
    qzeros (G, N // 8) holding z - 1 (v1) or z, scales (G, N) fp16."""
    torch = torch_()
    gen = torch.Generator().manual_seed(12)
    groups = k // group
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.full((groups, n), 8) if sym else torch.randint(1, 16, (groups, n),
                                                                 generator=gen)

    def pack_rows(values: Any) -> Any:  # (R, C) codes -> (R, C // 8) words, nibble j = col 8c+j
        r, c = values.shape
        v = values.reshape(r, c // 8, 8).long()
        words = sum(v[..., j] << (4 * j) for j in range(8))
        return torch.where(words >= 2**31, words - 2**32, words).int()

    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        qweight |= codes.T[j::8].long() << (4 * j)
    qweight = torch.where(qweight >= 2**31, qweight - 2**32, qweight).int()
    qzeros = pack_rows(zeros - 1 if v1 else zeros)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 1e-3).half()
    return dict(qweight=qweight, qzeros=qzeros, scales=scales, codes=codes, zeros=zeros,
                group_size=group)


def _from_gptq_case(v1: bool, sym: bool) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops import dequantize_int4
        from kpt.quant import from_gptq

        torch = torch_()
        c = _gptq_checkpoint(v1=v1, sym=sym)

        def check() -> str | None:
            res = from_gptq(c["qweight"], c["qzeros"], c["scales"], None, 4, 32, sym,
                            checkpoint_format="gptq" if v1 else "gptq_v2")
            got = dequantize_int4(*res[:3], group_size=32, g_idx=res.g_idx)
            g = torch.arange(64) // 32
            want = (c["codes"] - c["zeros"].T[:, g]).double() * c["scales"].double().T[:, g]
            return mismatch(got, want, 0.0, "dequantised checkpoint")

        return expect_ok(check, ("from_gptq",))

    return run


add("quant", "from_gptq v1 zero-point", "from_gptq of a v1 checkpoint written here: weights "
    "equal (q - z) * s exactly", _from_gptq_case(True, False))
add("quant", "from_gptq v2 symmetric", "from_gptq of a gptq_v2 symmetric checkpoint",
    _from_gptq_case(False, True))


def gptq_import_bad(**override: Any) -> Callable[[], Any]:
    def call() -> Any:
        from kpt.quant import from_gptq

        c = _gptq_checkpoint()
        args = {**dict(qweight=c["qweight"], qzeros=c["qzeros"], scales=c["scales"],
                       g_idx=None, bits=4, group_size=32, sym=False), **resolve(override)}
        return from_gptq(**args)

    return call


def _v1_zero_of_zero() -> Any:
    c = _gptq_checkpoint()
    q = c["qzeros"].clone()
    q[0, 0] |= 0xF  # nibble 15: v1's wrapped zero point 0
    return q


refuse("quant", {
    "from_gptq bits 8": ("bits=8", dict(bits=8)),
    "from_gptq format 'v3'": ("checkpoint_format='v3'", dict(checkpoint_format="v3")),
    "from_gptq sym 1": ("sym=1", dict(sym=1)),
    "from_gptq qweight int64": ("int64 qweight",
                                dict(qweight=Lazy(lambda: _gptq_checkpoint()["qweight"].long()))),
    "from_gptq qzeros of 3 columns": ("qzeros (2, 3) for N = 16",
                                      dict(qzeros=ints(*[0] * 6, shape=(2, 3)))),
    "from_gptq scales float64": ("float64 scales", dict(scales=T(2, 16, dtype="float64"))),
    "from_gptq g_idx past G": ("g_idx with an entry 2 (G = 2)",
                               dict(g_idx=Lazy(lambda: g_idx_with(2, k=64).make()))),
    "from_gptq g_idx float": ("float g_idx", dict(g_idx=T(64))),
    "from_gptq a v1 zero point of 0": ("a v1 qzeros nibble 15",
                                       dict(qzeros=Lazy(_v1_zero_of_zero))),
    "from_gptq sym with zero points not 8": ("sym=True on zero-point tensors", dict(sym=True)),
    "from_gptq group_size 48": ("group_size=48", dict(group_size=48)),
}, gptq_import_bad, "from_gptq", ("from_gptq",))


def awq_bad(**override: Any) -> Callable[[], Any]:
    def call() -> Any:
        from kpt.quant import from_awq

        args = dict(qweight=ints(*[0] * 64 * 2, shape=(64, 2)).make(),
                    qzeros=ints(0, 0, 0, 0, shape=(2, 2)).make(), scales=T(2, 16).make(),
                    group_size=32)
        args.update(resolve(override))
        return from_awq(**args)

    return call


refuse("quant", {
    "from_awq qweight of K = 60": ("qweight (60, 2)", dict(qweight=ints(*[0] * 120,
                                                                    shape=(60, 2)))),
    "from_awq qweight 0 columns": ("qweight (64, 0)", dict(qweight=ints(shape=(64, 0)))),
    "from_awq qzeros int64": ("int64 qzeros", dict(qzeros=ints(0, 0, 0, 0, dtype="int64",
                                                            shape=(2, 2)))),
    "from_awq scales (2, 15)": ("scales (2, 15)", dict(scales=T(2, 15))),
    "from_awq group_size 0": ("group_size=0", dict(group_size=0)),
}, awq_bad, "from_awq", ("from_awq",))


def _calibrator_bad(kind: str) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.quant import Calibrator, quantize_model

        torch = torch_()
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 16))

        def call() -> Any:
            if kind == "not linear":
                return Calibrator(model, ["1"])
            if kind == "missing":
                return Calibrator(model, ["nope"])
            if kind == "dtype":
                return Calibrator(model, dtype=torch.float16)
            if kind == "no inputs":
                return Calibrator(model).hessian("0")
            if kind == "sequential":
                return quantize_model(model, lambda: model(randn(4, 64)), sequential="yes")
            return quantize_model(model, lambda: model(randn(4, 64)), group_size=48)

        return expect_error(call, ("Calibrator", "quantize_model", "gptq_int4"))

    return run


for _kind, _what in {"not linear": "a ReLU module to watch", "missing": "an unknown module",
                     "dtype": "dtype=float16", "no inputs": "hessian() before any input",
                     "sequential": "quantize_model(sequential='yes')",
                     "group": "quantize_model(group_size=48)"}.items():
    add("quant", f"refuse Calibrator/quantize_model {_kind}", f"{_what}: must be refused",
        _calibrator_bad(_kind))


def _quantize_model_ok(_tmp: Path) -> Outcome:
    from kpt.quant import quantize_model

    torch = torch_()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    data = randn(64, 64, seed=13)

    def check() -> str | None:
        with torch.no_grad():
            before = model(data)
        out = quantize_model(model, lambda: model(data), group_size=32)
        if sorted(out) != ["0", "2"]:
            return f"quantised {sorted(out)}"
        with torch.no_grad():
            after = model(data)
        rel = ((after - before).norm() / before.norm()).item()
        return None if rel < 0.2 else f"relative output error {rel:.3f} after int4 GPTQ"

    return expect_ok(check, ("quantize_model",))


add("quant", "quantize_model on a two-layer MLP", "quantize_model(group_size=32): both Linear "
    "layers quantised, the model's output within 20% (int4 of random weights)",
    _quantize_model_ok, timeout=120)
