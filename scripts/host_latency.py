"""Host time per eager flash_attention call, and of the layers under it (GPU machine only).

Small attention calls are bound by the host: the GPU finishes before the next launch is
issued. This times back-to-back eager calls on tiny to small causal problems and prints the
host time per call (the loop alone) and the total (after a final synchronise), for:

  kpt public     kpt.ops.flash_attention (validation, the eager fast path, dispatch, launch)
  kpt op         torch.ops.kpt.flash_attention (what torch.compile calls: the custom op)
  SPEC.launch    dispatch and launch of a prepared Call
  sm90.run       the sm90 launcher alone (variant "dynamic")
  sdpa flash     torch's SDPA with the FlashAttention-2 backend, on (B, H, S, D) views

  python scripts/host_latency.py
"""
from __future__ import annotations

import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = [(1, 128), (1, 1024), (8, 512)]  # (batch, seqlen); 32 heads, head dim 128, bf16


def _per_call_us(fn, calls: int = 2000) -> tuple[float, float]:
    import torch

    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kpt.ops import flash_attention
    from kpt.ops.flash_attention import SPEC, Call, _sm90, problem_of

    heads, head_dim = 32, 128
    for batch, seqlen in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda",
                               dtype=torch.bfloat16, generator=gen) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        call = Call(q, k, v, None, None, seqlen, seqlen, head_dim ** -0.5, -1, 0, 0.0,
                    torch.empty_like(q), torch.empty(batch, heads, seqlen, device="cuda"))

        def sdpa(qt=qt, kt=kt, vt=vt):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        fns = {
            "kpt public": functools.partial(flash_attention, q, k, v, causal=True),
            "kpt op": functools.partial(torch.ops.kpt.flash_attention, q, k, v, None, None,
                                        seqlen, seqlen, head_dim ** -0.5, -1, 0, 0.0, False,
                                        False, ""),
            "SPEC.launch": lambda call=call: SPEC.launch(problem_of(call), call),
            "sm90.run": functools.partial(_sm90.run, call, {"impl": "sm90",
                                                            "variant": "dynamic"}),
            "sdpa flash": sdpa,
        }
        for name, fn in fns.items():
            host, total = _per_call_us(fn)
            print(f"B{batch} S{seqlen:<5} {name:<12} host {host:6.1f} us/call  "
                  f"total {total:6.1f} us/call", flush=True)


if __name__ == "__main__":
    main()
