"""``cuda`` and ``hip`` backends of flex_attention: named mods on the hand-written
flash-attention kernels of ``kpt.ops.flash_attention._cuda`` (one launcher for nvcc and hipcc).

``_lower.py`` turns the traced mods into kernel parameters (band windows, soft-cap, ALiBi
slopes, prefix lengths, document ids); this file checks what the kernel cannot take
(:func:`supports`), turns the block mask into per-query-block key ranges, and calls the
launcher with (B, S, H, D) *views* of flex's (B, H, S, D) tensors (``transpose(1, 2)``, no copy).

The kernel may see fewer rows / keys than the caller (``_lower.geometry``): trailing queries
that see no key get out 0 and lse -inf here, trailing keys no query sees get zero gradients.
The ``flash`` backend (``_flash.py``) shares that handling (:func:`forward_views`,
:func:`backward_views`) and the reasons (:func:`lowered_reasons`).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from kpt.ops._common import module
from kpt.ops._registry import Config, Problem

from . import _codegen, _lower

OP = "flex_attention"
MAX_HEAD_DIM = 256
_LAUNCHER = "kpt.ops.flash_attention._cuda"


def _launcher():
    return module(_LAUNCHER)


def _unavailable() -> str | None:
    try:
        fa = _launcher()
    except ImportError as err:
        return f"{_LAUNCHER} does not import ({err})"
    for name in ("forward", "backward", "Q_BLOCK"):
        if not hasattr(fa, name):
            return f"{_LAUNCHER} has no {name}"
    for name in ("cuda_unavailable", "unavailable_reason"):
        check = getattr(fa, name, None)
        if check is not None:
            return check()
    return None


def cuda_unavailable() -> str | None:
    """Why the CUDA backend cannot run here, or None (the registry checks ``rocm=False``)."""
    return _unavailable()


def hip_unavailable() -> str | None:
    """Why the HIP backend cannot run here, or None (``rocm=True``)."""
    try:
        check = getattr(_launcher(), "hip_unavailable", None)
    except ImportError:
        check = None
    return check() if check is not None else _unavailable()


def lowered_reasons(p: Problem) -> tuple[_lower.Lowered | None, list[str]]:
    """The lowering of the problem's mods (None when they do not lower) and the reasons shared
    by every backend that runs lowered mods (``cuda``/``hip`` here, ``flash``): block mask,
    mods, geometry, head dims, broadcast k/v batch."""
    reasons = []
    blocks = p.get("cuda_blocks")
    if blocks is None:
        reasons.append("not planned under torch.compile (the BlockMask check reads data)")
    elif blocks:
        reasons.append(blocks)
    mods = _codegen.REGISTRY.get(p["mods"])
    low = _lower.lower(mods) if mods is not None else "mods were not translated"
    if isinstance(low, str):
        reasons.append(low)
        low = None
    else:
        geo = _lower.geometry(low, p["q_len"], p["kv_len"])
        if isinstance(geo, str):
            reasons.append(geo)
    if p["head_dim"] != p["head_dim_v"]:
        reasons.append(f"head dims of q/k ({p['head_dim']}) and v ({p['head_dim_v']}) differ")
    if max(p["head_dim"], p["head_dim_v"]) > MAX_HEAD_DIM:
        reasons.append(f"head dim {max(p['head_dim'], p['head_dim_v'])} above {MAX_HEAD_DIM}")
    kv_batch = p.get("kv_batch", p["batch"])
    if kv_batch != p["batch"]:
        reasons.append(f"key/value batch {kv_batch} broadcast over query batch {p['batch']}")
    return low, reasons


def supports(p: Problem) -> list[str]:
    """Reasons this problem cannot run on the kernel (mods, sizes, layout, block mask)."""
    reasons = lowered_reasons(p)[1]
    if p["head_dim"] % 8:
        reasons.append(f"head dim {p['head_dim']} is not a multiple of 8 (16-byte rows)")
    return reasons


def blocks_reason(q: Tensor, k: Tensor, mods: _codegen.Translation, tables) -> str:
    """The data-dependent part of :func:`supports`, computed when the Problem is built:
    "" when the block mask adds nothing beyond the lowered mask (see ``check_tables``)."""
    low = _lower.lower(mods)
    if isinstance(low, str) or not tables.has_partial:
        return ""
    return _lower.check_tables(low, mods.buffers, tables, q.shape[0], q.shape[2], k.shape[2])


_RANGES: dict[tuple, Tensor] = {}


def _block_range(tables, q_block: int, B: int, sq: int, sk: int) -> Tensor | None:
    if not tables.has_partial:
        return None  # no block mask: the band alone bounds the keys
    key = (id(tables.kv_num), q_block, sq, sk)
    hit = _RANGES.get(key)
    if hit is None:
        hit = _lower.kv_block_range(tables, q_block, sq, sk)
        _RANGES[key] = hit
        weakref.finalize(tables.kv_num, _RANGES.pop, key, None)
    return hit.expand(B, *hit.shape[1:])


def configs(_problem: Problem) -> list[Config]:
    return [{}]


def _launcher_misaligned(t: Tensor) -> str | None:
    return _launcher()._misaligned(t)


def _bshd(t: Tensor, misaligned=_launcher_misaligned) -> Tensor:
    """The (B, S, H, D) view of a (B, H, S, D) tensor; a copy only where ``misaligned`` says
    its strides cannot be read in place (the launcher wants 16-byte aligned rows)."""
    t = t.transpose(1, 2)
    return t if misaligned(t) is None else t.contiguous()


def _writable(t: Tensor, misaligned=_launcher_misaligned) -> tuple[Tensor, bool]:
    """``t`` as a (B, S, H, D) view the kernel can write, or an aligned scratch (True)."""
    view = t.transpose(1, 2)
    if misaligned(view) is None:
        return view, False
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).transpose(1, 2), True


_GEOMETRY: dict[tuple, tuple] = {}


def plan_geometry(call) -> tuple[_lower.Lowered, _lower.Geometry]:
    """The lowered mods and the kernel's view of the call (``supports`` said yes); remembered
    per mods key and lengths (both are pure functions of them), since this runs every call."""
    key = (call.mods.key, call.q.shape[2], call.k.shape[2])
    hit = _GEOMETRY.get(key)
    if hit is not None:
        return hit
    low = _lower.lower(call.mods)
    geo = low if isinstance(low, str) else _lower.geometry(low, call.q.shape[2], call.k.shape[2])
    if isinstance(geo, str):  # supports() said no: never reached
        raise ValueError(f"{OP}: a lowered-mods backend called on an unsupported problem: {geo}")
    if len(_GEOMETRY) >= 4096:
        _GEOMETRY.clear()
    _GEOMETRY[key] = (low, geo)
    return low, geo


def _plan(call):
    low, geo = plan_geometry(call)
    B, H = call.q.shape[:2]
    kw = _lower.params(low, call.mods.buffers, B, H, geo, call.q.device)
    fa = _launcher()
    kw.update(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=geo.sq, max_seqlen_k=geo.sk,
              scale=call.scale,
              kv_block_range=_block_range(call.tables, fa.Q_BLOCK, B, geo.sq, geo.sk))
    return fa, geo, kw


_HOOKS = ("alibi_slopes", "prefix_len", "doc_q", "doc_k")


def _band_forward(fa, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, kw: dict) -> None:
    """Band masks and soft-cap only: flash_attention's own cuda dispatch, whose first config
    is the fastest kernel for the device (the wgmma kernel on Hopper, which takes no flex
    hooks). The block range is not needed: the BlockMask was checked to skip only blocks
    the band leaves out, and the kernels skip those already."""
    flash = module("kpt.ops.flash_attention")
    fcall = flash.Call(q, k, v, None, None, q.shape[1], k.shape[1], kw["scale"],
                       kw["window_left"], kw["window_right"], kw["softcap"], o, lse)
    fa.run(fcall, fa.configs(flash.problem_of(fcall))[0])


def forward_views(call, geo: _lower.Geometry, launch, misaligned=_launcher_misaligned) -> None:
    """The forward of a lowered-mods backend around ``launch(q, k, v, out, lse)``, which gets
    (B, S, H, D) views of the rows and keys the kernel sees (``geo``) and a (B, H, geo.sq)
    contiguous lse. Trailing queries that see no key get out 0 and lse -inf."""
    sq = call.q.shape[2]
    if geo.sq < sq:
        call.out[:, :, geo.sq:].zero_()
        call.lse[:, :, geo.sq:].fill_(float("-inf"))
    if geo.sq == 0 or geo.sk == 0:
        call.out.zero_()
        call.lse.fill_(float("-inf"))
        return
    # Views only where the kernel sees fewer rows or keys (slicing costs host time per call).
    q, out = (call.q, call.out) if geo.sq == sq else (call.q[:, :, : geo.sq],
                                                      call.out[:, :, : geo.sq])
    k, v = (call.k, call.v) if geo.sk == call.k.shape[2] else (call.k[:, :, : geo.sk],
                                                              call.v[:, :, : geo.sk])
    lse = call.lse if geo.sq == sq else call.lse.new_empty(*call.lse.shape[:2], geo.sq)
    o, scratch = _writable(out, misaligned)
    launch(*(_bshd(t, misaligned) for t in (q, k, v)), o, lse)
    if scratch:
        out.copy_(o.transpose(1, 2))
    if lse is not call.lse:
        call.lse[:, :, : geo.sq].copy_(lse)


def backward_views(call, geo: _lower.Geometry, launch,
                   misaligned=_launcher_misaligned) -> None:
    """The backward of a lowered-mods backend around
    ``launch(dout, dlse, q, k, v, out, lse, dq, dk, dv)`` on (B, S, H, D) views of what the
    kernel sees (lse, dlse (B, H, geo.sq) contiguous, dlse may be None). Trimmed rows and keys
    get zero gradients."""
    sq, sk = call.q.shape[2], call.k.shape[2]
    if geo.sq < sq:
        call.dq[:, :, geo.sq:].zero_()
    if geo.sk < sk:
        call.dk[:, :, geo.sk:].zero_()
        call.dv[:, :, geo.sk:].zero_()
    if geo.sq == 0 or geo.sk == 0:
        for t in (call.dq, call.dk, call.dv):
            t.zero_()
        return
    rows = slice(None, geo.sq)
    dlse = call.dlse[:, :, rows].contiguous() if call.dlse is not None else None
    q, out, dout = (t[:, :, rows] for t in (call.q, call.out, call.dout))
    k, v = call.k[:, :, : geo.sk], call.v[:, :, : geo.sk]
    lse = call.lse[:, :, rows].contiguous()
    grads = [call.dq[:, :, rows], call.dk[:, :, : geo.sk], call.dv[:, :, : geo.sk]]
    views = [_writable(g, misaligned) for g in grads]
    launch(_bshd(dout, misaligned), dlse, *(_bshd(t, misaligned) for t in (q, k, v, out)), lse,
           *(w for w, _ in views))
    for g, (w, scratch) in zip(grads, views):
        if scratch:
            g.copy_(w.transpose(1, 2))


def run(call, config: Config) -> None:
    """Forward: writes ``call.out`` and ``call.lse``."""
    fa, geo, kw = _plan(call)

    def launch(q, k, v, o, lse):
        if not config and all(kw[h] is None for h in _HOOKS):
            _band_forward(fa, q, k, v, o, lse, kw)
        else:
            fa.forward(q, k, v, o, lse, **kw, config=config or None)

    forward_views(call, geo, launch)


def backward(call, config: Config) -> None:
    """Backward: writes ``call.dq``, ``call.dk``, ``call.dv``."""
    fa, geo, kw = _plan(call)

    def launch(dout, dlse, q, k, v, out, lse, dq, dk, dv):
        fa.backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, **kw,
                    deterministic=torch.are_deterministic_algorithms_enabled(),
                    config=config or None)

    backward_views(call, geo, launch)


run_cuda = run_hip = run
