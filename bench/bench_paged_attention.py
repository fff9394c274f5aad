"""paged_attention: kpt's backends against torch SDPA (decode) and kpt's flash_attention (chunked
prefill), each baseline on the same KV stored contiguously; bandwidth against the device's own
copy bandwidth, measured in the same run.

Rows (Llama-3-8B attention: 32 query / 8 kv heads, head dim 128, bf16 activations, NHD pages,
every page table a random permutation of the cache's pages, random normal data):

* decode B64 ctx4096, pages of 16 and of 1: kpt triton (and cuda, where paged_attention
  registers it) against ``F.scaled_dot_product_attention(..., enable_gqa=True)`` over (B, Hkv,
  S, D) contiguous copies of the same keys and values;
* decode B1 ctx65536 (the split-KV case): the same three;
* fp8 KV (float8_e4m3fn, per-kv-head scales) at the B64 ctx4096 page-16 shape: time over the
  same backend's bf16 time;
* chunked prefill, 4 sequences of 2048 new tokens over 8192 cached (causal, bottom-right):
  kpt triton (its gather path: pages copied to a contiguous buffer, then flash_attention),
  cuda and kpt auto (dispatch's choice) against ``kpt.ops.flash_attention`` on the contiguous
  KV, (B, S, H, D). ``KPT_BENCH_PAGED_CONFIG='{"GATHER": false}'`` times the paged Triton
  kernel itself.

Effective bandwidth = unique KV bytes read / kernel time; "x copy" divides it by the copy
bandwidth (bytes read + written per second by ``dst.copy_(src)`` of a 1 GiB buffer). Kernel
times are CUDA-graph replay (``bench/conftest.py``: 1 s of warm-up at the power limit's clock,
then the median of 3 windows of >= 100 ms); latency is the median of 5 synchronised eager calls.
``bench/bench_cascade_attention.py`` reuses this file's machinery; both print one table at the
end (run them in one pytest call).

Run: ``pytest bench/bench_paged_attention.py bench/bench_cascade_attention.py`` (needs CUDA;
skips otherwise). ``KPT_BENCH_PAGED_CONFIG='{"SPLITS": 16, "BLOCK_N": 128, "num_stages": 3}'``
adds a ``kpt_triton_cfg`` row timing the Triton kernel under that config (tuning on the GPU).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import COPY_BYTES, Timing, copy_gbps, kernel_timing
from kpt.ops import flash_attention, paged_attention
from kpt.ops._common import compare
from kpt.ops.paged_attention import SPEC, Call, problem_of

DEVICE = "cuda"
HEADS, HEADS_KV, HEAD_DIM = 32, 8, 128
CONFIG = json.loads(os.environ.get("KPT_BENCH_PAGED_CONFIG", "null"))


# ---- shared with bench_cascade_attention.py: copy bandwidth, rows, the summary -------------


@dataclass
class Row:
    """One timed (or computed) implementation of a case. ``base``: (case, impl) of the rows its
    ratio may divide by, the fastest of those measured; ``target``: what the ratio or bandwidth
    should reach."""

    kernel_us: float
    latency_us: float | None
    kv_bytes: float
    base: tuple[tuple[str, str], ...] = ()
    target: str = ""
    flops: float | None = None
    extra: dict = field(default_factory=dict)


ROWS: dict[tuple[str, str], Row] = {}


class _Summary:
    """The table printed after conftest's summary (its first line keeps the phrase
    ``kpt benchmark summary`` that ``scripts/gpu.sh`` cuts the log from)."""

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not ROWS:
            return
        copy = copy_gbps()
        lines = ["", f"kpt benchmark summary, paged / cascade attention (us): copy bandwidth "
                 f"{copy:.0f} GB/s (read + write of 1 GiB); GB/s = unique KV bytes / kernel; "
                 f"x copy = GB/s / copy; x base = kernel / the base row's kernel",
                 f"  {'case':<34} {'impl':<24} {'kernel':>9} {'latency':>9} {'GB/s':>6} "
                 f"{'x copy':>6} {'TFLOP/s':>7} {'x base':>6}  {'target':<30} base"]
        for (case, impl), row in ROWS.items():
            gbps = row.kv_bytes / (row.kernel_us * 1e-6) / 1e9
            bases = [key for key in row.base if key in ROWS]
            key = min(bases, key=lambda k: ROWS[k].kernel_us, default=None)
            ratio = f"{row.kernel_us / ROWS[key].kernel_us:6.2f}" if key else f"{'-':>6}"
            latency = f"{row.latency_us:9.1f}" if row.latency_us else f"{'-':>9}"
            tflops = (f"{row.flops / (row.kernel_us * 1e-6) / 1e12:7.1f}" if row.flops
                      else f"{'-':>7}")
            vs = "" if key is None else key[1] if key[0] == case else f"{key[1]} of {key[0]}"
            lines.append(f"  {case:<34} {impl:<24} {row.kernel_us:9.1f} {latency} {gbps:6.0f} "
                         f"{gbps / copy:6.2f} {tflops} {ratio}  {row.target:<30} {vs}")
        terminalreporter.write_line("\n".join(lines))


def add_row(request, benchmark, case: str, impl: str, row: Row) -> None:
    """Keep ``row`` for the summary (registered once per session) and the benchmark JSON."""
    manager = request.config.pluginmanager
    if not manager.has_plugin("kpt-paged-summary"):
        manager.register(_Summary(), "kpt-paged-summary")
    ROWS[(case, impl)] = row
    gbps = row.kv_bytes / (row.kernel_us * 1e-6) / 1e9
    if benchmark is not None:
        benchmark.extra_info.update(kernel_us=row.kernel_us, latency_us=row.latency_us,
                                    kv_gbps=gbps, x_copy=gbps / copy_gbps(), **row.extra)


def latency_us(benchmark, fn) -> float:
    """Median of 5 synchronised eager calls after one warm-up call."""

    def one_call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(one_call, rounds=5, iterations=1, warmup_rounds=1)
    return benchmark.stats.stats.median * 1e6


def backend_reasons(spec, backend: str, problem) -> list[str]:
    """Why kpt's ``backend`` cannot run ``problem`` (not registered is a reason too)."""
    if backend not in {b.name for b in spec.backends}:
        return [f"{spec.name} registers no {backend!r} backend"]
    return spec.reasons(backend, problem)


# ---- inputs ----------------------------------------------------------------------------------


@functools.cache
def contiguous_kv(batch: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, Hkv, D) bf16 keys and values, random normal."""
    gen = torch.Generator(device=DEVICE).manual_seed(batch * 7919 + ctx)
    return tuple(torch.randn(batch, ctx, HEADS_KV, HEAD_DIM, device=DEVICE,
                             dtype=torch.bfloat16, generator=gen) for _ in range(2))


@dataclass
class Paged:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


def _fp8_scales(x: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """Per-kv-head scales mapping each head's largest |value| to the format's largest."""
    return (x.float().abs().amax(dim=(0, 1, 3)) / torch.finfo(fp8).max).contiguous()


@functools.cache
def paged_kv(batch: int, ctx: int, page: int, kv_dtype: str = "bf16") -> Paged:
    """``contiguous_kv(batch, ctx)`` scattered into shuffled pages: page ``i`` of sequence
    ``b`` lives at ``block_table[b, i]``, a random permutation of every page of the cache."""
    k, v = contiguous_kv(batch, ctx)
    per_seq = ctx // page
    gen = torch.Generator(device=DEVICE).manual_seed(batch + ctx + page)
    table = torch.randperm(batch * per_seq, device=DEVICE, generator=gen).int()
    table = table.view(batch, per_seq)
    caches, scales = [], []
    for x in (k, v):
        cache = torch.empty(batch * per_seq, page, HEADS_KV, HEAD_DIM, device=DEVICE,
                            dtype=torch.bfloat16)
        cache[table.flatten().long()] = x.view(batch * per_seq, page, HEADS_KV, HEAD_DIM)
        if kv_dtype == "e4m3":
            fp8 = torch.float8_e4m3fn
            scale = _fp8_scales(x, fp8)
            cache = (cache.float() / scale[:, None]).to(fp8)
            scales.append(scale)
        caches.append(cache)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    return Paged(*caches, table, lens, *(scales or [None, None]))


def kv_bytes(tokens: int, kv_dtype: str = "bf16") -> float:
    """Unique bytes of K and V for ``tokens`` keys of every kv head."""
    return 2 * tokens * HEADS_KV * HEAD_DIM * (1 if kv_dtype == "e4m3" else 2)


# ---- cases -----------------------------------------------------------------------------------

# case: (batch, context, page size, kv dtype)
DECODE = {
    "decode B64 ctx4096 page16": (64, 4096, 16, "bf16"),
    "decode B64 ctx4096 page1": (64, 4096, 1, "bf16"),
    "decode B1 ctx65536 page16": (1, 65536, 16, "bf16"),
    "decode B64 ctx4096 page16 fp8": (64, 4096, 16, "e4m3"),
}
# Issue 28's targets. A decode row reads its KV once, so its bandwidth is set against the copy
# bandwidth of the same run and against SDPA on the same KV stored contiguously (>= 0.95x its
# bandwidth: time <= 1.05x); fp8 halves the bytes (time <= 0.6x bf16's).
DECODE_TARGETS = {
    "decode B64 ctx4096 page16": "x copy >= 0.90, x base <= 1.05",
    "decode B64 ctx4096 page1": "x copy >= 0.85",
    "decode B1 ctx65536 page16": "x copy >= 0.85",
}
FP8_TARGET = "x base (fp8 / bf16) <= 0.6"
PREFILL = "prefill 4x(2048 new + 8192 cached)"
PREFILL_SHAPE = (4, 2048, 8192)  # sequences, new tokens, cached tokens
# Prefill is compute-bound: >= 0.9x the speed of flash_attention on contiguous KV.
PREFILL_TARGET = "x base <= 1.11"
# Agreement with the baseline's output, norm-wise: bf16, two units of the last place (the
# kernels' tolerance in tests/ops); fp8 (e4m3, 3 mantissa bits: up to 2^-4 per value) against
# the bf16 baseline, a few percent after the softmax average.
AGREE = {"bf16": 2**-7, "e4m3": 0.1}
# The stronger of the two counts as the baseline (x base): GQA read in place, or expanded.
SDPA = ["torch_sdpa_gqa", "torch_sdpa_expanded"]
KPT_IMPLS = ["kpt_triton", "kpt_cuda"] + (["kpt_triton_cfg"] if CONFIG else [])


def _decode_q(batch: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    return torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16,
                       generator=gen)


def _call(q, kv: Paged, cu=None, max_q=1, causal=True) -> Call:
    lse_shape = (q.shape[1], q.shape[0]) if cu is not None else q.shape[:2]
    return Call(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, cu, max_q,
                HEAD_DIM**-0.5, -1, 0 if causal else -1, 0.0, kv.k_scale, kv.v_scale, "NHD",
                torch.empty_like(q), torch.empty(lse_shape, device=q.device))


def kpt_fn(impl: str, q, kv: Paged, cu=None, max_q=None):
    """The kpt call of ``impl`` ("kpt_<backend>", or "kpt_triton_cfg": the Triton launcher
    under ``KPT_BENCH_PAGED_CONFIG``), skipping with the backend's reasons."""
    call = _call(q, kv, cu, max_q or 1)
    backend = "triton" if impl == "kpt_triton_cfg" else impl.removeprefix("kpt_")
    if backend == "auto":
        backend = None
    else:
        reasons = backend_reasons(SPEC, backend, problem_of(call))
        if reasons:
            pytest.skip(f"{backend}: " + "; ".join(reasons))
    if impl == "kpt_triton_cfg":
        from kpt.ops.paged_attention import _triton

        def run_config() -> torch.Tensor:
            _triton.run(call, CONFIG)
            return call.out

        return run_config
    return lambda: paged_attention(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                   cu_seqlens_q=cu, max_seqlen_q=max_q, k_scale=kv.k_scale,
                                   v_scale=kv.v_scale, backend=backend)


def test_copy_bandwidth(cuda_only, request):
    """The yardstick of every row's "x copy", first so that it runs before the caches fill the
    memory (the other rows' "x copy" would measure it on their first use anyway)."""
    gbps = copy_gbps()
    assert math.isfinite(gbps) and gbps > 0
    add_row(request, None, "copy 1 GiB (read + write)", "torch copy_",
            Row(2 * COPY_BYTES / (gbps * 1e9) * 1e6, None, 2 * COPY_BYTES))


@pytest.mark.parametrize("impl", KPT_IMPLS + SDPA)
@pytest.mark.parametrize("case", list(DECODE))
def test_decode(benchmark, cuda_only, request, case, impl):
    batch, ctx, page, kv_dtype = DECODE[case]
    q = _decode_q(batch)
    if impl in SDPA and kv_dtype != "bf16":
        pytest.skip("SDPA reads bf16 KV only (the fp8 row compares with kpt's bf16 time)")
    k, v = contiguous_kv(batch, ctx)
    want = _sdpa_fn(q, k, v)()
    if impl in SDPA:
        fn = _sdpa_fn(q, k, v, expand=impl == "torch_sdpa_expanded")
    else:
        fn = kpt_fn(impl, q, paged_kv(batch, ctx, page, kv_dtype))
    check_agrees(case, impl, fn(), want, AGREE[kv_dtype])
    timing = kernel_timing(fn)
    if kv_dtype == "bf16":
        base = () if impl in SDPA else tuple((case, name) for name in SDPA)
        target = "" if impl in SDPA else DECODE_TARGETS[case]
    else:
        base, target = (("decode B64 ctx4096 page16", impl),), FP8_TARGET
    add_row(request, benchmark, case, impl,
            Row(timing.us, latency_us(benchmark, fn), kv_bytes(batch * ctx, kv_dtype), base,
                target, extra=_clock(timing)))


def _sdpa_fn(q, k, v, expand: bool = False):
    """SDPA over (B, H, S, D) contiguous copies, one query seeing every key (no mask): kv heads
    shared through ``enable_gqa``, or (``expand``) repeated to every query head beforehand."""
    if expand:
        k, v = (x.repeat_interleave(HEADS // HEADS_KV, dim=2) for x in (k, v))
    k, v = (x.transpose(1, 2).contiguous() for x in (k, v))
    q4 = q[:, :, None]  # (B, Hq, 1, D)
    return lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=not expand)[:, :, 0]


def check_agrees(case: str, impl: str, got: torch.Tensor, want: torch.Tensor,
                 tol: float) -> None:
    """A row times the computation its baseline does, or fails: ``compare``'s norm-wise bound."""
    reason = compare(f"{case} {impl}", got, want, tol)
    if reason is not None:
        pytest.fail(reason)


def _clock(timing: Timing) -> dict:
    return {} if timing.mhz is None else {"mhz": timing.mhz}


def _prefill_flops() -> float:
    seqs, new, cached = PREFILL_SHAPE
    pairs = new * cached + new * (new + 1) / 2  # query i sees the cache and new keys 0..i
    return 4 * seqs * HEADS * HEAD_DIM * pairs


@pytest.mark.parametrize("impl", KPT_IMPLS + ["kpt_auto", "kpt_flash_attention"])
def test_chunked_prefill(benchmark, cuda_only, request, impl):
    seqs, new, cached = PREFILL_SHAPE
    ctx = new + cached
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    q = torch.randn(seqs, new, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16,
                    generator=gen)
    k, v = contiguous_kv(seqs, ctx)

    def flash():
        # Sq < Sk, causal: bottom-right aligned, as paged_attention's queries
        return flash_attention(q, k, v, causal=True).view(seqs * new, HEADS, HEAD_DIM)

    if impl == "kpt_flash_attention":
        fn = flash
    else:
        cu = torch.arange(0, seqs * new + 1, new, dtype=torch.int32, device=DEVICE)
        fn = kpt_fn(impl, q.view(seqs * new, HEADS, HEAD_DIM), paged_kv(seqs, ctx, 16), cu,
                    new)
    check_agrees(PREFILL, impl, fn(), flash(), AGREE["bf16"])
    timing = kernel_timing(fn, calls=4)
    base = () if impl == "kpt_flash_attention" else ((PREFILL, "kpt_flash_attention"),)
    add_row(request, benchmark, PREFILL, impl,
            Row(timing.us, latency_us(benchmark, fn), kv_bytes(seqs * ctx), base,
                PREFILL_TARGET if base else "", flops=_prefill_flops(),
                extra=timing.clock(_prefill_flops() / (timing.us * 1e-6) / 1e12)))
