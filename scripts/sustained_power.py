"""Sustained-load throughput, SM clock and power of attention kernels (GPU machine only).

Under sustained load the H200 runs at its power limit, and the clock it can hold depends on the
energy each kernel spends per cycle. Two kernels that take the same number of cycles cold can
then differ in speed. This runs each implementation back to back for a few seconds (CUDA-graph
replays, after a second of warm-up) while ``nvidia-smi`` samples the SM clock and the board
power every 50 ms, and prints per implementation:

  TFLOP/s, median MHz and W, TFLOP/s per GHz (work per cycle) and TFLOP per kJ (work per
  energy; at the power limit the throughput is this times the power)

  python scripts/sustained_power.py                 # every case, 3 s each
  KPT_POWER_SECONDS=5 KPT_POWER_CASES=D64c_bwd python scripts/sustained_power.py

Cases are forward (``fwd``) or forward + backward (``bwd``: counted as 3.5x the forward's FLOPs),
kpt's dispatched ``flash_attention`` against torch's SDPA with the cuDNN backend. The window
case (causal, 1024 keys to the left) has no cuDNN counterpart: kpt alone, its FLOPs counted
over the visible keys.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WINDOW = 1024
CASES = [  # label, B, H, S, D, mask (False, True: causal, "window": causal + WINDOW), direction
    ("B4S4096", 4, 32, 4096, 128, False, "fwd"),
    ("B4S4096c", 4, 32, 4096, 128, True, "fwd"),
    ("B4win", 4, 32, 4096, 128, "window", "fwd"),
    ("D64", 8, 16, 2048, 64, False, "fwd"),
    ("D64c", 8, 16, 2048, 64, True, "fwd"),
    ("B4S4096_bwd", 4, 32, 4096, 128, False, "bwd"),
    ("D64c_bwd", 8, 16, 2048, 64, True, "bwd"),
]


def _sampled(run, seconds: float) -> tuple[float, float, float]:
    """(seconds per run() call, median MHz, median W) over `seconds` of back-to-back calls."""
    import torch

    from bench.conftest import warm_up

    warm_up(run, 1000.0)  # the power average, and with it the clock, settles at the limit
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw",
                            "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=subprocess.PIPE, text=True)
    start_event = torch.cuda.Event(enable_timing=True)
    end_event = torch.cuda.Event(enable_timing=True)
    start_event.record()
    calls = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        run()
        calls += 1
        if calls % 4 == 0:
            torch.cuda.synchronize()  # keep the host at most a few replays ahead
    end_event.record()
    end_event.synchronize()
    smi.terminate()
    out, _ = smi.communicate()
    samples = [line.split(",") for line in out.splitlines() if line.count(",") == 1]
    mhz = statistics.median(float(a) for a, _ in samples)
    watts = statistics.median(float(b) for _, b in samples)
    return start_event.elapsed_time(end_event) / 1e3 / calls, mhz, watts


def _measure(label: str, b: int, h: int, s: int, d: int, mask: bool | str, direction: str,
             seconds: float) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kpt.ops import flash_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    grad = direction == "bwd"
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                     for _ in range(4))
    qt, kt, vt, doutt = (t.transpose(1, 2).contiguous() for t in (q, k, v, dout))
    for t in (q, k, v, qt, kt, vt):
        t.requires_grad_(grad)

    causal = bool(mask)
    window = (WINDOW, 0) if mask == "window" else (-1, -1)

    def kpt_call():
        out = flash_attention(q, k, v, causal=causal, window=window)
        if grad:
            torch.autograd.grad(out, (q, k, v), dout)

    def cudnn_call():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        if grad:
            torch.autograd.grad(out, (qt, kt, vt), doutt)

    # (query, key) pairs: all, half of them when causal (the benchmarks' convention), or those
    # in the band of WINDOW + 1 diagonals (as bench/bench_flash_attention.py counts a window).
    pairs = s * s * (0.5 if causal else 1.0)
    if mask == "window":
        pairs = sum(min(i + 1, WINDOW + 1) for i in range(s))
    flops = 4 * b * h * pairs * d * (3.5 if grad else 1.0)
    impls = (("kpt", kpt_call),) if mask == "window" else (("kpt", kpt_call), ("cudnn", cudnn_call))
    for name, fn in impls:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(4):
                fn()
        per_replay, mhz, watts = _sampled(graph.replay, seconds)
        tflops = flops * 4 / per_replay / 1e12
        print(f"{label:<12} {name:<6} {tflops:8.0f} {mhz:6.0f} {watts:6.0f} "
              f"{tflops / mhz * 1e3:8.0f} {tflops / watts * 1e3:7.0f}", flush=True)
        del graph
    torch.cuda.empty_cache()


def main() -> None:
    seconds = float(os.environ.get("KPT_POWER_SECONDS", "3"))
    only = [c for c in os.environ.get("KPT_POWER_CASES", "").split(",") if c]
    print(f"{'case':<12} {'impl':<6} {'TFLOP/s':>8} {'MHz':>6} {'W':>6} {'per GHz':>8} "
          f"{'per kJ':>7}", flush=True)
    for case in CASES:
        if not only or case[0] in only:
            _measure(*case, seconds)


if __name__ == "__main__":
    main()
