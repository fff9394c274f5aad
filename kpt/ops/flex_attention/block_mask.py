"""Block-sparsity tables: kpt's own ``create_block_mask`` and the normalised form kernels read.

A block mask splits the (q, kv) score matrix into ``BLOCK_SIZE`` tiles and lists, per
(batch, head, q-block), the kv-blocks that are *partial* (``mask_mod`` must be evaluated) and
*full* (every element visible: ``mask_mod`` is skipped); unlisted blocks are skipped entirely.
The backward also needs the transpose: per kv-block, the q-blocks that touch it.

:func:`create_block_mask` evaluates ``mask_mod`` with broadcast ``arange`` index tensors on the
device, chunked over q-blocks, with plain torch ops (no torch.compile). :func:`normalize`
accepts torch's ``BlockMask``, kpt's, or None and returns :class:`Tables`, always with full-block
and q-direction tables, derived from the kv-direction tables so both directions agree.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _checks

OP = "flex_attention"
_CHUNK_ELEMENTS = 1 << 26  # bound on the mask elements evaluated at once
_HUGE_BLOCK = 1 << 29  # torch's "no mask" BlockMask uses a block size of 2**30


@dataclass(eq=False)  # identity equality: usable as a (weak) cache key
class BlockMask:
    """kpt's block mask, with torch's field names (so either kind can be passed around)."""

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor | None
    full_kv_indices: Tensor | None
    q_num_blocks: Tensor
    q_indices: Tensor
    full_q_num_blocks: Tensor | None
    full_q_indices: Tensor | None
    BLOCK_SIZE: tuple[int, int]
    mask_mod: Callable | None
    seq_lengths: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h = self.kv_num_blocks.shape[:2]
        return (b, h, *self.seq_lengths)


@dataclass
class Tables:
    """int32 contiguous tables; batch and head dims are 1 (broadcast) or the call's B / Hq."""

    kv_num: Tensor  # (Bm, Hm, NQ)
    kv_idx: Tensor  # (Bm, Hm, NQ, NKV)
    full_kv_num: Tensor
    full_kv_idx: Tensor
    q_num: Tensor  # (Bm, Hm, NKV)
    q_idx: Tensor  # (Bm, Hm, NKV, NQ)
    full_q_num: Tensor
    full_q_idx: Tensor
    block_q: int
    block_kv: int
    mask_mod: Callable | None
    has_partial: bool = True

    def dense(self) -> Tensor:
        """(Bm, Hm, NQ, NKV) int8: 0 skipped, 1 partial, 2 full."""
        return _dense_from_lists(self.kv_num, self.kv_idx, self.full_kv_num, self.full_kv_idx)

    def as_list(self) -> list[Tensor]:
        return [self.kv_num, self.kv_idx, self.full_kv_num, self.full_kv_idx,
                self.q_num, self.q_idx, self.full_q_num, self.full_q_idx]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _block_sizes(block_size: int | tuple[int, int]) -> tuple[int, int]:
    if _is_int(block_size):
        block_size = (block_size, block_size)
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(_is_int(x) and x > 0 for x in block_size)):
        raise ValueError(f"{OP}: BLOCK_SIZE must be a positive int or a pair of them, got "
                         f"{block_size!r}")
    return int(block_size[0]), int(block_size[1])


def _check_sizes(B: object, H: object, q_len: object, kv_len: object) -> None:
    for name, value, allow_none in (("B", B, True), ("H", H, True), ("Q_LEN", q_len, False),
                                    ("KV_LEN", kv_len, False)):
        if value is None and allow_none:
            continue
        if not _is_int(value) or value < (1 if name in ("B", "H") else 0):
            least = "a positive int" if name in ("B", "H") else "an int >= 0"
            raise ValueError(f"{OP}: {name} must be {least}{' or None' if allow_none else ''}, "
                             f"got {value!r}")


def _tables_from_dense(partial: Tensor, full: Tensor) -> list[Tensor]:
    """kv- and q-direction (count, indices) tables of two (B, H, NQ, NKV) bool block maps."""
    out = []
    for dense in (partial, full):
        out.append(dense.sum(-1, dtype=torch.int32).contiguous())
        # A stable sort puts the listed blocks first, in ascending order.
        out.append(torch.argsort((~dense).to(torch.int8), dim=-1, stable=True)
                   .to(torch.int32).contiguous())
    for dense in (partial, full):
        t = dense.transpose(-1, -2)
        out.append(t.sum(-1, dtype=torch.int32).contiguous())
        out.append(torch.argsort((~t).to(torch.int8), dim=-1, stable=True)
                   .to(torch.int32).contiguous())
    kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx = out
    return [kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx]


def mask_grid(mask_mod: Callable, B: int, H: int, q: Tensor, kv: Tensor) -> Tensor:
    """``mask_mod`` on broadcast index tensors: (B, H, len(q), len(kv)) bool."""
    dev = q.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    out = mask_mod(b, h, q.view(1, 1, -1, 1), kv.view(1, 1, 1, -1))
    if not isinstance(out, Tensor):
        out = torch.tensor(bool(out), device=dev)
    return out.to(torch.bool).expand(B, H, q.numel(), kv.numel())


def create_block_mask(
    mask_mod: Callable | None,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: str | torch.device | None = None,
    BLOCK_SIZE: int | tuple[int, int] = 128,
) -> BlockMask:
    """Block-sparsity tables of ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend).

    Like ``torch.nn.attention.flex_attention.create_block_mask`` (B or H None: broadcast over
    that dim) but evaluated eagerly with broadcast index tensors, chunked over q-blocks, so it
    needs no torch.compile. The mod must work on broadcastable integer tensors (no Python
    branching on their values), as torch's does under vmap. ``device`` defaults to the current
    CUDA device when there is one, else the CPU (torch's is always ``"cuda"``).
    """
    bq, bkv = _block_sizes(BLOCK_SIZE)
    _check_sizes(B, H, Q_LEN, KV_LEN)
    if mask_mod is not None and not callable(mask_mod):
        raise TypeError(f"{OP}: mask_mod must be callable(b, h, q_idx, kv_idx) or None, got "
                        f"{type(mask_mod).__name__}")
    B, H = B or 1, H or 1
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if mask_mod is not None and not torch.compiler.is_compiling():
        # flex_attention's rules for mods (elementwise, bool, no Python branching), checked
        # here too: this is where a mask_mod is first evaluated.
        _checks.check_mod(_checks.MASK_MOD, mask_mod,
                          _checks.Sizes(B, H, Q_LEN, KV_LEN, device))
    nq, nkv = -(-Q_LEN // bq), -(-KV_LEN // bkv)
    partial = torch.zeros(B, H, nq, nkv, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    kv = torch.arange(KV_LEN, device=device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, B * H * KV_LEN * bq))
    for start in range(0, nq, rows):
        stop = min(nq, start + rows)
        q = torch.arange(start * bq, min(Q_LEN, stop * bq), device=device)
        if mask_mod is None:
            m = torch.ones(B, H, q.numel(), KV_LEN, dtype=torch.bool, device=device)
        else:
            m = mask_grid(mask_mod, B, H, q, kv)
        # Pad to whole blocks with False: a block crossing the end is never "full", so the
        # kernels keep evaluating mask_mod (and bounds) there.
        pad = torch.zeros(B, H, (stop - start) * bq, nkv * bkv, dtype=torch.bool, device=device)
        pad[:, :, : q.numel(), :KV_LEN] = m
        blocks = pad.view(B, H, stop - start, bq, nkv, bkv)
        any_ = blocks.any(dim=5).any(dim=3)
        all_ = blocks.all(dim=5).all(dim=3)
        full[:, :, start:stop] = all_
        partial[:, :, start:stop] = any_ & ~all_
    t = _tables_from_dense(partial, full)
    return BlockMask(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], (bq, bkv), mask_mod,
                     (Q_LEN, KV_LEN))


def _dense_from_lists(num: Tensor, idx: Tensor, full_num: Tensor | None,
                      full_idx: Tensor | None) -> Tensor:
    nkv = idx.shape[-1]
    dense = torch.zeros(*num.shape, nkv + 1, dtype=torch.int8, device=num.device)
    for value, n, ix in ((1, num, idx), (2, full_num, full_idx)):
        if n is None or ix is None:
            continue
        ix = ix.long()
        n = n.long()
        if ix.shape[-1] < nkv:  # a narrower index table: pad with the dummy column
            ix = torch.nn.functional.pad(ix, (0, nkv - ix.shape[-1]), value=nkv)
        listed = torch.arange(ix.shape[-1], device=ix.device) < n[..., None]
        col = torch.where(listed, ix[..., :nkv] if ix.shape[-1] > nkv else ix, nkv)
        col = col.clamp(0, nkv)
        dense.scatter_(-1, col, torch.full_like(col, value, dtype=torch.int8))
    return dense[..., :nkv]


_NORMALIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ALL_FULL: dict[tuple, Tables] = {}


def all_full(sq: int, skv: int, block: int, device: torch.device) -> Tables:
    """Tables for "no mask": every block full (cached per size and device)."""
    compiling = torch.compiler.is_compiling()  # under dynamo: built in the graph, no cache
    key = (sq, skv, block, device)
    hit = None if compiling else _ALL_FULL.get(key)
    if hit is None:
        nq, nkv = -(-sq // block), -(-skv // block)
        dense = torch.ones(1, 1, nq, nkv, dtype=torch.bool, device=device)
        t = _tables_from_dense(torch.zeros_like(dense), dense)
        hit = Tables(*t, block_q=block, block_kv=block, mask_mod=None, has_partial=False)
        if not compiling:
            _ALL_FULL[key] = hit
    return hit


def is_noop_mask(block_mask) -> bool:
    bs = getattr(block_mask, "BLOCK_SIZE", (0, 0))
    return int(bs[0]) >= _HUGE_BLOCK and int(bs[1]) >= _HUGE_BLOCK


def normalize(block_mask, B: int, H: int, sq: int, skv: int, device: torch.device) -> Tables:
    """:class:`Tables` of a torch or kpt BlockMask (validated against the call's sizes)."""
    for name in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE"):
        if not hasattr(block_mask, name):
            raise TypeError(f"{OP}: block_mask must be a BlockMask (torch's or kpt's), got "
                            f"{type(block_mask).__name__} without .{name}")
    bq, bkv = _block_sizes(tuple(block_mask.BLOCK_SIZE))
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    if num.dim() != 3 or idx.dim() != 4:
        raise ValueError(f"{OP}: block_mask.kv_num_blocks must be (B, H, Q_BLOCKS) and "
                         f"kv_indices (B, H, Q_BLOCKS, KV_BLOCKS), got {tuple(num.shape)} and "
                         f"{tuple(idx.shape)}")
    if num.device.type != device.type or None not in (num.device.index, device.index) \
            and num.device.index != device.index:
        raise ValueError(f"{OP}: block_mask is on {num.device}, q/k/v on {device}")
    lengths = getattr(block_mask, "seq_lengths", None)
    nq, nkv = -(-sq // bq), -(-skv // bkv)
    if lengths is not None and tuple(lengths) != (sq, skv) or num.shape[-1] != nq:
        raise ValueError(f"{OP}: block_mask was built for (Q_LEN, KV_LEN) = "
                         f"{tuple(lengths) if lengths is not None else '?'} with BLOCK_SIZE "
                         f"{(bq, bkv)}, but q_len={sq}, kv_len={skv}")
    bm, hm = num.shape[:2]
    if bm not in (1, B) or hm not in (1, H):
        raise ValueError(f"{OP}: block_mask has batch/head dims {(bm, hm)}; expected 1 or "
                         f"the query's {(B, H)}")
    # Under dynamo the tables are computed in the graph from the mask's tensors (graph inputs),
    # so the weak-keyed cache is skipped (dynamo would not trace it, and must not bake results).
    compiling = torch.compiler.is_compiling()
    if not compiling:
        try:
            hit = _NORMALIZED.get(block_mask)
        except TypeError:
            hit = None
        if hit is not None:
            return hit
    dense = _dense_from_lists(num, idx, getattr(block_mask, "full_kv_num_blocks", None),
                              getattr(block_mask, "full_kv_indices", None))
    if dense.shape[-1] < nkv:
        dense = torch.nn.functional.pad(dense, (0, nkv - dense.shape[-1]))
    dense = dense[..., :nkv]
    t = _tables_from_dense(dense == 1, dense == 2)
    out = Tables(*t, block_q=bq, block_kv=bkv, mask_mod=getattr(block_mask, "mask_mod", None))
    if not compiling:
        try:
            _NORMALIZED[block_mask] = out
        except TypeError:
            pass
    return out
