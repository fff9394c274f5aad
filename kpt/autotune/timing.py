"""Timing one candidate: GPU events on CUDA/ROCm, any clock on a host-synchronous device.

A timer is any callable ``timer(fn, warmup_ms, rep_ms) -> Timing``; the tuner takes one as an
argument, which is how CPU tests drive it with a fake clock.

Inputs are not rotated between repetitions; the L2 cache is flushed before each one instead
(as ``triton.testing.do_bench`` does). Each repetition then reads its weights from HBM, the
regime of an LLM layer whose weights are read once per step and far exceed L2, while still
measuring one fixed set of buffers (rotation would multiply the memory a large shape needs).

On GPUs the candidate is captured once in a CUDA graph and the graph is replayed. Launching a
small op eagerly can take the host longer than the GPU takes to run it; the GPU then idles
inside the timed window and the time measures Python, not the kernel (seen on an H100: 50-80 %
spread, and 2x gains hidden in the noise). A replay costs the host a few microseconds, less
than the L2 flush before it takes the GPU, so the host stays ahead and events time only the
kernels, as they run under CUDA graphs in serving. A candidate that cannot be captured is
timed eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

MIN_REPS = 5
MAX_REPS = 10_000
_FLUSH_BYTES = 256 * 2**20  # larger than the L2 of any current GPU (H200: 60 MiB, MI300X: 4 MiB)


@dataclass(frozen=True)
class Timing:
    """Summary of the samples: median and relative spread ``(p80 - p20) / median``."""

    median_us: float
    spread: float
    samples: int


class Timer(Protocol):
    def __call__(self, fn: Callable[[], None], warmup_ms: float, rep_ms: float) -> Timing: ...


def _quantile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples_us: Sequence[float]) -> Timing:
    """Median and spread of per-run times in microseconds."""
    if not samples_us:
        raise ValueError("no timing samples")
    ordered = sorted(samples_us)
    median = _quantile(ordered, 0.5)
    spread = (_quantile(ordered, 0.8) - _quantile(ordered, 0.2)) / median if median > 0 else 0.0
    return Timing(median, spread, len(ordered))


def _reps(budget_ms: float, estimate_ms: float, least: int) -> int:
    return max(least, min(MAX_REPS, int(budget_ms / max(estimate_ms, 1e-6))))


class ClockTimer:
    """Times ``fn`` with a host clock around each call; for devices whose work is synchronous
    with the host (CPU), or any device given a ``synchronize``. Tests pass a fake ``clock``."""

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        synchronize: Callable[[], None] = lambda: None,
    ) -> None:
        self.clock = clock
        self.synchronize = synchronize

    def _once(self, fn: Callable[[], None]) -> float:
        start = self.clock()
        fn()
        self.synchronize()
        return (self.clock() - start) * 1e6

    def __call__(self, fn: Callable[[], None], warmup_ms: float, rep_ms: float) -> Timing:
        estimate_ms = self._once(fn) / 1e3  # the first call also pays one-time costs
        for _ in range(_reps(warmup_ms, estimate_ms, 1)):
            fn()
        self.synchronize()
        return summarize([self._once(fn) for _ in range(_reps(rep_ms, estimate_ms, MIN_REPS))])


class CudaTimer:
    """GPU time of ``fn`` from CUDA/HIP events on the current stream, L2 flushed before each
    run: ``triton.testing.do_bench`` when Triton is installed (the yardstick Triton kernels
    are usually quoted in), else the same procedure here."""

    def __init__(self, device: object = None) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], None], warmup_ms: float, rep_ms: float) -> Timing:
        import torch

        with torch.cuda.device(self.device):
            graph = _capture(fn)
            run = fn if graph is None else graph.replay
            try:
                from triton.testing import do_bench

                times_ms = do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="all")
            except (ImportError, AssertionError):  # no Triton, or one without "all"
                times_ms = _event_times(run, warmup_ms, rep_ms)
            del graph
        return summarize([t * 1e3 for t in times_ms])


def _capture(fn: Callable[[], None]) -> object | None:
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream, as capture needs), or
    None when it cannot be captured (host synchronisation, unsupported calls)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # lazy initialisation and allocations happen outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly instead
        torch.cuda.synchronize()
        return None
    return graph


def _event_times(fn: Callable[[], None], warmup_ms: float, rep_ms: float) -> list[float]:
    import torch

    fn()
    torch.cuda.synchronize()
    flush = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def timed(runs: int) -> tuple[list, list]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for start, end in zip(starts, ends, strict=True):
            flush.zero_()
            start.record()
            fn()
            end.record()
        return starts, ends

    # The estimate includes the flush, so the budget bounds the wall time of the whole loop.
    begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    timed(5)
    finish.record()
    torch.cuda.synchronize()
    estimate_ms = begin.elapsed_time(finish) / 5
    for _ in range(_reps(warmup_ms, estimate_ms, 1)):
        fn()
    starts, ends = timed(_reps(rep_ms, estimate_ms, MIN_REPS))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
