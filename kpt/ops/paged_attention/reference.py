"""The specification of ``paged_attention`` and ``append_paged_kv`` in plain PyTorch.

Sequence ``b`` holds ``n = seq_lens[b]`` keys; key ``j`` lives in page ``block_table[b, j //
page_size]`` at slot ``j % page_size`` (``kv_layout`` "NHD": ``cache[page, slot, head]``, "HND":
``cache[page, head, slot]``). An fp8 cache holds ``k / k_scale`` (per tensor or per kv head), so
a key reads back as ``float(cache) * k_scale``. The sequence's ``m`` queries are its last ``m``
tokens (bottom-right), and attention over the gathered keys is exactly ``flash_attention``'s
(``flash_attention/reference.py``): float32 scores in log2 units (which defines overflow),
soft-cap before the mask, one rounding of the output to q's dtype, natural-log lse, zeros and
lse = -inf for a query that sees no key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kpt.ops.flash_attention.reference import attention_forward


def _scale_of(scale: Tensor | None, heads: int) -> Tensor | None:
    """(Hkv, 1) float32 multipliers of an fp8 cache's values (None: not quantised)."""
    if scale is None:
        return None
    return scale.float().reshape(-1, 1).expand(heads, 1)


def gather(cache: Tensor, block_table: Tensor, seq_lens: Tensor, kv_layout: str,
           scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """Every sequence's keys (or values), concatenated: ((sum n, Hkv, D) float32, cu (B+1,))."""
    page_size = cache.shape[1] if kv_layout == "NHD" else cache.shape[2]
    heads = cache.shape[2] if kv_layout == "NHD" else cache.shape[1]
    mult = _scale_of(scale, heads)
    # Clamped as the kernels clamp (lengths to the table's capacity, ids into the cache), so
    # malformed tables on a GPU (not read back per call) give the kernels' result, no fault.
    capacity = block_table.shape[1] * page_size
    parts, lengths = [], [max(0, min(n, capacity)) for n in seq_lens.tolist()]
    for b, n in enumerate(lengths):
        pages = block_table[b, : -(-n // page_size)].long().clamp(0, cache.shape[0] - 1)
        chunk = cache[pages].float()
        if kv_layout == "HND":
            chunk = chunk.transpose(1, 2)
        chunk = chunk.reshape(-1, heads, cache.shape[-1])[:n]
        parts.append(chunk * mult if mult is not None else chunk)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=cache.device)
    if lengths:
        cu[1:] = torch.tensor(lengths, device=cache.device).cumsum(0)
    empty = cache.new_zeros((0, heads, cache.shape[-1]), dtype=torch.float32)
    return (torch.cat(parts) if parts else empty), cu


def forward(call) -> tuple[Tensor, Tensor]:
    """out (like q) and lse (float32, (B, Hq) for decode, (Hq, Tq) for varlen)."""
    k, cu_k = gather(call.k_cache, call.block_table, call.seq_lens, call.kv_layout,
                     call.k_scale)
    v, _ = gather(call.v_cache, call.block_table, call.seq_lens, call.kv_layout, call.v_scale)
    q = call.q
    cu_q = call.cu_seqlens_q
    if cu_q is None:  # decode: one query per sequence
        cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    out, lse = attention_forward(q, k, v, cu_q, cu_k, call.scale, call.window_left,
                                 call.window_right, call.softcap)
    if call.cu_seqlens_q is None:
        lse = lse.transpose(0, 1)  # (Hq, B) -> (B, Hq)
    return out, lse


def run(call, config: dict) -> None:
    """Reference backend of ``paged_attention``: write call.out and call.lse."""
    out, lse = forward(call)
    call.out.copy_(out)
    call.lse.copy_(lse)


def quantize(x: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``x`` as the cache stores it: divided by its scale and cast (fp8 saturates at its
    largest finite value, as the kernels' conversion does)."""
    if scale is None:
        return x.to(dtype)
    y = x.float() / scale.float().reshape(-1, 1).expand(x.shape[-2], 1)
    limit = torch.finfo(dtype).max
    return y.clamp(-limit, limit).to(dtype)


def append(call) -> None:
    """Reference of ``append_paged_kv``: the ``m`` new tokens of sequence ``b`` are its last
    ones, positions ``seq_lens[b] - m`` onwards, written to their pages (quantised for an fp8
    cache). Device ops only (no host sync), so it also serves GPUs and graph capture; positions
    and page ids are clamped into the cache, so malformed tables never write outside it."""
    tokens = call.k.shape[0]
    if tokens == 0:
        return
    dev = call.k.device
    if call.cu_seqlens is None:
        batch_of = torch.arange(tokens, device=dev)
        index = torch.zeros(tokens, dtype=torch.int64, device=dev)
        counts = torch.ones(tokens, dtype=torch.int64, device=dev)
    else:
        cu = call.cu_seqlens.long()
        counts = cu[1:] - cu[:-1]
        batch_of = torch.repeat_interleave(torch.arange(counts.shape[0], device=dev),
                                           counts.clamp(min=0), output_size=tokens)
        index = torch.arange(tokens, device=dev) - cu[:-1][batch_of]
    page_size = call.page_size
    capacity = call.block_table.shape[1] * page_size
    pos = (call.seq_lens.long()[batch_of] - counts[batch_of] + index).clamp(0, capacity - 1)
    pages = call.block_table.long()[batch_of, pos // page_size].clamp(0, call.k_cache.shape[0] - 1)
    slots = pos % page_size
    for src, cache, scale in ((call.k, call.k_cache, call.k_scale),
                              (call.v, call.v_cache, call.v_scale)):
        rows = quantize(src, scale, cache.dtype)
        if call.kv_layout == "NHD":
            cache[pages, slots] = rows
        else:
            cache[pages, :, slots] = rows


def run_append(call, config: dict) -> None:
    """Reference backend of ``append_paged_kv``."""
    append(call)
