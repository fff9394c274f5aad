"""flash_attention: kpt backends vs PyTorch SDPA (cuDNN, FlashAttention-2, memory-efficient)
and compiled flex_attention, forward and backward, bf16.

Shapes (heads = kv heads, head dim D): B4 H32 S4096 D128, B1 H32 S16384 D128 and B8 H16 S2048
D64, full and causal; on the first shape also causal with a 1024-key sliding window, and on
the first and the D64 shape full with soft-cap 30 (SDPA has neither: only flex and kpt run
those).

Run: ``KPT_BENCH_BASELINE=sdpa_cudnn pytest bench/bench_flash_attention.py`` (needs CUDA).
Kernel times come from CUDA-graph replay (a few calls captured once, replayed back to back for
``KPT_BENCH_WARMUP_MS`` = 1000 ms, then the median of 3 windows of >= 100 ms; see
``bench/conftest.py``), so no implementation's host overhead counts and every one runs at the
clock its power allows under sustained load (``mhz``: the SM clock read in the timed windows;
``per_ghz``: TFLOP/s per GHz, the work per cycle); latency is the eager call, synchronised.
The backward is timed as (forward + backward) minus forward, each measured the same way, so it
includes the preprocess kernel and any output gradient bookkeeping of autograd. TFLOP/s uses
4*B*H*Sq*Sk*D for the forward (halved when causal; counted over the visible pairs for a sliding
window) and 2.5x that for the backward.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import Timing, event_timing, graph_timing, record
from kpt.ops import flash_attention
from kpt.ops.flash_attention import SPEC, Call, problem_of

SHAPES = {  # B, H, S, D
    "B4-H32-S4096-D128": (4, 32, 4096, 128),
    "B1-H32-S16384-D128": (1, 32, 16384, 128),
    "B8-H16-S2048-D64": (8, 16, 2048, 64),
}
# (shape, mask): mask is "full", "causal", "window1024" (causal + 1024 keys back), "softcap30".
CASES = [
    ("B4-H32-S4096-D128", "full"), ("B4-H32-S4096-D128", "causal"),
    ("B4-H32-S4096-D128", "window1024"), ("B4-H32-S4096-D128", "softcap30"),
    ("B1-H32-S16384-D128", "full"), ("B1-H32-S16384-D128", "causal"),
    ("B8-H16-S2048-D64", "full"), ("B8-H16-S2048-D64", "causal"),
    ("B8-H16-S2048-D64", "softcap30"),
]
IMPLS = ["kpt_triton", "kpt_cuda", "kpt_cuda_mma", "kpt_cuda_sm90_overlap",
         "kpt_cuda_sm90_persistent", "kpt_cuda_sm90_dynamic", "kpt_auto", "sdpa_cudnn",
         "sdpa_flash", "sdpa_efficient", "torch_flex_compiled"]
# Forward-only variants timed next to the default choice: {impl: (backend, config)}.
CONFIG_IMPLS = {"kpt_cuda_mma": ("cuda", {"impl": "mma"}),
                "kpt_cuda_sm90_overlap": ("cuda", {"impl": "sm90", "variant": "overlap"}),
                "kpt_cuda_sm90_persistent": ("cuda", {"impl": "sm90", "variant": "persistent"}),
                "kpt_cuda_sm90_dynamic": ("cuda", {"impl": "sm90", "variant": "dynamic"})}
WINDOW = 1024
SOFTCAP = 30.0
CALLS = {"fwd": 5, "bwd": 3}


@functools.cache
def _inputs(shape: str) -> tuple[torch.Tensor, ...]:
    """(B, H, S, D) leaves shared by every case of a shape, and an output gradient."""
    b, h, s, d = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16,
                                 generator=gen) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def _flops(shape: str, mask: str, direction: str) -> float:
    b, h, s, d = SHAPES[shape]
    if mask == "causal":
        pairs = s * s / 2
    elif mask == "window1024":  # query i sees min(i + 1, WINDOW + 1) keys
        full = max(s - WINDOW - 1, 0)
        pairs = (WINDOW + 1) * full + sum(min(i + 1, WINDOW + 1) for i in range(s - full))
    else:
        pairs = s * s
    fwd = 4 * b * h * pairs * d
    return fwd * (2.5 if direction == "bwd" else 1.0)


def _kpt_forward(mask: str, backend: str | None):
    kw = dict(causal=mask in ("causal", "window1024"),
              window=(WINDOW, 0) if mask == "window1024" else (-1, -1),
              softcap=SOFTCAP if mask == "softcap30" else 0.0)

    def run(q, k, v):
        # (B, H, S, D) -> (B, S, H, D) views: the kernels read the strides, no copies.
        out = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              backend=backend, **kw)
        return out.transpose(1, 2)

    return run


def _problem(shape: str, mask: str):
    """The dispatch Problem of a kpt call on this case (to ask a backend for reasons)."""
    q, k, v, _ = (t.detach().transpose(1, 2) for t in _inputs(shape))
    call = Call(q, k, v, None, None, q.shape[1], k.shape[1], 1.0,
                WINDOW if mask == "window1024" else -1,
                0 if mask in ("causal", "window1024") else -1,
                SOFTCAP if mask == "softcap30" else 0.0, q, q)
    return problem_of(call)


_SDPA = {"sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_flash": "FLASH_ATTENTION",
         "sdpa_efficient": "EFFICIENT_ATTENTION"}


def _sdpa_forward(impl: str, mask: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _SDPA[impl])

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=mask == "causal")

    return run


@functools.cache
def _flex_forward(shape: str, mask: str):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _, _, s, _ = SHAPES[shape]
    block_mask, score_mod = None, None
    if mask == "causal":
        block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, s, s)
    elif mask == "window1024":
        block_mask = create_block_mask(lambda b, h, q, kv: (q >= kv) & (q - kv <= WINDOW),
                                       None, None, s, s)
    elif mask == "softcap30":
        def score_mod(score, b, h, q_idx, kv_idx):
            return SOFTCAP * torch.tanh(score / SOFTCAP)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)

    return run


def _config_forward(mask: str, backend: str, config: dict):
    """A forward-only call of one backend config (a variant the dispatcher does not pick by
    default), through the registry's own run entry."""
    from kpt.ops.flash_attention import _cuda

    def run(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        call = Call(qt, kt, vt, None, None, qt.shape[1], kt.shape[1], qt.shape[-1] ** -0.5,
                    WINDOW if mask == "window1024" else -1,
                    0 if mask in ("causal", "window1024") else -1,
                    SOFTCAP if mask == "softcap30" else 0.0, torch.empty_like(qt),
                    torch.empty(q.shape[:3], device=q.device))
        _cuda.run(call, config)
        return call.out.transpose(1, 2)

    return run


def _forward_fn(impl: str, shape: str, mask: str):
    if impl in CONFIG_IMPLS:
        backend, config = CONFIG_IMPLS[impl]
        problem = _problem(shape, mask)
        if config not in SPEC.backend(backend).configs(problem):
            pytest.skip(f"{impl}: {backend} does not offer {config} here")
        return _config_forward(mask, backend, config)
    if impl.startswith("kpt_"):
        backend = impl.removeprefix("kpt_")
        if backend != "auto":
            reasons = SPEC.reasons(backend, _problem(shape, mask))
            if reasons:
                pytest.skip(f"{backend}: " + "; ".join(reasons))
        return _kpt_forward(mask, None if backend == "auto" else backend)
    if impl in _SDPA:
        if mask not in ("full", "causal"):
            pytest.skip(f"SDPA has no fused {mask}")
        return _sdpa_forward(impl, mask)
    return _flex_forward(shape, mask)


def _kernel_timing(fn, calls: int) -> Timing:
    """Per-call GPU time: ``calls`` calls captured in one CUDA graph, median of 3 timed windows,
    so no implementation's host overhead (Python dispatch, launch) is counted. A call that
    cannot be captured is timed back to back between two events instead (its host time then
    hides behind the queued kernels only when it is shorter than they are)."""
    try:
        return graph_timing([fn], calls=calls, replays=3)
    except RuntimeError:
        torch.cuda.synchronize()
        return event_timing([fn], calls=calls)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,mask", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_flash_attention(benchmark, cuda_only, shape, mask, impl, direction):
    if impl in CONFIG_IMPLS and direction == "bwd":
        pytest.skip(f"{impl} is a forward-only variant")
    q, k, v, dout = _inputs(shape)
    forward = _forward_fn(impl, shape, mask)

    def fwd():
        with torch.no_grad():
            forward(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(forward(q, k, v), (q, k, v), dout)

    try:
        timing = _kernel_timing(fwd, CALLS["fwd"])
        kernel = timing.us
        if direction == "bwd":
            timing = _kernel_timing(fwd_bwd, CALLS["bwd"])
            kernel = max(timing.us - kernel, 0.0)
    except RuntimeError as err:  # an SDPA backend that does not take this shape
        torch.cuda.synchronize()
        pytest.skip(f"{impl}: {str(err).splitlines()[0]}")
    one = fwd if direction == "fwd" else fwd_bwd

    def one_call():
        one()
        torch.cuda.synchronize()

    # One warm-up round (a first call may pay one-time costs: lazily built state, a kernel's
    # first load), then the median of five, as the flex benchmark does.
    benchmark.pedantic(one_call, rounds=5, iterations=1, warmup_rounds=1)
    latency = benchmark.stats.stats.median * 1e6
    tflops = _flops(shape, mask, direction) / (kernel * 1e-6) / 1e12 if kernel else math.nan
    label = impl
    if impl == "kpt_auto":
        label = f"{impl}[{SPEC.choose(_problem(shape, mask))[0].name}]"
    # The clock of the timed windows (of forward + backward for "bwd"), and the work per cycle.
    clock = timing.clock(tflops)
    benchmark.extra_info.update(kernel_us=kernel, latency_us=latency, tflops=tflops, **clock)
    record(f"{direction} {shape} {mask}", label, kernel_us=kernel, latency_us=latency,
           tflops=tflops, **clock)

