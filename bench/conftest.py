"""Shared benchmark machinery: kernel time by CUDA-graph replay, and a summary table at the end.

pytest-benchmark times each case's eager call (per-call latency as a user sees it, synchronised).
Each case also records ``kernel_us``: the same call captured many times into one CUDA graph and
replayed, so launch overhead drops out. Inputs rotate among several copies when one copy would
fit in L2 (50 MB weights vs 60 MB of L2 on an H200), so repeated calls do not time the cache.

Every measurement is taken under sustained load, at the clock the GPU's power limit allows:

* **Warm-up.** Before it is timed, the call runs back to back for ``KPT_BENCH_WARMUP_MS``
  milliseconds (default 1000). The H200 holds its 690 W limit against a power reading averaged
  over about a second. After a pause (a test's set-up, a graph capture, a lighter kernel before)
  that average is low, and the clock stays at 1980 MHz for up to a second of full load before
  it drops to the 1550-1700 MHz that heavy attention kernels sustain (sampled every 20 ms with
  ``nvidia-smi``, 2026-11-24). A shorter warm-up times part of that ramp, so the result depends
  on what ran before it: with 300 ms, one kernel measured 5-12% apart in two processes.
* **Timed windows.** The clock then still moves by ~5% every few tens of milliseconds. Each of
  the ``replays`` timed windows runs the graph back to back for at least
  ``KPT_BENCH_WINDOW_MS`` (default 100 ms), and the median window is reported.
* **Clock.** The SM clock is read through NVML in each window (``mhz``; absent where NVML is
  not). Throughput per GHz is the work per cycle, which the power limit does not move.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch

RESULTS: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
WARMUP_MS = float(os.environ.get("KPT_BENCH_WARMUP_MS", "1000"))
WINDOW_MS = float(os.environ.get("KPT_BENCH_WINDOW_MS", "100"))
# A window never queues more launches than this (the host enqueues a window before waiting).
_MAX_PER_WINDOW = 1000


class Timing(NamedTuple):
    us: float  # per call, the median window
    mhz: float | None  # mean SM clock read in the timed windows; None without NVML

    def clock(self, tflops: float) -> dict[str, float]:
        """The summary's clock columns for a row of ``tflops``: ``mhz`` and ``per_ghz`` (work
        per cycle); none without NVML."""
        if self.mhz is None:
            return {}
        return {"mhz": self.mhz, "per_ghz": tflops / self.mhz * 1e3}


def warm_up(run: Callable[[], Any], warmup_ms: float) -> float:
    """Runs ``run`` back to back until ``warmup_ms`` of wall time have passed, synchronising
    about every 20 ms (so the GPU does not idle between calls and the host stays close).
    Returns the seconds per call of the last batch (of a single synchronised call when
    ``warmup_ms`` is 0)."""
    deadline = time.perf_counter() + warmup_ms / 1e3
    batch, per_call = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(batch):
            run()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        per_call = elapsed / batch
        if time.perf_counter() >= deadline:
            return per_call
        if elapsed < 0.02:
            batch = min(batch * 2, _MAX_PER_WINDOW)


class _Nvml:
    """The SM clock of a CUDA device through NVML (the driver's libnvidia-ml), or None."""

    def __init__(self) -> None:
        self.lib: Any = None
        self.handles: dict[int, Any] = {}
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() == 0:
                self.lib = lib
        except OSError:
            pass

    def _handle(self, index: int) -> Any:
        if index not in self.handles:
            props = torch.cuda.get_device_properties(index)
            bus = (f"{getattr(props, 'pci_domain_id', 0):08X}:{props.pci_bus_id:02X}:"
                   f"{props.pci_device_id:02X}.0")
            handle = ctypes.c_void_p()
            ok = self.lib.nvmlDeviceGetHandleByPciBusId_v2(bus.encode(), ctypes.byref(handle))
            self.handles[index] = handle if ok == 0 else None
        return self.handles[index]

    def sm_mhz(self) -> float | None:
        if self.lib is None:
            return None
        try:
            handle = self._handle(torch.cuda.current_device())
        except (AttributeError, RuntimeError):
            return None
        mhz = ctypes.c_uint()
        if handle is None or self.lib.nvmlDeviceGetClockInfo(handle, 1, ctypes.byref(mhz)):
            return None  # 1: NVML_CLOCK_SM
        return float(mhz.value)


_NVML: _Nvml | None = None


def sm_mhz() -> float | None:
    """The current SM clock of the current CUDA device in MHz, or None without NVML."""
    global _NVML
    if _NVML is None:
        _NVML = _Nvml()
    return _NVML.sm_mhz()


def _timed_windows(run: Callable[[], Any], per_call_s: float, launches: int, windows: int,
                   window_ms: float, min_launches: int = 1) -> Timing:
    """Median seconds of one ``run`` over ``windows`` back-to-back windows of at least
    ``window_ms`` (and ``min_launches`` calls), divided by ``launches``; and the mean clock
    read while each window runs (after the host has queued it)."""
    per_window = max(min_launches, math.ceil(window_ms / 1e3 / max(per_call_s, 1e-7)))
    per_window = min(per_window, max(min_launches, _MAX_PER_WINDOW))
    times, clocks = [], []
    for _ in range(windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_window):
            run()
        end.record()
        mhz = sm_mhz()
        end.synchronize()
        if mhz is not None:
            clocks.append(mhz)
        times.append(start.elapsed_time(end) * 1e3 / (per_window * launches))
    return Timing(statistics.median(times), statistics.fmean(clocks) if clocks else None)


def graph_timing(fns: list[Callable[[], Any]], calls: int = 24, replays: int = 10,
                 warmup_ms: float | None = None, window_ms: float | None = None) -> Timing:
    """Per-call time of ``calls`` launches (cycling through ``fns``) captured in one CUDA graph:
    after replaying it for ``warmup_ms`` (default ``WARMUP_MS``), the median of ``replays``
    windows that each replay it back to back for ``window_ms`` (default ``WINDOW_MS``; 0 for
    one replay per window)."""
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
    per_replay = warm_up(graph.replay, WARMUP_MS if warmup_ms is None else warmup_ms)
    return _timed_windows(graph.replay, per_replay, calls, replays,
                          WINDOW_MS if window_ms is None else window_ms)


def graph_time_us(fns: list[Callable[[], Any]], calls: int = 24, replays: int = 10,
                  warmup_ms: float | None = None, window_ms: float | None = None) -> float:
    """``graph_timing(...).us``."""
    return graph_timing(fns, calls, replays, warmup_ms, window_ms).us


def event_timing(fns: list[Callable[[], Any]], calls: int = 50, replays: int = 3,
                 warmup_ms: float | None = None, window_ms: float | None = None) -> Timing:
    """Per-call time of back-to-back launches between two events (for code graphs cannot
    take): after running them for ``warmup_ms`` (default ``WARMUP_MS``), the median of
    ``replays`` windows of at least ``calls`` calls and ``window_ms`` (default ``WINDOW_MS``)."""

    def each() -> None:
        for fn in fns:
            fn()

    per_round = warm_up(each, WARMUP_MS if warmup_ms is None else warmup_ms)
    rounds = max(1, math.ceil(calls / len(fns)))
    return _timed_windows(each, per_round, len(fns), replays,
                          WINDOW_MS if window_ms is None else window_ms, min_launches=rounds)


def event_time_us(fns: list[Callable[[], Any]], calls: int = 50,
                  warmup_ms: float | None = None) -> float:
    """``event_timing(...).us``."""
    return event_timing(fns, calls, warmup_ms=warmup_ms).us


def kernel_timing(fns: Callable[[], Any] | list[Callable[[], Any]], calls: int = 8) -> Timing:
    """CUDA-graph replay of ``calls`` calls cycling through ``fns`` (one callable or a list);
    back-to-back events where the calls cannot be captured (their host time then hides behind
    the kernels only when shorter than they are)."""
    fns = fns if isinstance(fns, list) else [fns]
    try:
        return graph_timing(fns, calls=calls, replays=3)
    except RuntimeError:
        torch.cuda.synchronize()
        return event_timing(fns, calls=calls)


COPY_BYTES = 1 << 30


@functools.cache
def copy_gbps() -> float:
    """Device-to-device copy bandwidth, GB/s of bytes read + written, of a 1 GiB buffer: the
    yardstick of the bandwidth-bound benchmarks (floors = bytes / this)."""
    src = torch.randint(-128, 127, (COPY_BYTES,), dtype=torch.int8, device="cuda")
    dst = torch.empty_like(src)
    us = kernel_timing(functools.partial(dst.copy_, src), calls=4).us
    del src, dst  # give the 2 GiB back before the benchmark's own tensors take their share
    torch.cuda.empty_cache()
    return 2 * COPY_BYTES / (us * 1e-6) / 1e9


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
