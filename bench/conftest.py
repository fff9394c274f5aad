"""Shared benchmark machinery: kernel time by CUDA-graph replay, and a summary table at the end.

pytest-benchmark times each case's eager call (per-call latency as a user sees it, synchronised).
Each case also records ``kernel_us``: the same call captured many times into one CUDA graph and
replayed, so launch overhead drops out. Inputs rotate among several copies when one copy would
fit in L2 (50 MB weights vs 60 MB of L2 on an H200), so repeated calls do not time the cache.

Before it is timed, each measurement runs for at least ``KPT_BENCH_WARMUP_MS`` milliseconds
(default 300). A GPU that has just been idle (pytest and the eager latency rounds leave gaps)
starts at a clock that sustained load does not keep: on the H200 kpt's B1 H32 S16384 attention
forward measured 755 TFLOP/s in single launches after a second of idle, 649 in 30-launch
graphs replayed back to back. Without the warm-up a short measurement's result depends on
how long the GPU idled before it, which differs between implementations and runs.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import torch

RESULTS: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
WARMUP_MS = float(os.environ.get("KPT_BENCH_WARMUP_MS", "300"))


def warm_up(run: Callable[[], Any], warmup_ms: float) -> None:
    """Runs ``run`` (synchronised) until ``warmup_ms`` of wall time have passed."""
    deadline = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < deadline:
        run()
        torch.cuda.synchronize()


def graph_time_us(fns: list[Callable[[], Any]], calls: int = 24, replays: int = 10,
                  warmup_ms: float | None = None) -> float:
    """Median per-call time of ``calls`` launches (cycling through ``fns``) replayed as a graph,
    after replaying it for ``warmup_ms`` (default ``WARMUP_MS``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    warm_up(graph.replay, WARMUP_MS if warmup_ms is None else warmup_ms)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def event_time_us(fns: list[Callable[[], Any]], calls: int = 50,
                  warmup_ms: float | None = None) -> float:
    """Per-call time of back-to-back launches between two events (for code graphs cannot take),
    after running them for ``warmup_ms`` (default ``WARMUP_MS``)."""

    def each() -> None:
        for fn in fns:
            fn()

    each()
    torch.cuda.synchronize()
    warm_up(each, WARMUP_MS if warmup_ms is None else warmup_ms)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        fns[i % len(fns)]()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def record(case: str, impl: str, **numbers: float) -> None:
    RESULTS[case][impl] = numbers


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not RESULTS:
        return
    lines = ["", "kpt benchmark summary (us; kernel = CUDA-graph replay per call, "
             "latency = eager call incl. launch; ratio = kernel / baseline kernel)"]
    for case, impls in RESULTS.items():
        base_name = os.environ.get("KPT_BENCH_BASELINE", "cublas_gemm_alone")
        base = impls.get(base_name, {}).get("kernel_us")
        lines.append(f"{case}")
        for impl, nums in sorted(impls.items(), key=lambda kv: kv[1].get("kernel_us", 1e18)):
            kernel, latency = nums.get("kernel_us"), nums.get("latency_us")
            ratio = f"{kernel / base:6.2f}x" if base and kernel else "      "
            kernel_s = f"{kernel:9.1f}" if kernel else "        -"
            latency_s = f"{latency:9.1f}" if latency else "        -"
            extra = "".join(f"  {k} {v:.1f}" for k, v in nums.items()
                            if k not in ("kernel_us", "latency_us"))
            lines.append(f"  {impl:<22} kernel {kernel_s}  latency {latency_s}  {ratio}{extra}")
    terminalreporter.write_line("\n".join(lines))


@pytest.fixture
def cuda_only():
    if not torch.cuda.is_available():
        pytest.skip("benchmarks time CUDA kernels: no CUDA device")
