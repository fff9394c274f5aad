"""Where cascade_attention's time goes on its benchmark shape (bench/bench_cascade_attention.py:
64 decode requests sharing a 16384-token prefix plus 256 tokens each, Llama-3-8B attention).

Kernel times by CUDA-graph replay (best of 5 windows of 50 replays):

* the shared level alone through the Triton paged kernel, with its default tiles and with the
  configs compared when the wide-tile rule was chosen (``_triton.run``'s config keys);
* the per-request level alone (plain decode);
* ``cascade_attention`` with its levels in sequence and overlapped on two streams
  (``OVERLAP_LEVELS``), for dispatch's choice and for the Triton backend named;

then the eager time per call (back-to-back calls, synchronised at the end). GPU machine only:

  python scripts/cascade_levels.py
"""
from __future__ import annotations

import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# default (wide tiles), the 64-row tiles at 4 warps that preceded them (split 8 ways, as
# num_splits cuts their 32 programs on 132 SMs), and wide tiles split twice as finely (16, as
# num_splits would cut theirs)
LEVEL0_CONFIGS = [{}, {"BLOCK_M": 64, "num_warps": 4, "SPLITS": 8},
                  {"BLOCK_M": 128, "num_warps": 8, "SPLITS": 16}]


def graph_us(fn) -> tuple[float, object]:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 50 * 1000)
    return best, out


def eager_us(fn, calls: int = 100) -> float:
    import torch

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    import torch

    import kpt.ops.cascade_attention as cascade_module
    from bench.bench_cascade_attention import _inputs
    from kpt.ops import cascade_attention, paged_attention
    from kpt.ops.paged_attention import Call, _triton

    if not torch.cuda.is_available():
        sys.exit("cascade_levels: needs a CUDA GPU")
    q, k_cache, v_cache, levels, flat, totals = _inputs()
    (table0, lens0, indptr0), (table1, lens1, _) = levels
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")

    def level0(config):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], device=q.device)
        _triton.run(Call(q, k_cache, v_cache, table0, lens0, indptr0, q.shape[0],
                         q.shape[-1] ** -0.5, -1, -1, 0.0, None, None, "NHD", out, lse), config)
        return out

    for config in LEVEL0_CONFIGS:
        print(f"shared level alone, config {config or 'default'}: "
              f"{graph_us(lambda config=config: level0(config))[0]:.1f} us")
    per_request = lambda: paged_attention(q, k_cache, v_cache, table1, lens1,  # noqa: E731
                                          return_lse=True, backend="triton")
    print(f"per-request level alone (triton): {graph_us(per_request)[0]:.1f} us")
    want = paged_attention(q, k_cache, v_cache, flat, totals, backend="triton").float()
    for backend in (None, "triton"):
        for overlap in (False, True):
            cascade_module.OVERLAP_LEVELS = overlap
            fn = lambda backend=backend: cascade_attention(  # noqa: E731
                q, k_cache, v_cache, levels, backend=backend)
            us, out = graph_us(fn)
            diff = (out.float() - want).abs().max().item()
            print(f"cascade_attention backend={backend or 'auto'} overlap={overlap}: "
                  f"{us:.1f} us, eager {eager_us(fn):.1f} us per call, max |diff| against the "
                  f"naive batch {diff:.3g}")
    cascade_module.OVERLAP_LEVELS = True


if __name__ == "__main__":
    main()
