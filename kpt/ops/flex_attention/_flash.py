"""``flash`` backend of flex_attention: mods that lower to a band and a soft-cap, run through
``kpt.ops.flash_attention``'s own dispatch.

``_lower.py`` recognises the named mods (causal, sliding window, soft-cap, or an equivalent
lambda); when they lower to a band (bottom-right windows) and a soft-cap only, without the
hooks the cuda/hip kernels add for flex (ALiBi slopes, prefix lengths, document ids), the call
is exactly a ``flash_attention`` call. This backend builds that call (``flash.Call`` /
``flash.BackwardCall`` over (B, S, H, D) ``transpose(1, 2)`` views, no copies) and launches
``flash.SPEC`` / ``flash.SPEC_BACKWARD``, which choose backend and config per direction for
the device (autotune database, else flash's priority): on an H200 the TMA Triton or wgmma
forward and the Triton backward, several times faster than flex's own kernels. On cpu flash's
dispatch runs its reference (or its Triton kernels when ``KPT_BACKEND`` asks for them under
``TRITON_INTERPRET=1``).

Geometry (trailing queries that see no key, trailing keys no query sees) is handled by the
helpers shared with the cuda/hip backend (``_cuda.forward_views`` / ``backward_views``).

**Document masks become varlen calls.** When the mods also lower to document ids (``X(b, q) ==
Y(b, kv)``, e.g. ``and_masks(causal(), document(ids))``, packed sequences) and every document's
tokens are one contiguous run, the call is a ``flash_attention`` *varlen* call with one
sequence per document: no mask is evaluated and no masked block is visited. The runs are read
from the ids on the host once per ids tensor (and version): ``doc_reason`` is decided with the
Problem, like the BlockMask check. The sequences index flex's tensors in place where their
strides allow: (B, H, S, D) storage as ``(B*H*S, 1, D)`` tokens, one sequence per (batch,
head, document), when q and k have the same heads; (B, S, H, D) storage (``transpose(1, 2)``
of a projection's output) as ``(B*S, H, D)`` tokens, one sequence per (batch, document), GQA
included. Other layouts are copied to the second.
"""

from __future__ import annotations

import functools
import importlib
import weakref

import torch
from torch import Tensor

from kpt.ops._common import MAX_GRID_YZ, module
from kpt.ops._registry import Config, Problem

from . import _codegen, _cuda, _lower

_FLASH = "kpt.ops.flash_attention"


@functools.cache
def unavailable() -> str | None:
    """Why the backend cannot run here, or None: it needs only flash_attention to import."""
    try:
        importlib.import_module(_FLASH)
    except ImportError as err:
        return f"{_FLASH} does not import ({err})"
    return None


def supports(p: Problem) -> list[str]:
    """The reasons of the cuda/hip backend (block mask, mods, geometry, head dims, k/v batch),
    plus: no flex hooks but document ids, since flash_attention takes a band and a soft-cap,
    and document ids only as contiguous runs (``doc_varlen``, decided with the Problem). Any
    head dim up to 256 qualifies (flash's dispatch falls back from kernels that need
    multiples of 8)."""
    low, reasons = _cuda.lowered_reasons(p)
    if low is not None:
        hooks = [name for name, ir in (("ALiBi slopes", low.slopes), ("a prefix", low.prefix))
                 if ir is not None]
        if hooks:
            reasons.append(f"the mods lower to {', '.join(hooks)}, which flash_attention "
                           "cannot take (only a band, a soft-cap and document runs)")
        elif low.doc is not None and p.get("doc_varlen"):
            reasons.append(p["doc_varlen"])
    return reasons


def _launch(flash, fcall) -> None:
    """flash_attention's dispatch by its plain-value key (one dict lookup on a repeat, as its
    public call does), not a Problem built per call."""
    flash.SPEC.launch_keyed(flash._key(fcall), lambda: flash.problem_of(fcall), fcall)


def _launch_backward(flash, bcall) -> None:
    flash.SPEC_BACKWARD.launch_keyed(flash._key(bcall, bcall.deterministic),
                                     lambda: flash.backward_problem_of(bcall), bcall)


# ---- document ids as varlen sequences ----------------------------------------------------------

_RUNS: dict[tuple, tuple[str, Tensor | None, int, int]] = {}


def _runs(low: _lower.Lowered, buffers: list[Tensor], B: int, S: int,
          device: torch.device) -> tuple[str, Tensor | None, int, int]:
    """(reason, starts, longest, documents): ``starts`` int64 (B, S) on the host, each batch
    row's run starts ascending then padded with S, ``documents`` the runs of all rows; ""
    when every document of every batch row is one contiguous run and queries and keys carry
    the same ids. One host sync per ids tensor and version (cached; the entry goes with the
    tensor): what the calls read is decided here, not per launch."""
    key = (low, tuple((id(b), b._version) for b in buffers), B, S, device)
    hit = _RUNS.get(key)
    if hit is not None:
        return hit
    ar = torch.arange(S, device=device).view(1, S)
    b = torch.arange(B, device=device).view(B, 1)
    x = _lower._eval(low.doc[0], buffers, b=b, q_idx=ar).to(torch.int64).expand(B, S)
    y = _lower._eval(low.doc[1], buffers, b=b, kv_idx=ar).to(torch.int64).expand(B, S)
    new = torch.ones(B, S, dtype=torch.bool, device=device)
    new[:, 1:] = x[:, 1:] != x[:, :-1]
    ordered = x.sort(dim=1).values
    distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(1)
    # Run starts ascending per row, padded with S: the stable sort keeps them in order.
    starts = torch.where(new, ar, S).sort(dim=1, stable=True).values
    same, contiguous, starts = (t.cpu() for t in ((x == y).all(),
                                                  (new.sum(1) == distinct).all(), starts))
    if not same:
        hit = ("document ids of queries and keys differ", None, 0, 0)
    elif not contiguous:
        hit = ("a document's tokens are not one contiguous run (flash_attention's varlen "
               "sequences are)", None, 0, 0)
    elif int((starts < S).sum()) > MAX_GRID_YZ:
        # One varlen sequence per (batch row, document) at least: flash's grids put
        # sequences in z.
        hit = (f"{int((starts < S).sum())} documents in the batch, more varlen sequences than "
               f"the launch grid's {MAX_GRID_YZ}", None, 0, 0)
    else:
        ends = torch.cat([starts[:, 1:], torch.full((B, 1), S, dtype=starts.dtype)], 1)
        longest = int((torch.where(starts < S, ends - starts, 0)).max()) if S else 0
        hit = ("", starts, longest, int((starts < S).sum()))
    if len(_RUNS) >= 256:
        _RUNS.clear()
    _RUNS[key] = hit
    for t in buffers:
        weakref.finalize(t, _RUNS.pop, key, None)
    return hit


def doc_reason(q: Tensor, k: Tensor, mods: _codegen.Translation) -> str:
    """"" unless the mods lower to document ids (and no other hook) that cannot become varlen
    sequences: queries and keys of equal length, ids in contiguous runs."""
    low = _lower.lower(mods)
    if isinstance(low, str) or low.doc is None or low.slopes is not None \
            or low.prefix is not None:
        return ""
    S = q.shape[2]
    if k.shape[2] != S:
        return (f"document ids with {S} queries and {k.shape[2]} keys (varlen sequences need "
                "equal lengths)")
    geo = _lower.geometry(low, S, S)
    if isinstance(geo, str) or (geo.sq, geo.sk) != (S, S):
        # A band that leaves the last keys or queries out of every row cannot be written as
        # per-document windows (the flash kernels' bottom-right windows are >= 0).
        return "document ids with a band strictly off the diagonal"
    return _runs(low, mods.buffers, q.shape[0], q.shape[2], q.device)[0]


_CU: dict[tuple, tuple[Tensor, int]] = {}


def _plan_varlen(call, low: _lower.Lowered) -> tuple[bool, Tensor, int]:
    """(flat, cu_seqlens, longest document): the token layout (:func:`_varlen_layout`) and
    int32 cu_seqlens over its tokens, sequences in (batch, head, document) order for
    (B*H*S, 1, D) tokens, else (batch, document) for (B*S, H, D)."""
    B, H, S, _ = call.q.shape
    reason, starts, longest, docs = _runs(low, call.mods.buffers, B, S, call.q.device)
    if reason:  # supports() said yes on the same ids: never reached
        raise ValueError(f"flex_attention: backend 'flash': {reason}")
    flat = _varlen_layout(call, docs)
    heads = H if flat else 1
    key = (id(starts), heads)
    hit = _CU.get(key)
    if hit is None:
        rows = [s[s < S] for s in starts]
        offsets = [r + (b * heads + h) * S for b, r in enumerate(rows) for h in range(heads)]
        cu = torch.cat([*offsets, torch.tensor([B * heads * S])]).to(torch.int32)
        hit = (cu.to(call.q.device), longest)
        if len(_CU) >= 256:
            _CU.clear()
        _CU[key] = hit
        weakref.finalize(starts, _CU.pop, key, None)
    return (flat, *hit)


def _merges(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether dims of these sizes and strides merge into one (what ``view`` requires)."""
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    return all(a[1] == b[1] * b[0] for a, b in zip(dims, dims[1:]))


def _in_place(t: Tensor, heads_flat: bool) -> bool:
    """Whether (B, H, S, D) ``t`` reads as varlen tokens without a copy (see :func:`_tokens`)."""
    B, H, S, D = t.shape
    st = t.stride()
    if st[3] != 1 and D > 1:
        return False
    return _merges((B, H, S), st[:3]) if heads_flat else _merges((B, S), (st[0], st[2]))


def _tokens(t: Tensor, heads_flat: bool) -> Tensor | None:
    """``t`` (B, H, S, D) as varlen tokens without a copy, or None: (B*H*S, 1, D) when
    ``heads_flat``, else (B*S, H, D)."""
    if not _in_place(t, heads_flat):
        return None
    B, H, S, D = t.shape
    return t.view(B * H * S, 1, D) if heads_flat else t.transpose(1, 2).view(B * S, H, D)


def _read(t: Tensor, heads_flat: bool) -> Tensor:
    """:func:`_tokens`, or a copy in that layout."""
    got = _tokens(t, heads_flat)
    if got is not None:
        return got
    B, H, S, D = t.shape
    if heads_flat:
        return t.contiguous().view(B * H * S, 1, D)
    return t.transpose(1, 2).contiguous().view(B * S, H, D)


def _varlen_layout(call, documents: int) -> bool:
    """True: (B*H*S, 1, D) tokens (q and k with the same heads, q's storage (B, H, S, D),
    which keeps the lse in place too, and at most MAX_GRID_YZ sequences of one head); False:
    (B*S, H, D) tokens (copies where the storage is not (B, S, H, D))."""
    H = call.q.shape[1]
    return H == call.k.shape[1] and H * documents <= MAX_GRID_YZ and _in_place(call.q, True)


def _lse_tokens(lse: Tensor, heads_flat: bool) -> Tensor:
    """flex's (B, H, S) lse as flash varlen's (heads, tokens), contiguous (a copy if not
    ``heads_flat``)."""
    B, H, S = lse.shape
    if heads_flat:
        return lse.reshape(1, B * H * S).contiguous()
    return lse.permute(1, 0, 2).reshape(H, B * S).contiguous()


def _doc_forward(call, low: _lower.Lowered, geo: _lower.Geometry) -> None:
    flash = module(_FLASH)
    flat, cu, longest = _plan_varlen(call, low)
    q, k, v = (_read(t, flat) for t in (call.q, call.k, call.v))
    out = _tokens(call.out, flat)
    scratch_out = out is None
    if scratch_out:
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device)
    lse = call.lse.view(1, -1) if flat and call.lse.is_contiguous() else \
        torch.empty(q.shape[1], q.shape[0], device=q.device)
    fcall = flash.Call(q, k, v, cu, cu, longest, longest, call.scale, geo.window_left,
                       geo.window_right, low.softcap, out, lse)
    _launch(flash, fcall)
    B, H, S, _ = call.q.shape
    if scratch_out:
        call.out.copy_(out.view(B, H, S, -1) if flat else out.view(B, S, H, -1).transpose(1, 2))
    if lse.data_ptr() != call.lse.data_ptr():
        call.lse.copy_(lse.view(B, H, S) if flat else lse.view(H, B, S).transpose(0, 1))


def _doc_backward(call, low: _lower.Lowered, geo: _lower.Geometry) -> None:
    flash = module(_FLASH)
    flat, cu, longest = _plan_varlen(call, low)
    q, k, v, out, dout = (_read(t, flat) for t in (call.q, call.k, call.v, call.out, call.dout))
    lse = _lse_tokens(call.lse, flat)
    dlse = _lse_tokens(call.dlse, flat) if call.dlse is not None else None
    grads = [call.dq, call.dk, call.dv]
    views = [_tokens(g, flat) for g in grads]
    scratch = [w is None for w in views]
    views = [torch.empty_like(x) if w is None else w for w, x in zip(views, (q, k, v))]
    bcall = flash.BackwardCall(dout, dlse, q, k, v, out, lse, cu, cu, longest, longest,
                               call.scale, geo.window_left, geo.window_right, low.softcap,
                               torch.are_deterministic_algorithms_enabled(), *views)
    _launch_backward(flash, bcall)
    for g, w, copy in zip(grads, views, scratch):
        if copy:
            B, H, S, D = g.shape
            g.copy_(w.view(B, H, S, D) if flat else w.view(B, S, H, D).transpose(1, 2))


def _strided(t: Tensor) -> str | None:
    """flash_attention's backends read and write any strides with a contiguous last dim (its
    cuda backend copies what its kernels cannot address): only that needs a copy here."""
    return None if t.stride(-1) == 1 else "its last dim is not contiguous"


def run(call, config: Config) -> None:
    """Forward: writes ``call.out`` and ``call.lse`` (flash's lse is flex's: (B, H, Sq) fp32,
    natural log)."""
    flash = module(_FLASH)
    low, geo = _cuda.plan_geometry(call)
    if low.doc is not None:
        return _doc_forward(call, low, geo)

    def launch(q, k, v, out, lse):
        fcall = flash.Call(q, k, v, None, None, geo.sq, geo.sk, call.scale, geo.window_left,
                           geo.window_right, low.softcap, out, lse)
        _launch(flash, fcall)

    _cuda.forward_views(call, geo, launch, _strided)


def backward(call, config: Config) -> None:
    """Backward: writes ``call.dq``, ``call.dk``, ``call.dv``; flash computes its own
    ``rowsum(dout * out) - dlse`` (``call.delta`` is never read)."""
    flash = module(_FLASH)
    low, geo = _cuda.plan_geometry(call)
    if low.doc is not None:
        return _doc_backward(call, low, geo)

    def launch(dout, dlse, q, k, v, out, lse, dq, dk, dv):
        bcall = flash.BackwardCall(dout, dlse, q, k, v, out, lse, None, None, geo.sq, geo.sk,
                                   call.scale, geo.window_left, geo.window_right, low.softcap,
                                   torch.are_deterministic_algorithms_enabled(), dq, dk, dv)
        _launch_backward(flash, bcall)

    _cuda.backward_views(call, geo, launch, _strided)
