"""Where paged_attention's chunked prefill through the gather path spends its time, on the
benchmark's shape (bench/bench_paged_attention.py: 4 sequences of 2048 new tokens over 8192
cached, 32/8 heads, D 128, bf16, 16-token shuffled pages): the page copy alone, then
flash_attention's varlen forward on the copy (its dispatch's choice, and each backend named),
against the same keys as a dense (B, S, H, D) batch. Wall time per call over 10 synchronised
calls (the GPU is busy for milliseconds, so the host's share is small).

Run on a GPU: ``python scripts/paged_prefill_parts.py``.
"""

from __future__ import annotations

import time

import torch

from kpt.ops import flash_attention
from kpt.ops.paged_attention import Call, _triton

SEQS, NEW, CACHED, HEADS, HEADS_KV, D, PAGE = 4, 2048, 8192, 32, 8, 128, 16


def per_call_us(fn, calls: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ctx = NEW + CACHED
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(SEQS * NEW, HEADS, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    pages = SEQS * ctx // PAGE
    k_cache = torch.randn(pages, PAGE, HEADS_KV, D, device="cuda", dtype=torch.bfloat16,
                          generator=gen)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(pages, device="cuda", generator=gen).int().view(SEQS, ctx // PAGE)
    lens = torch.full((SEQS,), ctx, dtype=torch.int32, device="cuda")
    cu_q = torch.arange(0, SEQS * NEW + 1, NEW, dtype=torch.int32, device="cuda")
    call = Call(q, k_cache, v_cache, table, lens, cu_q, NEW, D**-0.5, -1, 0, 0.0, None, None,
                "NHD", torch.zeros_like(q), torch.empty(HEADS, SEQS * NEW, device="cuda"))
    print(torch.cuda.get_device_name())
    print(f"page copy (gather)            {per_call_us(lambda: _triton.gather(call)):9.1f} us")
    k, v, cu_k, max_k = _triton.gather(call)
    varlen = dict(causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=NEW,
                  max_seqlen_k=max_k)
    for backend in (None, "cuda", "triton"):
        us = per_call_us(lambda b=backend: flash_attention(q, k, v, backend=b, **varlen))
        print(f"flash varlen, {backend or 'dispatch':14s}  {us:9.1f} us")
    dense_k = k[: SEQS * ctx].view(SEQS, ctx, HEADS_KV, D)
    dense_v = v[: SEQS * ctx].view(SEQS, ctx, HEADS_KV, D)
    dense_q = q.view(SEQS, NEW, HEADS, D)
    us = per_call_us(lambda: flash_attention(dense_q, dense_k, dense_v, causal=True))
    print(f"flash dense (B, S, H, D)      {us:9.1f} us")


if __name__ == "__main__":
    main()
