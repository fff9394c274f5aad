"""Traced mods -> the parameters of the hand-written flash-attention kernels (cuda/hip).

The kernels of ``kpt.ops.flash_attention._cuda`` know a fixed menu: a soft-cap, an ALiBi bias,
a diagonal band (bottom-right aligned windows), a key prefix every query sees, document ids,
and a per-query-block key range. :func:`lower` recognises that menu in the *traced IR* of the
mods (``_codegen``), not in the Python objects, so a named mod from :mod:`.mods` and a
hand-written lambda with the same meaning (``lambda b, h, q, kv: q >= kv``) lower alike, and
anything else gets a reason instead of an approximation.

Recognised shapes (``d = q_idx - kv_idx``; ``P(b)``, ``S(h)``, ``X(b, q_idx)``, ``Y(b, kv_idx)``
any traced integer/float expressions of only those variables, materialised with torch):

* mask = AND of: comparisons linear in ``d`` with integer constants (``q >= kv``,
  ``q - kv <= 7``...) -> a band ``dmin <= d <= dmax``; one ``X(b, q) == Y(b, kv)`` -> doc ids;
  or instead of bare comparisons one ``(kv < P(b)) | band`` -> prefix-LM.
* score = ``base`` or ``base + S(h) * (kv - q)`` (also ``- S(h) * (q - kv)``), with base
  ``score`` or ``c * tanh(score / c)``, ``c`` a positive constant: soft-cap, then ALiBi, the
  kernel's order.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _codegen
from .block_mask import Tables, mask_grid

NOT_NAMED = "score_mod/mask_mod is not a kpt named mod (kpt.ops.flex_attention.mods)"
_INF = math.inf


@dataclass(frozen=True)
class Lowered:
    """What the mods mean to the kernel; IR sub-expressions are evaluated per call."""

    dmin: float = -_INF  # band on d = q_idx - kv_idx (top-left indices, as torch's flex)
    dmax: float = _INF
    prefix: tuple | None = None  # IR of P(b): keys kv < P(b) are visible to every query
    doc: tuple[tuple, tuple] | None = None  # IRs of X(b, q_idx), Y(b, kv_idx)
    softcap: float = 0.0
    slopes: tuple | None = None  # IR of S(h), the ALiBi slope (sign folded in)
    has_mask: bool = False


# ---- IR helpers -----------------------------------------------------------------------------


def _vars(n: tuple) -> frozenset[str]:
    op, _, *a = n
    if op == "var":
        return frozenset({a[0]})
    if op == "const":
        return frozenset()
    out: frozenset[str] = frozenset()
    for x in a[1:] if op == "load" else a:
        out |= _vars(x)
    return out


def _linear(n: tuple) -> dict[str, int] | None:
    """``n`` as integer coefficients of q_idx, kv_idx and 1, or None if it is not linear."""
    op, kind, *a = n
    if kind == "f":
        return None
    if op == "var":
        return {a[0]: 1} if a[0] in ("q_idx", "kv_idx") else None
    if op == "const":
        return {"1": int(a[0])} if kind == "i" else None
    if op in ("add", "sub"):
        x, y = _linear(a[0]), _linear(a[1])
        if x is None or y is None:
            return None
        sign = 1 if op == "add" else -1
        return {k: x.get(k, 0) + sign * y.get(k, 0) for k in {*x, *y}}
    if op == "neg":
        x = _linear(a[0])
        return None if x is None else {k: -c for k, c in x.items()}
    if op == "mul":
        for c, e in ((a[0], a[1]), (a[1], a[0])):
            if c[0] == "const" and c[1] == "i":
                x = _linear(e)
                return None if x is None else {k: int(c[2]) * v for k, v in x.items()}
    return None


_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq"}


def _band(n: tuple) -> tuple[float, float] | None:
    """A comparison ``q - kv + c OP 0`` as the interval of d it allows, else None."""
    op, _, *a = n
    if op not in _FLIP:
        return None
    x, y = _linear(a[0]), _linear(a[1])
    if x is None or y is None:
        return None
    lin = {k: x.get(k, 0) - y.get(k, 0) for k in ("q_idx", "kv_idx", "1")}
    if abs(lin["q_idx"]) != 1 or lin["kv_idx"] != -lin["q_idx"]:
        return None
    c = lin["1"]
    if lin["q_idx"] < 0:  # -(d) - c' OP 0  <=>  d + c' FLIP(OP) 0
        op, c = _FLIP[op], -c
    bound = -c  # d OP bound
    return {"lt": (-_INF, bound - 1), "le": (-_INF, bound), "gt": (bound + 1, _INF),
            "ge": (bound, _INF), "eq": (bound, bound)}[op]


def _prefix(n: tuple) -> tuple | None:
    """``kv_idx < P(b)`` (or ``<=``, either side) as the IR of the prefix length, else None."""
    op, _, *a = n
    if op not in ("lt", "le", "gt", "ge"):
        return None
    lhs, rhs = a
    if op in ("gt", "ge"):
        op, lhs, rhs = ("lt" if op == "gt" else "le"), rhs, lhs
    if lhs != ("var", "i", "kv_idx") or rhs[1] != "i" or not _vars(rhs) <= {"b"}:
        return None
    return rhs if op == "lt" else _codegen.node("add", rhs, ("const", "i", 1))


def _doc(n: tuple) -> tuple[tuple, tuple] | None:
    op, _, *a = n
    if op != "eq":
        return None
    for x, y in ((a[0], a[1]), (a[1], a[0])):
        if x[1] != "f" and y[1] != "f" and "q_idx" in _vars(x) <= {"b", "q_idx"} \
                and "kv_idx" in _vars(y) <= {"b", "kv_idx"}:
            return x, y
    return None


def _flatten(n: tuple, op: str) -> list[tuple]:
    return [x for arg in n[2:] for x in _flatten(arg, op)] if n[0] == op and n[1] == "b" \
        else [n]


def _intersect(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return max(a[0], b[0]), min(a[1], b[1])


def _lower_mask(ir: tuple) -> dict | str:
    band, doc, prefix = (-_INF, _INF), None, None
    bare_band = False
    for item in _flatten(ir, "and"):
        if item == ("const", "b", True):
            continue
        if (got := _band(item)) is not None:
            band, bare_band = _intersect(band, got), True
        elif (got := _doc(item)) is not None:
            if doc is not None:
                return "two document-id equalities (the kernel takes one pair of id tensors)"
            doc = got
        elif item[0] == "or" and prefix is None:
            alts = _flatten(item, "or")
            found = [p for p in map(_prefix, alts) if p is not None]
            rest = [a for a in alts if _prefix(a) is None]
            bands = [_band(part) for a in rest for part in _flatten(a, "and")]
            if len(alts) != 2 or len(found) != 1 or None in bands:
                return f"{NOT_NAMED}: an `|` other than prefix-LM `(kv < P[b]) | band`"
            prefix = found[0]
            for got in bands:
                band = _intersect(band, got)
        else:
            return f"{NOT_NAMED}: mask term {_show(item)} is not a band, prefix or document test"
    if prefix is not None and bare_band:
        return ("prefix-LM combined with a band outside the `|` (the kernel's band is OR-ed "
                "with the prefix, not AND-ed)")
    if band[0] > band[1]:
        return "the mask's band is empty"
    return dict(dmin=band[0], dmax=band[1], prefix=prefix, doc=doc, has_mask=True)


def _alibi(term: tuple, sign: int) -> tuple | None:
    if term[0] != "mul":
        return None
    for s, x in ((term[2], term[3]), (term[3], term[2])):
        lin = _linear(x) if x[1] != "f" else None
        if lin is None or not _vars(s) <= {"h"} or s[1] == "b":
            continue
        lin = {k: v for k, v in lin.items() if v}
        if lin == {"kv_idx": 1, "q_idx": -1}:
            return s if sign > 0 else _codegen.node("neg", s)
        if lin == {"kv_idx": -1, "q_idx": 1}:
            return _codegen.node("neg", s) if sign > 0 else s
    return None


def _softcap(base: tuple) -> float | None:
    score = ("var", "f", "score")
    if base == score:
        return 0.0
    if base[0] != "mul":
        return None
    for c, t in ((base[2], base[3]), (base[3], base[2])):
        if c[0] != "const" or c[1] == "b" or t[0] != "tanh" or c[2] <= 0:
            continue
        inner = t[2]
        if inner[0] == "truediv" and inner[2] == score and inner[3][0] == "const" \
                and inner[3][2] == c[2]:
            return float(c[2])
        if inner[0] == "mul" and score in inner[2:]:
            k = inner[3] if inner[2] == score else inner[2]
            if k[0] == "const" and abs(k[2] * c[2] - 1) < 1e-7:
                return float(c[2])
    return None


def _lower_score(ir: tuple) -> dict | str:
    candidates = [(ir, None)]
    if ir[0] in ("add", "sub"):
        a, b = ir[2], ir[3]
        sign = 1 if ir[0] == "add" else -1
        candidates += [(a, _alibi(b, sign))]
        if ir[0] == "add":
            candidates += [(b, _alibi(a, 1))]
    for base, slopes in candidates:
        if slopes is None and base is not ir:
            continue
        cap = _softcap(base)
        if cap is not None:
            return dict(softcap=cap, slopes=slopes)
    return f"{NOT_NAMED}: score_mod {_show(ir)} is not soft-cap and/or ALiBi"


def _show(n: tuple, depth: int = 3) -> str:
    op, _, *a = n
    if op in ("var", "const"):
        return str(a[0])
    if depth == 0:
        return "..."
    if op == "load":
        return f"buf{a[0]}[{', '.join(_show(x, depth - 1) for x in a[1:])}]"
    return f"{op}({', '.join(_show(x, depth - 1) for x in a)})"


_LOWERED: dict[str, Lowered | str] = {}


def lower(t: _codegen.Translation) -> Lowered | str:
    """The kernel parameters of a translated mod pair (cached by its key), or a reason."""
    if t.reason is not None:
        return f"{NOT_NAMED}: {t.reason}"
    hit = _LOWERED.get(t.key)
    if hit is None:
        parts: dict = {}
        for ir, fn in ((t.mask_ir, _lower_mask), (t.score_ir, _lower_score)):
            if ir is None:
                continue
            got = fn(ir)
            if isinstance(got, str):
                parts = got
                break
            parts.update(got)
        hit = parts if isinstance(parts, str) else Lowered(**parts)
        _LOWERED[t.key] = hit
    return hit


# ---- sizes: bottom-right windows from a top-left band ----------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The kernel's view of a call: queries [0, sq) and keys [0, sk) of the caller's
    (sq <= Sq, sk <= Sk: trailing rows / keys no visible pair can reach are cut off, so the
    band can be written with non-negative windows), and those windows (-1: unbounded)."""

    sq: int
    sk: int
    window_left: int
    window_right: int


def geometry(low: Lowered, sq: int, sk: int) -> Geometry | str:
    """Windows for the kernel's bottom-right alignment (diag = sk - sq):
    it keeps ``diag - left <= kv - q <= diag + right``; torch's band is ``dmin <= q - kv <=
    dmax``, so ``right = -dmin - diag`` and ``left = dmax + diag``. Negative finite windows
    cannot be written (-1 means unbounded), so without a prefix the keys past ``sq - dmin``
    and the queries past ``sk + dmax`` (never visible) are cut off first, which makes
    ``right >= 0`` always and ``left >= 0`` unless the band lies strictly above the diagonal."""
    if low.prefix is None:
        if low.dmin > -_INF:
            sk = min(sk, sq - int(low.dmin))
        if low.dmax < _INF:
            sq = min(sq, sk + int(low.dmax))
    if sq <= 0 or sk <= 0:
        return Geometry(max(sq, 0), max(sk, 0), -1, -1)
    diag = sk - sq
    right = -1 if low.dmin == -_INF else -int(low.dmin) - diag
    left = -1 if low.dmax == _INF else int(low.dmax) + diag
    for name, w in (("left", left), ("right", right)):
        inf = low.dmax == _INF if name == "left" else low.dmin == -_INF
        if not inf and w < 0:
            return (f"band {low.dmin} <= q_idx - kv_idx <= {low.dmax} with Sq={sq}, Sk={sk} "
                    f"needs window_{name}={w} < 0, which the kernel reads as unbounded")
    return Geometry(sq, sk, left, right)


# ---- per-call tensors -------------------------------------------------------------------------


def _eval(ir: tuple, buffers: list[Tensor], **env: Tensor) -> Tensor:
    return _codegen.evaluate(ir, env, buffers)


def params(low: Lowered, buffers: list[Tensor], B: int, H: int, geo: Geometry,
           device: torch.device) -> dict:
    """Launcher keywords of the mods for this call (sizes already cut by :func:`geometry`)."""
    ar = dict(device=device)
    out: dict = dict(window_left=geo.window_left, window_right=geo.window_right,
                     softcap=low.softcap, alibi_slopes=None, prefix_len=None, doc_q=None,
                     doc_k=None)
    if low.slopes is not None:
        h = torch.arange(H, **ar)
        out["alibi_slopes"] = _eval(low.slopes, buffers, h=h).float().expand(H).contiguous()
    b = torch.arange(B, **ar)
    if low.prefix is not None:
        out["prefix_len"] = _eval(low.prefix, buffers, b=b).to(torch.int32).expand(B) \
            .contiguous()
    if low.doc is not None:
        bb = b.view(B, 1)
        x = _eval(low.doc[0], buffers, b=bb, q_idx=torch.arange(geo.sq, **ar).view(1, -1))
        y = _eval(low.doc[1], buffers, b=bb, kv_idx=torch.arange(geo.sk, **ar).view(1, -1))
        # Equality is all the kernel needs: ids in int32 (doc ids are token counts or less).
        out["doc_q"] = x.to(torch.int32).expand(B, geo.sq).contiguous()
        out["doc_k"] = y.to(torch.int32).expand(B, geo.sk).contiguous()
    return out


def mask_fn(low: Lowered, buffers: list[Tensor]):
    """The lowered mask as a broadcasting ``(b, h, q_idx, kv_idx) -> bool`` (top-left)."""
    def fn(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        keep = (d >= low.dmin) & (d <= low.dmax)
        if low.prefix is not None:
            keep = keep | (kv_idx < _eval(low.prefix, buffers, b=b))
        if low.doc is not None:
            keep = keep & (_eval(low.doc[0], buffers, b=b, q_idx=q_idx)
                           == _eval(low.doc[1], buffers, b=b, kv_idx=kv_idx))
        return keep
    return fn


# ---- block masks -------------------------------------------------------------------------------

_CHECKED: dict[tuple, str] = {}


def check_tables(low: Lowered, buffers: list[Tensor], tables: Tables, B: int, sq: int,
                 sk: int) -> str:
    """"" when skipping the blocks ``tables`` leave out changes nothing the lowered mask does
    not already do, else a reason. The kernel walks a contiguous key range per query block
    and applies only the lowered mask; torch's flex also masks every unlisted block and
    applies *no* mask in full blocks. So every block with a visible element must be listed,
    and every full block must be entirely visible. True for masks built by
    ``create_block_mask`` from the same mod; not for ``BlockMask.from_kv_blocks`` sparsity.

    Exact (the mask is evaluated on the whole grid, chunked), so cached per table tensor,
    mods and captured-tensor versions; the result is read on the host once per entry."""
    key = (id(tables.kv_num), low, tuple((id(b), b._version) for b in buffers), B, sq, sk)
    hit = _CHECKED.get(key)
    if hit is not None:
        return hit
    bq, bkv = tables.block_q, tables.block_kv
    nq, nkv = -(-sq // bq), -(-sk // bkv)
    dev = tables.kv_num.device
    fn = mask_fn(low, buffers)
    listed = tables.dense()  # (Bm, Hm, NQ, NKV): 0 skipped, 1 partial, 2 full
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    rows = max(1, (1 << 24) // max(1, B * sk * bq))
    kv = torch.arange(sk, device=dev)
    for start in range(0, nq, rows):
        stop = min(nq, start + rows)
        q = torch.arange(start * bq, min(sq, stop * bq), device=dev)
        pad = torch.zeros(B, 1, (stop - start) * bq, nkv * bkv, dtype=torch.bool, device=dev)
        pad[:, :, : q.numel(), :sk] = mask_grid(fn, B, 1, q, kv)
        blocks = pad.view(B, 1, stop - start, bq, nkv, bkv)
        any_ = blocks.any(dim=5).any(dim=3)
        # Padding past the ends counts as visible for "full": torch's full blocks at the edge.
        inside = torch.zeros_like(pad)
        inside[:, :, : q.numel(), :sk] = True
        all_ = (pad | ~inside).view_as(blocks).all(dim=5).all(dim=3)
        mine = listed[:, :, start:stop]
        bad = bad | (any_ & (mine == 0)).any() | (~all_ & (mine == 2)).any()
    reason = ("the BlockMask skips blocks its mask_mod leaves visible, or lists as full blocks "
              "it masks (block sparsity beyond the named mask)") if bool(bad) else ""
    _CHECKED[key] = reason
    weakref.finalize(tables.kv_num, _CHECKED.pop, key, None)
    return reason


def kv_block_range(tables: Tables, q_block: int, sq: int, sk: int) -> Tensor:
    """int32 (Bm, Hm, ceil(sq / q_block), 2): per kernel query block, the key range [lo, hi)
    covering every block the tables list for the rows it holds (0, 0 when none). Where
    ``q_block`` and the table's block sizes do not align, a kernel block takes the union of
    the table rows it overlaps: a superset, so only skipping is lost, never a visible key."""
    listed = tables.dense() != 0  # (Bm, Hm, NQ, NKV)
    bq, bkv = tables.block_q, tables.block_kv
    nkv = listed.shape[-1]
    cols = torch.arange(nkv, device=listed.device)
    lo_t = torch.where(listed, cols, nkv).amin(-1) * bkv  # per table row
    hi_t = (torch.where(listed, cols, -1).amax(-1) + 1) * bkv
    nrow = -(-sq // q_block)
    first = torch.arange(nrow, device=listed.device) * q_block // bq
    last = (torch.clamp(torch.arange(1, nrow + 1, device=listed.device) * q_block, max=sq)
            - 1) // bq
    span = torch.arange(listed.shape[2], device=listed.device)
    inside = (span[None, :] >= first[:, None]) & (span[None, :] <= last[:, None])  # (nrow, NQ)
    big = torch.iinfo(torch.int64).max
    lo = torch.where(inside, lo_t[..., None, :], big).amin(-1)
    hi = torch.where(inside, hi_t[..., None, :], 0).amax(-1)
    lo = torch.clamp(lo, max=sk)
    hi = torch.clamp(hi, max=sk)
    empty = hi <= lo
    lo = torch.where(empty, 0, lo)
    hi = torch.where(empty, 0, hi)
    return torch.stack((lo, hi), -1).to(torch.int32).contiguous()
