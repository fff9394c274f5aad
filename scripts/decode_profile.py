"""Where a decode step's time goes, HF's sdpa against kpt's patch: eager steps over a
DynamicCache of the end-to-end benchmark's Llama-3-8B shape (bench/bench_e2e_hf.py), per batch
size: the wall time of a step (synchronised, median of a few), the GPU time of its kernels
(torch.profiler), and the top kernels of each variant. A step whose
wall time exceeds its GPU time is host-bound: that difference is the launch path's.

Run on a GPU: ``python scripts/decode_profile.py [batch ...]`` (default 1 16);
``KPT_PROFILE_LAYERS`` (default 8) layers, ``KPT_E2E_CONTEXT`` the prompt length.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_e2e_hf import SHAPES, Decoder, build_model, decode_inputs, patched

STEPS = 8


def wall_ms(decoder: Decoder, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        decoder.reset()
        torch.cuda.synchronize()
        start = time.perf_counter()
        decoder.run(STEPS)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / STEPS)
    return statistics.median(times)


def profiled(decoder: Decoder) -> tuple[float, list[tuple[float, int, str]]]:
    """(GPU ms per step, top kernels by time: (us per step, launches per step, name))."""
    decoder.reset()
    decoder.run(2)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decoder.run(STEPS)
        torch.cuda.synchronize()
    kernel = torch.autograd.DeviceType.CUDA  # kernel, memcpy and memset events, not ops
    rows = [(e.self_device_time_total / STEPS, e.count // STEPS, e.key)
            for e in prof.key_averages()
            if e.device_type == kernel and e.self_device_time_total > 0]
    gpu_ms = sum(r[0] for r in rows) / 1e3
    return gpu_ms, sorted(rows, reverse=True)[:14]


def main(batches: list[int]) -> None:
    layers = int(os.environ.get("KPT_PROFILE_LAYERS", "8"))
    model = build_model(SHAPES["8b"], layers)
    print(f"8b shape, {layers} layers, {torch.cuda.get_device_name()}")
    for batch in batches:
        prompt, first = decode_inputs(model.config.vocab_size, batch, model.device)
        for variant in ("hf_sdpa", "kpt"):
            with patched(model, variant):
                decoder = Decoder(model, prompt, first, STEPS, static=False)
                wall = wall_ms(decoder)
                gpu, top = profiled(decoder)
                print(f"\n== dynamic b{batch} {variant}: wall {wall:.2f} ms/step, kernels "
                      f"{gpu:.2f} ms/step")
                for us, calls, name in top:
                    print(f"  {us:9.1f} us  x{calls:<4d} {name[:90]}")
                del decoder


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]] or [1, 16])
