"""fp8_gemm: kpt's backends against ``torch._scaled_mm`` (cuBLASLt fp8) and, for decode, against
the weight-read floor.

Rows (float8_e4m3fn operands from ``quantize_fp8`` of random normal data, bf16 output, no bias;
``w`` an (N, K) ``nn.Linear`` weight, so ``_scaled_mm`` gets ``w8.T``, a column-major view):

* per-tensor M=N=K=8192: against ``_scaled_mm`` with per-tensor scales; target >= 1.0x;
* per-row M=N=K=8192 (per token x per output channel): against ``_scaled_mm``'s row-wise
  scaling ((M, 1) and (1, N) scales); target >= 1.0x;
* blockwise M=4096, N=K=8192 (1x128 activations, 128x128 weights, DeepSeek-V3's recipe):
  against per-tensor ``_scaled_mm`` of the same shape (cuBLAS's blockwise path is not in
  every torch build); target >= 0.9x; also at M=256 (prefill chunks; where dispatch's choice
  between the wgmma kernel and Triton is least settled);
* decode M=16, N=K=8192, per-tensor and blockwise: against the floor of reading the weight
  once, weight bytes / the copy bandwidth measured in the same run (bytes read + written per
  second by ``dst.copy_(src)`` of a 1 GiB buffer); target <= 1.2x the floor. ``_scaled_mm``
  per-tensor is timed there too, for reference.

kpt rows: ``kpt_triton`` and ``kpt_cuda`` (csrc/fp8_gemm with its default config: the sm_90a
wgmma kernel above 64 rows on Hopper, mma.sync tiles below) forced by name, ``kpt_auto`` whatever
dispatch picks.

"x base" in the summary is the baseline's time over the row's (higher is faster), "x floor"
the row's time over the floor. Every kpt row is first checked against the reference backend
(float32 GEMM of the dequantised operands). Kernel times: CUDA-graph replay
(``bench/conftest.py``: 1 s of warm-up, then the median of 3 windows of >= 100 ms); the two
decode weights alternate, so the 64 MB weight is not served from L2.

Run: ``pytest bench/bench_fp8_gemm.py`` (needs CUDA and an sm_89+ GPU; skips otherwise).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch

from bench.conftest import copy_gbps, kernel_timing
from kpt.ops import fp8_gemm, quantize_fp8
from kpt.ops._common import compare
from kpt.ops.fp8_gemm import SPEC, W_BLOCK, Call, problem_of

DEVICE = "cuda"
FP8 = torch.float8_e4m3fn
# case: (M, N, K, granularity, target)
CASES = {
    "per-tensor M8192 N8192 K8192": (8192, 8192, 8192, "tensor", "x base >= 1.0"),
    "per-row M8192 N8192 K8192": (8192, 8192, 8192, "row", "x base >= 1.0"),
    "block M4096 N8192 K8192": (4096, 8192, 8192, "block", "x base >= 0.9"),
    "block M256 N8192 K8192": (256, 8192, 8192, "block", "x base >= 0.9"),
    "decode per-tensor M16 N8192 K8192": (16, 8192, 8192, "tensor", "x floor <= 1.2"),
    "decode block M16 N8192 K8192": (16, 8192, 8192, "block", "x floor <= 1.2"),
}
KPT_IMPLS = ["kpt_triton", "kpt_cuda", "kpt_auto"]
# Blockwise and row-wise kpt rows compare with per-tensor or row-wise _scaled_mm (see above).
BASELINE = {"tensor": "tensor", "row": "row", "block": "tensor"}
# The kpt result against the reference: both round one float32 GEMM of the same fp8 values to
# bf16 (one unit 2^-8); float32 summation order adds ~1e-6 at K = 8192.
AGREE = 2**-7


@dataclass
class Row:
    """One timed implementation of a case; ``floor_us``: the weight-read floor (decode)."""

    kernel_us: float
    flops: float
    target: str = ""
    floor_us: float | None = None
    mhz: float | None = None


ROWS: dict[tuple[str, str], Row] = {}


class _Summary:
    """The table printed after conftest's summary (first line: ``kpt benchmark summary``)."""

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not ROWS:
            return
        lines = ["", f"kpt benchmark summary, fp8_gemm (us): copy bandwidth {copy_gbps():.0f} "
                 "GB/s; x base = baseline kernel / kernel; x floor = kernel / weight-read floor",
                 f"  {'case':<36} {'impl':<22} {'kernel':>9} {'TFLOP/s':>8} {'x base':>7} "
                 f"{'x floor':>7}  {'target':<16} {'MHz':>5}"]
        for (case, impl), row in ROWS.items():
            tflops = row.flops / (row.kernel_us * 1e-6) / 1e12
            ref = ROWS.get((case, "torch_scaled_mm")) if impl != "torch_scaled_mm" else None
            base = f"{ref.kernel_us / row.kernel_us:7.2f}" if ref else f"{'-':>7}"
            floor = f"{row.kernel_us / row.floor_us:7.2f}" if row.floor_us else f"{'-':>7}"
            mhz = f"{row.mhz:5.0f}" if row.mhz else f"{'-':>5}"
            lines.append(f"  {case:<36} {impl:<22} {row.kernel_us:9.1f} {tflops:8.1f} {base} "
                         f"{floor}  {row.target:<16} {mhz}")
        terminalreporter.write_line("\n".join(lines))


def add_row(request, benchmark, case: str, impl: str, row: Row) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("kpt-fp8-gemm-summary"):
        manager.register(_Summary(), "kpt-fp8-gemm-summary")
    ROWS[(case, impl)] = row
    benchmark.extra_info.update(kernel_us=row.kernel_us, floor_us=row.floor_us,
                                target=row.target)


@functools.cache
def operands(m: int, n: int, k: int, granularity: str, copies: int = 1):
    """(a8, a_scale, [(w8, w_scale)] * copies), quantised on the device."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(m, k, device=DEVICE, generator=gen)
    a8, sa = quantize_fp8(a, granularity, FP8)
    weights = []
    for _ in range(copies):
        w = torch.randn(n, k, device=DEVICE, generator=gen) * 0.02
        weights.append(quantize_fp8(w, granularity, FP8,
                                    block=W_BLOCK if granularity == "block" else None))
    return a8, sa, weights


def _scaled_mm_fn(a8, sa, w8, sw, granularity: str):
    if granularity == "row":  # row-wise scaling wants (M, 1) and (1, N)
        sw = sw.reshape(1, -1)
    else:
        sa, sw = sa.reshape(()), sw.reshape(())
    return lambda: torch._scaled_mm(a8, w8.T, sa, sw, out_dtype=torch.bfloat16)


@pytest.fixture
def sm89(cuda_only):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 GEMM needs sm_89 or newer")


def test_copy_bandwidth(sm89):
    gbps = copy_gbps()
    assert math.isfinite(gbps) and gbps > 0


@pytest.mark.parametrize("impl", KPT_IMPLS + ["torch_scaled_mm"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp8_gemm(benchmark, sm89, request, case, impl):
    m, n, k, gran, target = CASES[case]
    decode = m <= 16
    a8, sa, weights = operands(m, n, k, gran, copies=2 if decode else 1)
    base_gran = BASELINE[gran]
    if impl == "torch_scaled_mm":
        if base_gran != gran:  # the baseline at its own granularity
            a8, sa, weights = operands(m, n, k, base_gran, copies=2 if decode else 1)
        fns = [_scaled_mm_fn(a8, sa, w8, sw, base_gran) for w8, sw in weights]
    else:
        backend = None if impl == "kpt_auto" else impl.removeprefix("kpt_")
        w8, sw = weights[0]
        if backend is not None:
            scales = [x.reshape(1, 1) if x.dim() == 0 else x for x in (sa, sw)]
            out = torch.empty(0, device=DEVICE, dtype=torch.bfloat16)
            reasons = SPEC.reasons(backend, problem_of(Call(a8, w8, *scales, gran, gran, None,
                                                            out)))
            if reasons:
                pytest.skip(f"{backend}: " + "; ".join(reasons))
        got = fp8_gemm(a8, w8, sa, sw, backend=backend)
        want = fp8_gemm(a8, w8, sa, sw, backend="reference")
        reason = compare(f"{case} {impl}", got, want, AGREE)
        if reason is not None:
            pytest.fail(reason)
        fns = [functools.partial(fp8_gemm, a8, w8_, sa, sw_, backend=backend)
               for w8_, sw_ in weights]
    timing = kernel_timing(fns)

    def one_call():
        fns[0]()
        torch.cuda.synchronize()

    benchmark.pedantic(one_call, rounds=5, iterations=1, warmup_rounds=1)
    row = Row(timing.us, 2.0 * m * n * k, "" if impl == "torch_scaled_mm" else target,
              n * k / (copy_gbps() * 1e9) * 1e6 if decode else None, timing.mhz)
    add_row(request, benchmark, case, impl, row)
