"""Adversarial scenarios of the quantised GEMMs (``fp8_gemm`` / ``quantize_fp8``,
``int4_gemm`` / ``pack_int4`` / ``dequantize_int4``), registered into
``scripts/adversarial.py``'s table (which imports this file; run that one). The classes are
those of the other areas: valid calls against float64 math written here (reference and
Triton-interpreter backends, strided, transposed and stride-0 views, empty sizes), wrong
shapes / dtypes / devices / types, out-of-range index content on the CPU, NaN / inf scalars
and absurd size hints. Its helpers (``refuse``, ``ints``, the float64 math) serve the sibling
files ``adversarial_quant.py``, ``adversarial_moe.py`` and ``adversarial_paged.py`` too.
"""

from __future__ import annotations

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

AREAS.update({"fp8": "fp8_gemm", "int4": "int4_gemm"})


def refuse(area: str, table: dict[str, tuple[str, dict]], make: Callable[..., Callable],
           op: str, names: tuple[str, ...]) -> None:
    """One "must be refused" scenario per entry of ``table`` ({name: (what, override)})."""
    for name, (what, override) in table.items():
        call = make(**override)
        add(area, f"refuse {name}", f"{op} with {what}: must be refused",
            lambda _tmp, call=call: expect_error(call, names))


def torch_() -> Any:
    import torch

    return torch


# =============================================================================================
# fp8_gemm / quantize_fp8
# =============================================================================================

F8 = ("fp8_gemm",)
QF8 = ("quantize_fp8",)
E4M3_MAX = 448.0


def naive_fp8_gemm(a8: Any, a_scale: Any, w8: Any, w_scale: Any, bias: Any = None) -> Any:
    """float64 ``(a8 * a_scale) @ (w8 * w_scale).T + bias`` with each scale's block read off
    its shape (one, per row, or 1x128 / 128x128 blocks), element by element."""
    torch = torch_()

    def expand(x8: Any, s: Any, block: tuple[int, int]) -> Any:
        s = s.double().reshape(s.shape if s.numel() != 1 else (1, 1))
        rows, cols = x8.shape
        if s.numel() == 1:
            return x8.double() * s.reshape(())
        if tuple(s.shape) == (rows, 1):
            return x8.double() * s
        r = torch.arange(rows)[:, None] // block[0]
        c = torch.arange(cols)[None, :] // block[1]
        return x8.double() * s[r, c]

    y = expand(a8, a_scale, (1, 128)) @ expand(w8, w_scale, (128, 128)).T
    return y if bias is None else y + bias.double()


def fp8_inputs(m: int = 5, n: int = 48, k: int = 160, a_gran: str = "row",
               w_gran: str = "row", dtype: str = "float8_e4m3fn") -> tuple[Any, ...]:
    from kpt.ops import quantize_fp8

    torch = torch_()
    fp8 = getattr(torch, dtype)
    a, w = randn(m, k, seed=1), randn(n, k, seed=2, scale=0.2)
    a8, sa = quantize_fp8(a, a_gran, fp8, **({"block": (1, 128)} if a_gran == "block" else {}))
    w8, sw = quantize_fp8(w, w_gran, fp8,
                          **({"block": (128, 128)} if w_gran == "block" else {}))
    return a8, sa, w8, sw


def fp8_case(backend: str, m: int = 5, a_gran: str = "row", w_gran: str = "row",
             out: str = "bfloat16", bias: bool = False, dtype: str = "float8_e4m3fn",
             view: Callable[[dict], dict] | None = None) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops import fp8_gemm

        torch = torch_()
        a8, sa, w8, sw = fp8_inputs(m, a_gran=a_gran, w_gran=w_gran, dtype=dtype)
        args = dict(a8=a8, w8=w8, a_scale=sa, w_scale=sw,
                    bias=randn(48, seed=3).to(getattr(torch, out)) if bias else None)
        if view is not None:
            args = view(args)
        want = naive_fp8_gemm(args["a8"], args["a_scale"], args["w8"], args["w_scale"],
                              args["bias"])
        return expect_close(lambda: fp8_gemm(**args, out_dtype=getattr(torch, out),
                                             backend=backend), want, TOL[out], F8)

    return run


def _transposed_a(args: dict) -> dict:
    """a8 as the .T view of a (K, M) tensor."""
    return {**args, "a8": args["a8"].T.contiguous().T}


def _strided_w(args: dict) -> dict:
    """w8 as every other row of a (2N, K) buffer."""
    torch = torch_()
    w8 = args["w8"]
    big = torch.zeros(2 * w8.shape[0], w8.shape[1], dtype=w8.dtype)
    big[::2] = w8
    return {**args, "w8": big[::2]}


def _expanded_scales(args: dict) -> dict:
    """Row scales as stride-0 views (one value broadcast over every row)."""
    return {**args, "a_scale": args["a_scale"][:1].expand_as(args["a_scale"]),
            "w_scale": args["w_scale"][:1].expand_as(args["w_scale"])}


def _transposed_block_scales(args: dict) -> dict:
    return {**args, "w_scale": args["w_scale"].T.contiguous().T,
            "a_scale": args["a_scale"].T.contiguous().T}


def _expanded_bias(args: dict) -> dict:
    return {**args, "bias": args["bias"][:1].expand_as(args["bias"])}


def _fp8_valid() -> None:
    cases = {
        "per-row scales, bf16 out, reference": fp8_case("reference"),
        "per-row scales, bf16 out, triton": fp8_case("triton"),
        "per-tensor scales, fp32 out, triton": fp8_case("triton", a_gran="tensor",
                                                        w_gran="tensor", out="float32"),
        "blockwise 1x128 / 128x128 scales (K = 160: a partial block), triton":
            fp8_case("triton", a_gran="block", w_gran="block"),
        "blockwise activations, per-tensor weight, fp16 out, triton":
            fp8_case("triton", a_gran="block", w_gran="tensor", out="float16"),
        "bias, per-row, triton": fp8_case("triton", bias=True),
        "e5m2 operands, triton": fp8_case("triton", dtype="float8_e5m2"),
        "one token (M = 1), triton": fp8_case("triton", m=1),
        "no tokens (M = 0), triton": fp8_case("triton", m=0),
        "no tokens (M = 0), reference": fp8_case("reference", m=0),
        "a8 a transposed (K, M) view, triton": fp8_case("triton", view=_transposed_a),
        "w8 every other row of a buffer, triton": fp8_case("triton", view=_strided_w),
        "scales expanded over the rows (stride 0), triton":
            fp8_case("triton", view=_expanded_scales),
        "block scales as transposed views, triton":
            fp8_case("triton", a_gran="block", w_gran="block", view=_transposed_block_scales),
        "bias expanded from one element (stride 0), triton":
            fp8_case("triton", bias=True, view=_expanded_bias),
    }
    for name, run in cases.items():
        add("fp8", name, f"fp8_gemm {name}: against float64 math of the same fp8 operands", run)


_fp8_valid()


def _fp8_nan_scale_row(_tmp: Path) -> Outcome:
    """A NaN per-row scale: documented to reach only the outputs that use it."""
    from kpt.ops import fp8_gemm

    torch = torch_()
    a8, sa, w8, sw = fp8_inputs()
    sa = sa.clone()
    sa[2] = float("nan")

    def check() -> str | None:
        for backend in ("reference", "triton"):
            y = fp8_gemm(a8, w8, sa, sw, backend=backend)
            rows = torch.isnan(y).any(-1)
            if rows.tolist() != [i == 2 for i in range(a8.shape[0])]:
                return f"{backend}: NaN rows {rows.nonzero().flatten().tolist()}, expected [2]"
        return None

    return expect_ok(check, F8)


add("fp8", "a NaN row scale stays in its row", "fp8_gemm with a_scale[2] = NaN (per row): "
    "row 2 of the output NaN, every other row finite (reference and triton)", _fp8_nan_scale_row)


def quantize_case(shape: tuple[int, ...], granularity: str, block: Any = None,
                  dtype: str = "float32", fp8: str = "float8_e4m3fn",
                  view: Callable[[Any], Any] | None = None) -> Callable[[Path], Outcome]:
    """The documented round trip: ``|x - x8 * scale| <= 2^-(m+1) |x| + 2^-(s+1) scale``."""

    def run(_tmp: Path) -> Outcome:
        from kpt.ops import quantize_fp8

        torch = torch_()
        x = randn(*shape, dtype=dtype, seed=4, scale=3.0)
        x = view(x) if view is not None else x
        kind = getattr(torch, fp8)
        m_bits, sub = (3, 9) if fp8 == "float8_e4m3fn" else (2, 16)

        def check() -> str | None:
            kw = {} if block is None else {"block": block}
            x8, scale = quantize_fp8(x, granularity, kind, **kw)
            if x8.shape != x.shape or x8.dtype != kind or scale.dtype != torch.float32:
                return f"x8 {tuple(x8.shape)} {x8.dtype}, scale {scale.dtype}"
            full = scale.double()
            if granularity == "block":
                rows, cols = block or (1, 128)
                r = torch.arange(x.shape[0])[:, None] // rows
                c = torch.arange(x.shape[1])[None, :] // cols
                full = full[r, c]
            back = x8.double() * full
            # the documented bound, plus float32 rounding of the division (2^-24 relative)
            bound = 2.0 ** -(m_bits + 1) * x.double().abs() * (1 + 2**-20) \
                + 2.0 ** -(sub + 1) * full
            worst = ((back - x.double()).abs() - bound).max().item() if x.numel() else 0.0
            return None if worst <= 0 else f"round trip off its bound by {worst:.3g}"

        return expect_ok(check, QF8)

    return run


for _name, _args in {
    "per tensor of a (3, 5, 7) tensor": ((3, 5, 7), "tensor"),
    "per row of a (4, 33) tensor": ((4, 33), "row"),
    "blocks of 1x128 over K = 300": ((3, 300), "block"),
    "blocks of 128x128 over (130, 260)": ((130, 260), "block", (128, 128)),
    "blocks of 3x5 (odd tiles)": ((7, 11), "block", (3, 5)),
    "per row, e5m2": ((4, 33), "row", None, "float32", "float8_e5m2"),
    "per row of bf16": ((4, 33), "row", None, "bfloat16"),
    "per row of a transposed view": ((9, 4), "row", None, "float32", "float8_e4m3fn",
                                     lambda x: x.T),
    "per row of a stride-0 view": ((1, 33), "row", None, "float32", "float8_e4m3fn",
                                   lambda x: x.expand(5, 33)),
    "per row with rows of tiny values (1e-40)": ((3, 8), "row", None, "float32",
                                                 "float8_e4m3fn", lambda x: x * 1e-40),
}.items():
    add("fp8", f"quantize_fp8 {_name}", f"quantize_fp8 {_name}: the documented round-trip "
        "bound", quantize_case(*_args))


def _quantize_inf(_tmp: Path) -> Outcome:
    from kpt.ops import quantize_fp8

    torch = torch_()

    def check() -> str | None:
        x = randn(3, 8)
        x[1, 2] = float("inf")
        x8, scale = quantize_fp8(x, "row")
        nan_rows = torch.isnan(scale.flatten()).tolist()
        if nan_rows != [False, True, False]:
            return f"NaN scales in rows {nan_rows}, documented: row 1 only"
        return None

    return expect_ok(check, QF8)


add("fp8", "quantize_fp8 an inf in one row", "quantize_fp8(x, 'row') with one inf: that row's "
    "scale NaN (documented), the others finite", _quantize_inf)


def f8_bad(**override: Any) -> Callable[[], Any]:
    """fp8_gemm of (5, 160) x (48, 160) e4m3 per-row operands with ``override``."""

    def call() -> Any:
        from kpt.ops import fp8_gemm

        a8, sa, w8, sw = fp8_inputs()
        args = {**dict(a8=a8, w8=w8, a_scale=sa, w_scale=sw), **resolve(override)}
        return fp8_gemm(args.pop("a8"), args.pop("w8"), args.pop("a_scale"),
                        args.pop("w_scale"), **args)

    return call


def _fp8(*shape: int, dtype: str = "float8_e4m3fn") -> Lazy:
    return Lazy(lambda: randn(*shape).to(getattr(torch_(), dtype)))


refuse("fp8", {
    "a8 float32": ("a8 of float32 (not quantised)", dict(a8=T(5, 160))),
    "w8 e5m2 with a8 e4m3": ("w8 float8_e5m2, a8 float8_e4m3fn",
                             dict(w8=_fp8(48, 160, dtype="float8_e5m2"))),
    "a8 1-D": ("a8 of shape (160,)", dict(a8=_fp8(160))),
    "a8 3-D": ("a8 of shape (1, 5, 160)", dict(a8=_fp8(1, 5, 160))),
    "K mismatch": ("a8 K = 160, w8 K = 144", dict(w8=_fp8(48, 144))),
    "N not a multiple of 16": ("w8 of 40 rows", dict(w8=_fp8(40, 160),
                                                    w_scale=T(40, 1))),
    "K = 0": ("a8 (5, 0), w8 (48, 0)", dict(a8=_fp8(5, 0), w8=_fp8(48, 0),
                                            a_scale=T(1), w_scale=T(1))),
    "out_dtype int32": ("out_dtype=torch.int32", dict(out_dtype=Lazy(lambda: torch_().int32))),
    "out_dtype float64": ("out_dtype=torch.float64",
                          dict(out_dtype=Lazy(lambda: torch_().float64))),
    "out_dtype 'bfloat16'": ("out_dtype='bfloat16' (a string)", dict(out_dtype="bfloat16")),
    "bias of 47": ("bias of 47 elements", dict(bias=T(47, dtype="bfloat16"))),
    "bias int": ("int32 bias", dict(bias=Lazy(lambda: randn(48).int()))),
    "bias 2-D": ("bias of shape (1, 48)", dict(bias=T(1, 48, dtype="bfloat16"))),
    "a_scale float16": ("a_scale float16", dict(a_scale=T(5, 1, dtype="float16"))),
    "a_scale (5, 3)": ("a_scale of shape (5, 3) (blocks would be (5, 2))",
                       dict(a_scale=T(5, 3))),
    "w_scale (48,)": ("w_scale of shape (48,) (1-D per channel)", dict(w_scale=T(48))),
    "a_scale a float": ("a_scale=0.5 (a Python float)", dict(a_scale=0.5)),
    "a_scale on meta": ("a_scale on the meta device", dict(a_scale=meta(5, 1))),
    "w8 on meta": ("w8 on the meta device",
                   dict(w8=meta(48, 160, dtype="float8_e4m3fn"))),
    "backend 'cuda' on the CPU": ("backend='cuda'", dict(backend="cuda")),
    "backend 'magic'": ("backend='magic'", dict(backend="magic")),
}, f8_bad, "fp8_gemm", F8)


def qf8_bad(x: Any = None, *args: Any, **kwargs: Any) -> Callable[[], Any]:
    def call() -> Any:
        from kpt.ops import quantize_fp8

        value = randn(4, 32) if x is None else resolve({"x": x})["x"]
        return quantize_fp8(value, *args, **resolve(kwargs))

    return call


for _name, _call in {
    "x int32": qf8_bad(Lazy(lambda: randn(4, 32).int())),
    "x float64": qf8_bad(T(4, 32, dtype="float64")),
    "x a list": qf8_bad([[1.0, 2.0]]),
    "dtype float16": qf8_bad(None, "row", Lazy(lambda: torch_().float16)),
    "granularity 'channel'": qf8_bad(None, "channel"),
    "granularity None": qf8_bad(None, None),
    "block (0, 128)": qf8_bad(None, "block", block=(0, 128)),
    "block (True, 1)": qf8_bad(None, "block", block=(True, 1)),
    "block 128 (an int)": qf8_bad(None, "block", block=128),
    "block with granularity 'row'": qf8_bad(None, "row", block=(1, 128)),
    "empty x per tensor": qf8_bad(T(0, 4), "tensor"),
    "x (4, 0) per row": qf8_bad(T(4, 0), "row"),
    "x 1-D in blocks": qf8_bad(T(32), "block"),
    "x 0-d per row": qf8_bad(Lazy(lambda: randn(1)[0]), "row"),
}.items():
    add("fp8", f"refuse quantize_fp8 {_name}", f"quantize_fp8 with {_name}: must be refused",
        lambda _tmp, call=_call: expect_error(call, QF8))


# =============================================================================================
# int4_gemm / pack_int4 / dequantize_int4
# =============================================================================================

I4 = ("int4_gemm",)


def naive_unpack(packed: Any) -> Any:
    """(K // 8, N) int32 words -> (N, K) int64 codes, nibble j of word i = code of k = 8i + j."""
    torch = torch_()
    words = packed.long() & 0xFFFFFFFF
    codes = torch.stack([(words >> (4 * j)) & 0xF for j in range(8)], 1)  # (K // 8, 8, N)
    return codes.reshape(-1, packed.shape[1]).T


def naive_dequant(packed: Any, scales: Any, zeros: Any, group_size: int, g_idx: Any = None,
                  dtype: Any = None) -> Any:
    """(N, K) float32 ``(q - z) * s`` of each channel's group, rounded to ``dtype``."""
    torch = torch_()
    q = naive_unpack(packed)
    n, k = q.shape
    if g_idx is not None:
        g = g_idx.long()
    elif group_size < 0:
        g = torch.zeros(k, dtype=torch.long)
    else:
        g = torch.arange(k) // group_size
    z = 8.0 if zeros is None else zeros.float().T[:, g]
    w = (q.float() - z) * scales.float().T[:, g]
    return w if dtype is None else w.to(dtype)


def int4_weight(n: int = 24, k: int = 128, group: int = 32, symmetric: bool = False,
                act_order: bool = False) -> tuple[Any, ...]:
    from kpt.ops import pack_int4

    torch = torch_()
    w = randn(n, k, seed=5, scale=0.1)
    g_idx = None
    if act_order:
        groups = 1 if group < 0 else k // group
        g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(6)) % groups
        g_idx = g_idx.int()
    packed, scales, zeros = pack_int4(w, group, symmetric, g_idx=g_idx)
    return packed, scales, zeros, g_idx


def int4_case(backend: str, dtype: str = "bfloat16", group: int = 32, symmetric: bool = False,
              act_order: bool = False, bias: bool = False, lead: tuple[int, ...] = (5,),
              view: Callable[[dict], dict] | None = None) -> Callable[[Path], Outcome]:
    def run(_tmp: Path) -> Outcome:
        from kpt.ops import int4_gemm

        packed, scales, zeros, g_idx = int4_weight(group=group, symmetric=symmetric,
                                                   act_order=act_order)
        args = dict(x=randn(*lead, 128, dtype=dtype, seed=7), packed=packed, scales=scales,
                    zeros=zeros, g_idx=g_idx,
                    bias=randn(24, seed=8, dtype=dtype) if bias else None)
        if view is not None:
            args = view(args)
        x = args["x"]
        w = naive_dequant(args["packed"], args["scales"], args["zeros"], group, args["g_idx"],
                          x.dtype).double()
        want = x.double() @ w.T
        if args["bias"] is not None:
            want = want + args["bias"].double()
        return expect_close(lambda: int4_gemm(args["x"], args["packed"], args["scales"],
                                              args["zeros"], group_size=group,
                                              g_idx=args["g_idx"], bias=args["bias"],
                                              backend=backend), want, TOL[dtype], I4)

    return run


def _x_transposed(args: dict) -> dict:
    return {**args, "x": args["x"].T.contiguous().T}


def _x_expanded(args: dict) -> dict:
    return {**args, "x": args["x"][:1].expand_as(args["x"])}


def _packed_column_slice(args: dict) -> dict:
    """packed, scales and zeros as the first N columns of wider tensors."""
    torch = torch_()

    def wide(t: Any) -> Any:
        if t is None:
            return None
        big = torch.zeros(t.shape[0], t.shape[1] + 5, dtype=t.dtype)
        big[:, : t.shape[1]] = t
        return big[:, : t.shape[1]]

    return {**args, "packed": wide(args["packed"]), "scales": wide(args["scales"]),
            "zeros": wide(args["zeros"])}


def _scales_expanded(args: dict) -> dict:
    return {**args, "scales": args["scales"][:1].expand_as(args["scales"]),
            "zeros": args["zeros"][:1].expand_as(args["zeros"])}


def _scales_fp16(args: dict) -> dict:
    return {**args, "scales": args["scales"].half()}


def _int4_valid() -> None:
    cases = {
        "zero-point g32, bf16, reference": int4_case("reference"),
        "zero-point g32, bf16, triton": int4_case("triton"),
        "symmetric g64, fp16, triton": int4_case("triton", "float16", 64, True),
        "per channel (group_size -1), triton": int4_case("triton", group=-1),
        "act-order g_idx, triton": int4_case("triton", act_order=True),
        "act-order g_idx, reference": int4_case("reference", act_order=True),
        "bias, triton": int4_case("triton", bias=True),
        "fp32 x, reference": int4_case("reference", "float32"),
        "3-D x (2, 3, K), triton": int4_case("triton", lead=(2, 3)),
        "no tokens (M = 0), triton": int4_case("triton", lead=(0,)),
        "one token, triton": int4_case("triton", lead=(1,)),
        "x a transposed view, triton": int4_case("triton", view=_x_transposed),
        "x rows expanded (stride 0), triton": int4_case("triton", view=_x_expanded),
        "packed/scales/zeros column slices of wider tensors, triton":
            int4_case("triton", view=_packed_column_slice),
        "scales and zeros expanded over the groups (stride 0), triton":
            int4_case("triton", view=_scales_expanded),
        "fp16 scales, triton": int4_case("triton", view=_scales_fp16),
    }
    for name, run in cases.items():
        add("int4", name, f"int4_gemm {name}: against float64 math of the dequantised weight",
            run)


_int4_valid()


def _pack_round_trip(group: int, symmetric: bool, act_order: bool = False,
                     view: Callable[[Any], Any] | None = None) -> Callable[[Path], Outcome]:
    """pack_int4's promise: every element dequantises to within scale / 2."""

    def run(_tmp: Path) -> Outcome:
        from kpt.ops import dequantize_int4, pack_int4

        torch = torch_()
        w = randn(16, 64, seed=9)
        w = view(w) if view is not None else w
        g_idx = None
        if act_order:
            g_idx = (torch.arange(64) * 7 % 64 // group).int()

        def check() -> str | None:
            packed, scales, zeros = pack_int4(w, group, symmetric, g_idx=g_idx)
            back = dequantize_int4(packed, scales, zeros, group_size=group, g_idx=g_idx)
            mine = naive_dequant(packed, scales, zeros, group, g_idx)
            if (reason := mismatch(back, mine, 0.0, "dequantize_int4")) is not None:
                return reason
            g = g_idx.long() if g_idx is not None else (
                torch.zeros(64, dtype=torch.long) if group < 0 else torch.arange(64) // group)
            half = scales.T[:, g] / 2 * (1 + 1e-6)  # float32 rounding of the product
            worst = ((back - w.float()).abs() - half).max().item()
            return None if worst <= 0 else f"an element {worst:.3g} beyond scale / 2"

        return expect_ok(check, ("pack_int4", "dequantize_int4"))

    return run


for _name, _args in {
    "g32 zero-point": (32, False),
    "g64 symmetric": (64, True),
    "per channel": (-1, False),
    "act-order g_idx": (32, False, True),
    "of a transposed weight view": (32, False, False, lambda w: w.T.contiguous().T),
    "of a weight with constant rows (scale of 0)": (32, False, False, lambda w: w * 0 + 1.5),
    "of an all-zero weight": (32, True, False, lambda w: w * 0),
}.items():
    add("int4", f"pack_int4 round trip, {_name}", f"pack_int4 {_name}: dequantize_int4 equals "
        "the documented unpacking and every element is within scale / 2", _pack_round_trip(*_args))


def i4_bad(**override: Any) -> Callable[[], Any]:
    """int4_gemm of x (5, 128) bf16 on a (24, 128) g32 zero-point weight, with ``override``."""

    def call() -> Any:
        from kpt.ops import int4_gemm

        packed, scales, zeros, _ = int4_weight()
        args = {**dict(x=randn(5, 128, dtype="bfloat16"), packed=packed, scales=scales,
                       zeros=zeros, group_size=32), **resolve(override)}
        return int4_gemm(args.pop("x"), args.pop("packed"), args.pop("scales"),
                         args.pop("zeros"), **args)

    return call


def ints(*values: int, dtype: str = "int32", shape: tuple[int, ...] | None = None) -> Lazy:
    """An integer tensor of ``values`` (reshaped to ``shape``), made when the call runs."""
    return Lazy(lambda: cu(*values, dtype=dtype) if shape is None
                else cu(*values, dtype=dtype).reshape(shape))


def g_idx_with(value: int, at: int = 5, k: int = 128, dtype: str = "int32") -> Lazy:
    def make() -> Any:
        torch = torch_()
        g = (torch.arange(k) // 32).to(getattr(torch, dtype))
        g[at] = value
        return g

    return Lazy(make)


def _zeros_with(value: int) -> Lazy:
    def make() -> Any:
        z = int4_weight()[2].clone()
        z[0, 3] = value
        return z

    return Lazy(make)


refuse("int4", {
    "group_size 16": ("group_size=16", dict(group_size=16)),
    "group_size 0": ("group_size=0", dict(group_size=0)),
    "group_size True": ("group_size=True", dict(group_size=True)),
    "group_size 32.0": ("group_size=32.0", dict(group_size=32.0)),
    "group_size None": ("group_size=None", dict(group_size=None)),
    "group_size 64 (the weight was packed with 32)": ("scales of 4 groups, group_size=64",
                                                      dict(group_size=64)),
    "K not a multiple of 8": ("x of K = 124", dict(x=T(5, 124, dtype="bfloat16"))),
    "packed int64": ("packed int64", dict(packed=Lazy(lambda: int4_weight()[0].long()))),
    "packed uint8": ("packed uint8", dict(packed=Lazy(lambda: int4_weight()[0].to(
        torch_().uint8)))),
    "packed 17 rows": ("packed (17, 24) for K = 128", dict(packed=ints(*[0] * 17 * 24,
                                                                    shape=(17, 24)))),
    "scales (4, 23)": ("scales of shape (4, 23)", dict(scales=T(4, 23))),
    "scales int": ("int32 scales", dict(scales=ints(*[1] * 96, shape=(4, 24)))),
    "zeros int32": ("int32 zeros", dict(zeros=ints(*[8] * 96, shape=(4, 24)))),
    "zeros (3, 24)": ("zeros of 3 groups", dict(zeros=Lazy(lambda: int4_weight()[2][:3]))),
    "zeros 16 (not 4 bits)": ("a zero point of 16", dict(zeros=_zeros_with(16))),
    "g_idx 128 (a group past G)": ("g_idx with an entry 4 (G = 4)", dict(g_idx=g_idx_with(4))),
    "g_idx negative": ("g_idx with an entry -1", dict(g_idx=g_idx_with(-1))),
    "g_idx int64": ("int64 g_idx", dict(g_idx=g_idx_with(0, dtype="int64"))),
    "g_idx of 127": ("g_idx of 127 entries", dict(g_idx=Lazy(lambda: g_idx_with(0).make()[:127]))),
    "bias of 23": ("bias of 23 elements", dict(bias=T(23, dtype="bfloat16"))),
    "bias fp16 for bf16 x": ("fp16 bias, bf16 x", dict(bias=T(24, dtype="float16"))),
    "x int32": ("integer x", dict(x=Lazy(lambda: randn(5, 128).int()))),
    "x float64": ("float64 x", dict(x=T(5, 128, dtype="float64"))),
    "x 0-d": ("a 0-d x", dict(x=Lazy(lambda: randn(1, dtype="bfloat16")[0]))),
    "packed on meta": ("packed on the meta device", dict(packed=meta(16, 24, dtype="int32"))),
    "packed of N = 0": ("packed (16, 0)", dict(packed=ints(shape=(16, 0)), scales=T(4, 0),
                                               zeros=Lazy(lambda: int4_weight()[2][:, :0]))),
    "triton on float32 x": ("backend='triton' with float32 x", dict(x=T(5, 128),
                                                                    backend="triton")),
    "backend 'cuda' on the CPU": ("backend='cuda'", dict(backend="cuda")),
}, i4_bad, "int4_gemm", I4)


def pack_bad(w: Any = None, *args: Any, **kwargs: Any) -> Callable[[], Any]:
    def call() -> Any:
        from kpt.ops import pack_int4

        value = randn(16, 64) if w is None else resolve({"w": w})["w"]
        return pack_int4(value, *args, **resolve(kwargs))

    return call


def _nan_weight() -> Any:
    w = randn(16, 64)
    w[3, 4] = float("nan")
    return w


for _name, _call in {
    "w with a NaN": pack_bad(Lazy(_nan_weight), 32),
    "w 3-D": pack_bad(T(2, 16, 64), 32),
    "w int": pack_bad(Lazy(lambda: randn(16, 64).int()), 32),
    "w with N = 0": pack_bad(T(0, 64), 32),
    "K = 60 (not a multiple of 8)": pack_bad(T(16, 60), -1),
    "symmetric 'yes'": pack_bad(None, 32, "yes"),
    "group_size 48": pack_bad(None, 48),
    "g_idx out of range": pack_bad(None, 32, g_idx=Lazy(lambda: g_idx_with(2, k=64).make() * 2)),
}.items():
    add("int4", f"refuse pack_int4 {_name}", f"pack_int4 with {_name}: must be refused",
        lambda _tmp, call=_call: expect_error(call, ("pack_int4",)))


def deq_bad(**override: Any) -> Callable[[], Any]:
    def call() -> Any:
        from kpt.ops import dequantize_int4

        packed, scales, zeros, _ = int4_weight()
        args = {**dict(packed=packed, scales=scales, zeros=zeros, group_size=32),
                **resolve(override)}
        return dequantize_int4(args.pop("packed"), args.pop("scales"), args.pop("zeros"),
                               **args)

    return call


refuse("int4", {
    "dequantize dtype int32": ("dtype=torch.int32", dict(dtype=Lazy(lambda: torch_().int32))),
    "dequantize dtype 'float32'": ("dtype='float32' (a string)", dict(dtype="float32")),
    "dequantize g_idx past G": ("g_idx with an entry 9", dict(g_idx=g_idx_with(9))),
    "dequantize scales on meta": ("scales on the meta device", dict(scales=meta(4, 24))),
}, deq_bad, "dequantize_int4", ("dequantize_int4",))
