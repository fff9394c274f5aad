"""Interleaved A/B of the sm90 forward variants on one GPU (GPU machine only).

Rows of one kernel measured minutes apart in the benchmark differ by up to ~10% on the H200
(its clock moves with power and temperature), so this times the named variants alternately,
three rounds each in A B B A A B order, in one process, and prints the medians per case:

  python scripts/forward_variants_ab.py overlap persistent dynamic cudnn

``triton`` is kpt's Triton forward (its first config); ``cudnn`` is torch's SDPA with the
cuDNN backend on (B, H, S, D) copies of the same inputs (cases without a window or soft cap);
``KPT_AB_CASES=B4S4096,B8S2048D64c`` limits the cases.
"""
from __future__ import annotations

import functools
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # kpt and bench from this checkout

CASES = [  # label, B, H, S, D, causal, window_left, softcap
    ("B4S4096", 4, 32, 4096, 128, False, -1, 0.0),
    ("B4S4096c", 4, 32, 4096, 128, True, -1, 0.0),
    ("B4win1024", 4, 32, 4096, 128, True, 1024, 0.0),
    ("B4S4096soft", 4, 32, 4096, 128, False, -1, 30.0),
    ("B1S16384", 1, 32, 16384, 128, False, -1, 0.0),
    ("B1S16384c", 1, 32, 16384, 128, True, -1, 0.0),
    ("B8S2048", 8, 32, 2048, 128, False, -1, 0.0),
    ("B2S8192win", 2, 32, 8192, 128, True, 1024, 0.0),
    ("B8S2048D64", 8, 16, 2048, 64, False, -1, 0.0),
    ("B8S2048D64c", 8, 16, 2048, 64, True, -1, 0.0),
]


def main() -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.conftest import graph_time_us
    from kpt.ops.flash_attention import Call, _sm90, _triton, problem_of

    variants = sys.argv[1:] or ["overlap", "persistent"]
    only = [c for c in os.environ.get("KPT_AB_CASES", "").split(",") if c]
    for label, b, h, s, d, causal, left, softcap in CASES:
        if only and label not in only:
            continue
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        out = torch.empty_like(q)
        lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        call = Call(q, k, v, None, None, s, s, d ** -0.5, left, 0 if causal else -1, softcap,
                    out, lse)
        # Visible (query, key) pairs: query i sees min(i + 1, left + 1) keys when causal.
        pairs = (sum(min(i + 1, left + 1) if left >= 0 else i + 1 for i in range(s))
                 if causal else s * s)
        flops = 4 * b * h * pairs * d
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))

        def cudnn(qt=qt, kt=kt, vt=vt, causal=causal):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt,
                                                                        is_causal=causal)

        triton_config = _triton.configs(problem_of(call))[0]
        names = [n for n in variants if n != "cudnn" or (left < 0 and softcap == 0.0)]
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(3):
            for name in names if rep % 2 == 0 else names[::-1]:
                if name == "cudnn":
                    fn = cudnn
                elif name == "triton":
                    fn = functools.partial(_triton.run, call, triton_config)
                else:
                    fn = functools.partial(_sm90.run, call, {"impl": "sm90", "variant": name})
                times[name].append(graph_time_us([fn], calls=5, replays=5))
        row = "  ".join(f"{name} {statistics.median(t):7.0f} us "
                        f"{flops / statistics.median(t) / 1e6:4.0f} TFLOP/s"
                        for name, t in times.items())
        print(f"{label:<12} {row}", flush=True)
        del q, k, v, out, lse, call, qt, kt, vt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
