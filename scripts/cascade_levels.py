"""Where cascade_attention's time goes on its benchmark shape (bench/bench_cascade_attention.py:
64 decode requests sharing a 16384-token prefix plus 256 tokens each, Llama-3-8B attention).

Kernel times by CUDA-graph replay, the benchmarks' protocol (``bench.conftest.kernel_timing``):

* the shared level alone through the Triton paged kernel, with its default tiles and with the
  configs compared when the wide-tile rule was chosen (``_triton.run``'s config keys);
* the per-request level alone (plain decode);
* ``cascade_attention`` with its levels in sequence and overlapped on two streams
  (``OVERLAP_LEVELS``), for dispatch's choice and for the Triton backend named;

then the eager time per call (``host_latency.per_call_us``: back-to-back calls, host and total).
GPU machine only:

  python scripts/cascade_levels.py
"""
from __future__ import annotations

import importlib
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# default (wide tiles), the 64-row tiles at 4 warps that preceded them (split 8 ways, as
# num_splits cuts their 32 programs on 132 SMs), and wide tiles split twice as finely (16, as
# num_splits would cut theirs)
LEVEL0_CONFIGS = [{}, {"BLOCK_M": 64, "num_warps": 4, "SPLITS": 8},
                  {"BLOCK_M": 128, "num_warps": 8, "SPLITS": 16}]


def main() -> None:
    import torch

    cascade_module = importlib.import_module("kpt.ops.cascade_attention")
    from bench.bench_cascade_attention import _inputs
    from bench.conftest import kernel_timing
    from kpt.ops import cascade_attention, paged_attention
    from kpt.ops.paged_attention import Call, _triton
    from scripts.host_latency import per_call_us

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
              f"{kernel_timing(lambda config=config: level0(config)).us:.1f} us")
    per_request = lambda: paged_attention(q, k_cache, v_cache, table1, lens1,  # noqa: E731
                                          return_lse=True, backend="triton")
    print(f"per-request level alone (triton): {kernel_timing(per_request).us:.1f} us")
    want = paged_attention(q, k_cache, v_cache, flat, totals, backend="triton").float()
    for backend in (None, "triton"):
        for overlap in (False, True):
            cascade_module.OVERLAP_LEVELS = overlap
            fn = lambda backend=backend: cascade_attention(  # noqa: E731
                q, k_cache, v_cache, levels, backend=backend)
            diff = (fn().float() - want).abs().max().item()
            host, total = per_call_us(fn, calls=100)
            print(f"cascade_attention backend={backend or 'auto'} overlap={overlap}: "
                  f"{kernel_timing(fn).us:.1f} us, eager {total:.1f} us per call ({host:.1f} "
                  f"host), max |diff| against the naive batch {diff:.3g}")
    cascade_module.OVERLAP_LEVELS = True


if __name__ == "__main__":
    main()
