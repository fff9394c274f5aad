"""``paged_attention`` and ``append_paged_kv`` on XLA, in static shapes.

Every sequence's whole block-table row is gathered (``B x max_pages x page_size`` keys, page ids
clamped into the cache as the kernels clamp them), keys past ``seq_lens[b]`` are masked on the
device, and decode or chunked-prefill queries attend in one padded batch (:mod:`._attention`).
The graph depends on the table's width and ``max_seqlen_q``, not on lengths or ids.

No Pallas form: torch_xla's paged kernels read other cache layouts (``paged_attention``: (kv
heads, pages, page size, D); ``ragged_paged_attention``: one array with k and v interleaved by
head), into which kpt's ``k_cache`` / ``v_cache`` would be copied whole on every call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kpt.backends.xla import XLA_CONFIG

from ._attention import attend, pad, unpad_index

PALLAS_REASON = ("torch_xla's Pallas paged kernels read other cache layouts ((Hkv, pages, page, "
                 "D), or k and v interleaved in one array): each call would copy the caches")


def supports(_problem) -> list[str]:
    return []


def configs(_problem) -> list[dict]:
    return [dict(XLA_CONFIG)]


def pallas_reason(_problem) -> list[str]:
    return [PALLAS_REASON]


def gather(cache: Tensor, block_table: Tensor, kv_layout: str, scale: Tensor | None) -> Tensor:
    """Every row's pages: (B, max_pages * page_size, Hkv, D) float32, scaled for fp8."""
    ids = block_table.to(torch.int64).clamp(0, cache.shape[0] - 1)
    pages = cache[ids].float()  # (B, P, page, Hkv, D) or (B, P, Hkv, page, D)
    if kv_layout == "HND":
        pages = pages.transpose(2, 3)
    b, p, page, heads, d = pages.shape
    keys = pages.reshape(b, p * page, heads, d)
    if scale is not None:
        keys = keys * scale.float().reshape(-1).expand(heads)[:, None]
    return keys


def forward(call) -> tuple[Tensor, Tensor]:
    """out (like q, float32) and lse ((B, Hq) decode, (Hq, Tq) varlen)."""
    k = gather(call.k_cache, call.block_table, call.kv_layout, call.k_scale)
    v = gather(call.v_cache, call.block_table, call.kv_layout, call.v_scale)
    k_len = call.seq_lens.to(torch.int64).clamp(0, k.shape[1])
    options = dict(scale=call.scale, left=call.window_left, right=call.window_right,
                   softcap=call.softcap, k_len=k_len)
    q = call.q
    if call.cu_seqlens_q is None:  # decode: one query, the last token of its sequence
        out, lse = attend(q[:, None], k, v, (k_len - 1)[:, None], **options)
        return out[:, 0], lse[:, :, 0]
    cu = call.cu_seqlens_q.to(torch.int64)
    len_q = cu[1:] - cu[:-1]
    slots = call.max_seqlen_q
    qp, q_ok = pad(q, cu[:-1], len_q, slots)
    pos = torch.arange(slots, device=q.device)[None, :] + (k_len - len_q)[:, None]
    out_p, lse_p = attend(qp, k, v, pos, q_valid=q_ok, **options)
    seq, index, inside = unpad_index(cu, q.shape[0])
    index = index.clamp(0, max(slots - 1, 0))
    out = torch.where(inside[:, None, None], out_p[seq, index], 0.0)
    lse = torch.where(inside[None, :], lse_p[seq, :, index].transpose(0, 1), float("-inf"))
    return out, lse


def run(call, config: dict) -> None:
    out, lse = forward(call)
    call.out.copy_(out)
    call.lse.copy_(lse)


def run_append(call, config: dict) -> None:
    """``append_paged_kv``: the reference's scatter (positions and page ids computed and clamped
    on the device), with each new token's sequence found by counting offsets instead of the
    reference's ``repeat_interleave`` over a length tensor, which torch_xla 2.9 runs on its CPU
    fallback (a host round trip)."""
    from kpt.ops.paged_attention import reference

    tokens = call.k.shape[0]
    if tokens == 0:
        return
    dev = call.k.device
    if call.cu_seqlens is None:
        seq = torch.arange(tokens, device=dev)
        index = torch.zeros(tokens, dtype=torch.int64, device=dev)
        counts = torch.ones(tokens, dtype=torch.int64, device=dev)
    else:
        cu = call.cu_seqlens.to(torch.int64)
        seq, index, _ = unpad_index(cu, tokens)
        counts = (cu[1:] - cu[:-1])[seq]
    page_size = call.page_size
    capacity = call.block_table.shape[1] * page_size
    pos = (call.seq_lens.to(torch.int64)[seq] - counts + index).clamp(0, capacity - 1)
    pages = call.block_table.to(torch.int64)[seq, pos // page_size]
    pages = pages.clamp(0, call.k_cache.shape[0] - 1)
    slots = pos % page_size
    for src, cache, scale in ((call.k, call.k_cache, call.k_scale),
                              (call.v, call.v_cache, call.v_scale)):
        rows = reference.quantize(src, scale, cache.dtype)
        if call.kv_layout == "NHD":
            cache[pages, slots] = rows
        else:
            cache[pages, :, slots] = rows
