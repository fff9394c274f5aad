"""paged_attention decode (CUDA backend): kernel time at several values of the split model's
``SATURATING_CTAS_PER_SM`` (how many CTAs per SM the KV-split heuristic assumes keep HBM busy),
against SDPA on the same keys stored contiguously, for batches that about fill the GPU once.

Run on a GPU: ``python scripts/paged_splits.py``. One line per shape: SDPA's µs, then each
setting's (rows per CTA, splits) and µs (CUDA-graph replay of 50 calls).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kpt.ops import paged_attention
from kpt.ops.paged_attention import SPEC
from kpt.ops.paged_attention import _cuda as C

SHAPES = [(16, 2048), (64, 2048), (1, 2048), (16, 16384)]  # (batch, context)
HQ, HKV, D, PAGE = 32, 8, 128, 16


def graph_us(fn, calls: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1000


def main() -> None:
    default = C.SATURATING_CTAS_PER_SM
    for batch, ctx in SHAPES:
        pages = batch * ctx // PAGE
        k_cache = torch.randn(pages, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(pages, device="cuda", dtype=torch.int32).view(batch, -1)
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
        k, v = (c[table.long()].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
                for c in (k_cache, v_cache))
        sdpa = graph_us(functools.partial(F.scaled_dot_product_attention, q[:, :, None], k, v,
                                          enable_gqa=True))
        row = [f"B{batch} ctx{ctx}: sdpa {sdpa:.1f}"]
        for saturating in (2, 4, 8, 16):
            C.SATURATING_CTAS_PER_SM = saturating
            C.plan_launch.cache_clear()
            SPEC.clear_cache()
            launch = C.plan_launch(batch, 1, HQ, HKV, ctx, D, 2, C._sm_count(0), 0, 0, 1.0)
            us = graph_us(functools.partial(paged_attention, q, k_cache, v_cache, table, lens,
                                            backend="cuda"))
            row.append(f"saturating {saturating} {launch}: {us:.1f}")
        C.SATURATING_CTAS_PER_SM = default
        C.plan_launch.cache_clear()
        SPEC.clear_cache()
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
