"""fused_moe on the two prefill shapes of bench/bench_moe.py: the time of each kernel launch of
the triton and cuda backends (torch.profiler), then the Triton backend's configs (its own list
and a grid of tiles around it) timed end to end, fastest first.

Run on a GPU: ``python scripts/moe_profile.py``.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch.profiler import ProfilerActivity, profile

from kpt.ops import fused_moe, moe_route
from kpt.ops.moe import FusedCall, problem_of
from kpt.ops.moe import _triton as T

CASES = [(4096, 128, 8, 2048, 768), (4096, 8, 2, 4096, 14336)]  # (T, E, top_k, H, I)
GEMM1 = [(64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
         (128, 256, 64, 8, 3), (64, 64, 128, 4, 4), (128, 128, 128, 8, 3), (64, 128, 64, 8, 5)]
GEMM2 = [(128, 64, 4, 4), (256, 64, 8, 3), (128, 128, 8, 3), (256, 128, 8, 3), (128, 64, 8, 4)]


def operands(t: int, e: int, k: int, h: int, i: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(t, h, device="cuda", generator=gen).bfloat16()
    w13 = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) / math.sqrt(h)).bfloat16()
    w2 = (torch.randn(e, h, i, device="cuda", generator=gen) / math.sqrt(i)).bfloat16()
    logits = torch.randn(t, e, device="cuda", generator=gen)
    weights, ids = moe_route(logits, k, backend="reference")
    return x, w13, w2, weights, ids


def event_us(fn, calls: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1000


def kernels(fn, calls: int = 5) -> list[tuple[float, int, str]]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.device_time_total / calls, e.count // calls, e.key) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, reverse=True)[:8]


def main() -> None:
    for case in CASES:
        x, w13, w2, weights, ids = operands(*case)
        for backend in ("triton", "cuda"):
            print(f"== {case} {backend}")
            run = functools.partial(fused_moe, x, w13, w2, weights, ids, backend=backend)
            for us, count, name in kernels(run):
                print(f"   {us:9.1f} us x{count}  {name[:90]}")
        call = FusedCall(x, w13, w2, weights, ids, "silu", "none", None, None, None, None, 0, 0,
                         None, torch.empty_like(x))
        configs = T.configs(problem_of(call))
        configs += [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s,
                         BLOCK_N2=bn2, BLOCK_K2=bk2, num_warps2=w2_, num_stages2=s2, GROUP_M=8,
                         PARTIAL_FP32=False)
                    for (bm, bn, bk, w, s), (bn2, bk2, w2_, s2) in itertools.product(GEMM1, GEMM2)]
        timed = []
        for config in configs:
            try:
                timed.append((event_us(functools.partial(T.run, call, config)), config, ""))
            except Exception as err:  # a config this GPU cannot compile (shared memory)
                timed.append((math.inf, config, type(err).__name__))
        timed.sort(key=lambda r: r[0])
        default = next(us for us, config, _ in timed if config == configs[0])
        print(f"== sweep {case}: default {default:.1f} us")
        for us, config, err in timed[:8]:
            print(f"   {us:9.1f}  {config} {err}")
        print("   failed:", sum(1 for _, _, err in timed if err))


if __name__ == "__main__":
    main()
