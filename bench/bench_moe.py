"""moe: kpt's fused_moe and moe_route against torch's ``_grouped_mm`` path, the per-expert loop
transformers runs, and the weight-read floor.

Rows (random normal x, experts scaled by 1/sqrt(fan-in), ids and weights from ``moe_route``
of random router logits, so the load per expert is what a fresh router gives):

* T=4096 E=8 top2 H=4096 I=14336 bf16 (Mixtral-8x7B): target >= 1.1x ``torch_grouped_mm``;
* T=4096 E=128 top8 H=2048 I=768 bf16 (Qwen3-30B-A3B): target >= 2x ``torch_grouped_mm``;
* decode T=32 E=128 top8 (same experts): target <= 1.3x the weight floor, the bytes of the
  experts the batch touches / the copy bandwidth of the same run;
* fp8 T=4096 E=128 top8: FP8 128x128-block experts, target >= 1.6x kpt's bf16 time;
* moe_route T=4096 E=256 top8, DeepSeek-V3's routing (sigmoid, correction bias, 8 groups,
  top 4 groups, scaling 2.5): target >= 5x the same routing in eager PyTorch;
* train rows (E=128 and E=8 shapes above): forward + backward of the experts, kpt's Triton
  backward against ``_grouped_mm`` under autograd (kpt's own goal: >= 1.0x) and kpt's PyTorch
  recompute (the CPU / float32 path).

``torch_grouped_mm``: the sort-gather-``torch._grouped_mm``-SwiGLU-``_grouped_mm``-scatter
pipeline in PyTorch (what transformers' grouped-mm experts path does; graph-safe, no host
sync). ``torch_loop``: one gate/up and one down matmul per expert with pairs (transformers'
default eager experts; a host sync per expert, timed with events). Every kpt row is first
checked against the reference backend. Kernel times: CUDA-graph replay where the calls can be
captured (``bench/conftest.py``), events otherwise; "latency" is one eager call with its sync.

Run: ``pytest bench/bench_moe.py`` (needs CUDA; skips otherwise).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import copy_gbps, kernel_timing
from kpt.ops import fused_moe, moe_route, quantize_fp8
from kpt.ops._common import compare
from kpt.ops.moe import ROUTE_SPEC, SPEC, FusedCall, RouteCall, problem_of, route_problem

DEVICE = "cuda"
BF16 = torch.bfloat16
# case: (T, E, top_k, H, I, quant, target)
CASES = {
    "T4096 E8 top2 H4096 I14336": (4096, 8, 2, 4096, 14336, "none", "x grouped_mm >= 1.1"),
    "T4096 E128 top8 H2048 I768": (4096, 128, 8, 2048, 768, "none", "x grouped_mm >= 2.0"),
    "decode T32 E128 top8 H2048 I768": (32, 128, 8, 2048, 768, "none", "x floor <= 1.3"),
    "fp8 T4096 E128 top8 H2048 I768": (4096, 128, 8, 2048, 768, "fp8", "x bf16 >= 1.6"),
}
IMPLS = ["kpt_triton", "kpt_cuda", "kpt_auto", "torch_grouped_mm", "torch_loop"]
# kpt against the reference: both round the intermediate and the output to bf16 (one unit
# 2^-8 each); float32 sums in another order add ~1e-6.
AGREE = 2**-7
# fp8 against its reference: the same fp8 products, float32 sums in another order.
AGREE_FP8 = 2**-6


@dataclass
class Row:
    kernel_us: float
    latency_us: float
    target: str = ""
    floor_us: float | None = None
    flops: float = 0.0


ROWS: dict[tuple[str, str], Row] = {}


class _Summary:
    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not ROWS:
            return
        lines = ["", f"kpt benchmark summary, moe (us): copy bandwidth {copy_gbps():.0f} GB/s; "
                 "x base = baseline kernel / kernel (grouped_mm; eager routing; kpt bf16 for "
                 "fp8); x floor = kernel / weight floor",
                 f"  {'case':<34} {'impl':<18} {'kernel':>9} {'latency':>9} {'TFLOP/s':>8} "
                 f"{'x base':>7} {'x floor':>7}  target"]
        for (case, impl), row in ROWS.items():
            base = _baseline(case, impl)
            tflops = row.flops / (row.kernel_us * 1e-6) / 1e12 if row.flops else 0.0
            ratio = f"{base / row.kernel_us:7.2f}" if base else f"{'-':>7}"
            floor = f"{row.kernel_us / row.floor_us:7.2f}" if row.floor_us else f"{'-':>7}"
            lines.append(f"  {case:<34} {impl:<18} {row.kernel_us:9.1f} {row.latency_us:9.1f} "
                         f"{tflops:8.1f} {ratio} {floor}  {row.target}")
        terminalreporter.write_line("\n".join(lines))


def _baseline(case: str, impl: str) -> float | None:
    if not impl.startswith("kpt"):
        return None
    if case.startswith("fp8"):
        ref = ROWS.get((case.replace("fp8 ", ""), impl))
    elif case.startswith("moe_route"):
        ref = ROWS.get((case, "torch_eager"))
    elif case.startswith("train"):
        ref = ROWS.get((case, "torch_grouped_mm"))
    else:
        ref = ROWS.get((case, "torch_grouped_mm"))
    return ref.kernel_us if ref else None


def add_row(request, benchmark, case: str, impl: str, row: Row) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("kpt-moe-summary"):
        manager.register(_Summary(), "kpt-moe-summary")
    ROWS[(case, impl)] = row
    benchmark.extra_info.update(kernel_us=row.kernel_us, floor_us=row.floor_us,
                                target=row.target)


@functools.cache
def operands(t: int, e: int, k: int, h: int, i: int):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(t, h, device=DEVICE, generator=gen).to(BF16)
    w13 = (torch.randn(e, 2 * i, h, device=DEVICE, generator=gen) / math.sqrt(h)).to(BF16)
    w2 = (torch.randn(e, h, i, device=DEVICE, generator=gen) / math.sqrt(i)).to(BF16)
    logits = torch.randn(t, e, device=DEVICE, generator=gen)
    weights, ids = moe_route(logits, k, backend="reference")
    return x, w13, w2, weights, ids


@functools.cache
def fp8_experts(t: int, e: int, k: int, h: int, i: int):
    _, w13, w2, _, _ = operands(t, e, k, h, i)
    out = []
    for w in (w13, w2):
        q = [quantize_fp8(w[j], "block", block=(128, 128)) for j in range(e)]
        out += [torch.stack([a for a, _ in q]), torch.stack([s for _, s in q])]
    return out  # w13_8, s13, w2_8, s2


def torch_grouped_mm(x, w13, w2, weights, ids):
    """Sort pairs by expert, gather, two ``torch._grouped_mm``, SwiGLU, weight, un-sort, sum."""
    t, k = ids.shape
    i = w2.shape[2]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    xs = x[order // k]
    hid = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    a = F.silu(hid[:, :i]) * hid[:, i:]
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    out = torch.empty_like(y)
    out[order] = y
    return out.view(t, k, -1).sum(1)


def torch_loop(x, w13, w2, weights, ids):
    """transformers' eager experts: a mask per expert, a matmul pair per expert with pairs."""
    out = torch.zeros_like(x)
    i = w2.shape[2]
    hit = torch.unique(ids).tolist()
    for e in hit:
        tok, slot = torch.where(ids == e)
        hid = x[tok] @ w13[e].T
        y = (F.silu(hid[:, :i]) * hid[:, i:]) @ w2[e].T
        out.index_add_(0, tok, (y * weights[tok, slot, None]).to(x.dtype))
    return out


def _expert_floor_us(ids: torch.Tensor, h: int, i: int, bytes_per: float) -> float:
    touched = torch.unique(ids).numel()
    return touched * 3 * h * i * bytes_per / (copy_gbps() * 1e9) * 1e6


def _latency_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3)
    return best


def test_copy_bandwidth(cuda_only):
    assert copy_gbps() > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_moe(benchmark, cuda_only, request, case, impl):
    t, e, k, h, i, quant, target = CASES[case]
    x, w13, w2, weights, ids = operands(t, e, k, h, i)
    kw = {}
    if quant == "fp8":
        if not impl.startswith("kpt"):
            pytest.skip("fp8 experts: kpt against its own bf16 rows")
        w13_8, s13, w2_8, s2 = fp8_experts(t, e, k, h, i)
        w13, w2, kw = w13_8, w2_8, dict(w13_scale=s13, w2_scale=s2)
    if impl == "torch_loop" and t > 1024 and e > 8:
        pytest.skip("the per-expert loop at E=128 T=4096 is ~100x the others; timed at E=8 "
                    "and decode")
    if impl.startswith("kpt"):
        backend = None if impl == "kpt_auto" else impl.removeprefix("kpt_")
        if backend is not None:
            if backend not in [b.name for b in SPEC.backends]:
                pytest.skip(f"{backend}: not a fused_moe backend in this build")
            call = FusedCall(x, w13, w2, weights, ids, "silu", quant, kw.get("w13_scale"),
                             kw.get("w2_scale"), None, None, 0, 0, None, x)
            reasons = SPEC.reasons(backend, problem_of(call))
            if reasons:
                pytest.skip(f"{backend}: " + "; ".join(reasons))
        with torch.no_grad():
            got = fused_moe(x, w13, w2, weights, ids, backend=backend, **kw)
            want = fused_moe(x, w13, w2, weights, ids, backend="reference", **kw)
        reason = compare(f"{case} {impl}", got, want,
                         AGREE_FP8 if quant == "fp8" else AGREE)
        if reason is not None:
            pytest.fail(reason)
        fn = functools.partial(fused_moe, x, w13, w2, weights, ids, backend=backend, **kw)
    else:
        base = torch_grouped_mm if impl == "torch_grouped_mm" else torch_loop
        if impl == "torch_grouped_mm" and not hasattr(torch, "_grouped_mm"):
            pytest.skip("this torch has no _grouped_mm")
        fn = functools.partial(base, x, w13, w2, weights, ids)
        with torch.no_grad():
            reason = compare(f"{case} {impl}", fn(), fused_moe(x, w13, w2, weights, ids,
                                                               backend="reference"), 2**-6)
        if reason is not None:
            pytest.fail(reason)
    with torch.no_grad():
        timing = kernel_timing(fn)
        latency = _latency_us(fn)
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=3, iterations=1,
                           warmup_rounds=1)
    floor = (_expert_floor_us(ids, h, i, 1 if quant == "fp8" else 2)
             if t <= 64 else None)
    flops = 2.0 * t * k * 3 * h * i
    add_row(request, benchmark, case, impl,
            Row(timing.us, latency, target if impl.startswith("kpt") else "", floor, flops))


TRAIN_CASES = {
    "train T4096 E128 top8 H2048 I768": (4096, 128, 8, 2048, 768),
    "train T4096 E8 top2 H4096 I14336": (4096, 8, 2, 4096, 14336),
}
TRAIN_IMPLS = ["kpt_triton", "kpt_recompute", "torch_grouped_mm"]
# Gradients against the float32 PyTorch recompute of the reference (exact inputs, float32
# math): bf16 GEMM operands (dh, a, w x, w dout) and outputs round to 2^-9 each, compounding to
# ~2^-8 norm-wise (tests/ops/test_moe_backward.py measures 2^-8.3 against float64).
AGREE_GRAD = 2**-6


def _train_step(impl: str, x, w13, w2, weights, ids, dout):
    """One forward and backward: (dx, dw13, dw2, dweights) by ``impl``."""
    leaves = [t.detach().requires_grad_(True) for t in (x, w13, w2, weights)]
    if impl == "torch_grouped_mm":
        out = torch_grouped_mm(*leaves, ids)
    else:
        backend = "triton" if impl == "kpt_triton" else "reference"
        out = fused_moe(*leaves, ids, backend=backend)
    return torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_fused_moe_train(benchmark, cuda_only, request, case, impl):
    """Forward + backward of the experts (x, w13, w2 and the routing weights' gradients):
    kpt's Triton backward (no host sync), kpt's PyTorch recompute (``kpt_recompute``: the
    reference forward and its per-expert backward) and torch's ``_grouped_mm`` pipeline under
    autograd."""
    t, e, k, h, i = TRAIN_CASES[case]
    x, w13, w2, weights, ids = operands(t, e, k, h, i)
    weights = weights.to(BF16)
    dout = torch.randn(t, h, device=DEVICE, generator=torch.Generator(
        device=DEVICE).manual_seed(2)).to(BF16)
    if impl == "torch_grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    if impl == "kpt_recompute" and e > 8:
        pytest.skip("the recompute syncs and loops over experts: timed at E=8 only")
    if impl == "kpt_triton":  # the row times the Triton backward, not the recompute
        from kpt.ops.moe import backward_impl

        assert backward_impl(x, "triton") == "triton", "the Triton backward cannot run here"
    fn = functools.partial(_train_step, impl, x, w13, w2, weights, ids, dout)
    try:
        got = fn()
    except RuntimeError as err:  # e.g. a torch whose _grouped_mm has no backward
        pytest.skip(f"{impl}: {err}")
    ref_leaves = [t.detach().float().requires_grad_(True) for t in (x, w13, w2, weights)]
    want = torch.autograd.grad(fused_moe(*ref_leaves, ids, backend="reference"), ref_leaves,
                               dout.float())
    for name, g, w in zip(("dx", "dw13", "dw2", "dweights"), got, want):
        reason = compare(f"{case} {impl} {name}", g, w, AGREE_GRAD)
        if reason is not None:
            pytest.fail(reason)
    timing = kernel_timing(fn)
    latency = _latency_us(fn)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=3, iterations=1,
                       warmup_rounds=1)
    add_row(request, benchmark, case, impl,
            Row(timing.us, latency, "x grouped_mm >= 1.0" if impl == "kpt_triton" else "",
                None, 3 * 2.0 * t * k * 3 * h * i))


def deepseek_route_eager(logits, bias, top_k=8, groups=8, topk_groups=4, scaling=2.5):
    """DeepSeek-V3's routing as transformers' eager modules compute it (float32; masked
    experts at -inf where transformers writes 0, so a negative biased score cannot win)."""
    scores = logits.float().sigmoid()
    choice = scores + bias
    t, e = choice.shape
    group_scores = choice.view(t, groups, -1).topk(2, dim=-1).values.sum(-1)
    group_idx = group_scores.topk(topk_groups, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    mask = mask.unsqueeze(-1).expand(t, groups, e // groups).reshape(t, e)
    idx = choice.masked_fill(mask == 0, float("-inf")).topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, idx)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, idx


ROUTE_CASE = "moe_route T4096 E256 top8 DeepSeek-V3"


@pytest.mark.parametrize("impl", ["kpt_cuda", "kpt_triton", "kpt_auto", "torch_eager"])
def test_moe_route(benchmark, cuda_only, request, impl):
    t, e, k = 4096, 256, 8
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    logits = torch.randn(t, e, device=DEVICE, generator=gen)
    bias = torch.randn(e, device=DEVICE, generator=gen) * 0.1
    opts = dict(scoring="sigmoid", num_expert_groups=8, topk_groups=4, correction_bias=bias,
                routed_scaling_factor=2.5)
    if impl == "torch_eager":
        fn = functools.partial(deepseek_route_eager, logits, bias)
        w_ref, ids_ref = moe_route(logits, k, backend="reference", **opts)
        w, ids = fn()
        same = torch.equal(torch.sort(ids, -1).values, torch.sort(ids_ref.long(), -1).values)
        if not same:
            pytest.fail("the eager baseline chose other experts than the reference")
    else:
        backend = None if impl == "kpt_auto" else impl.removeprefix("kpt_")
        if backend is not None:
            if backend not in [b.name for b in ROUTE_SPEC.backends]:
                pytest.skip(f"{backend}: not a moe_route backend in this build")
            call = RouteCall(logits, k, "sigmoid", True, 8, 4, bias, 2.5, logits, logits)
            reasons = ROUTE_SPEC.reasons(backend, route_problem(call))
            if reasons:
                pytest.skip(f"{backend}: " + "; ".join(reasons))
        w, ids = moe_route(logits, k, backend=backend, **opts)
        w_ref, ids_ref = moe_route(logits, k, backend="reference", **opts)
        if not torch.equal(ids, ids_ref):
            pytest.fail(f"{impl}: ids differ from the reference")
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
        fn = functools.partial(moe_route, logits, k, backend=backend, **opts)
    timing = kernel_timing(fn)
    latency = _latency_us(fn)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=3, iterations=1,
                       warmup_rounds=1)
    add_row(request, benchmark, ROUTE_CASE, impl,
            Row(timing.us, latency, "x eager >= 5" if impl.startswith("kpt") else ""))
