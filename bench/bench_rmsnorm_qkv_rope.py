"""rmsnorm_qkv_rope: every available kpt backend vs eager PyTorch, torch.compile and the cuBLAS
QKV GEMM alone, at T = 1, 16, 128, 4096 on Llama-3-8B shapes, plus one Qwen3-8B shape.

Run: ``pytest bench/bench_rmsnorm_qkv_rope.py`` (needs a CUDA device). The summary table at the
end gives kernel time (CUDA-graph replay) and per-call latency, and the ratio to the GEMM alone.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.conftest import event_time_us, graph_time_us, record
from kpt.ops import rmsnorm_qkv_rope
from kpt.ops.rmsnorm_qkv_rope import SPEC, make_call, problem_of, shapes_from_hf_config
from kpt.ops.rmsnorm_qkv_rope.reference import eager_unfused

LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0}
QWEN3_8B = dict(LLAMA3_8B, model_type="qwen3", rms_norm_eps=1e-6, rope_theta=1000000.0)
CASES = {f"llama3-8b T={s['tokens']}": s for s in shapes_from_hf_config(LLAMA3_8B,
                                                                          [1, 16, 128, 4096])}
CASES |= {f"qwen3-8b T={s['tokens']}": s for s in shapes_from_hf_config(QWEN3_8B, [16])}
IMPLS = [f"kpt_{b.name}" for b in SPEC.backends] + [
    "kpt_auto", "eager_torch", "torch_compile", "cublas_gemm_alone"]


@functools.cache
def _calls(case: str) -> list:
    """Input sets to rotate through: enough copies that the weights do not live in L2."""
    shape = CASES[case]
    copies = 4 if shape["tokens"] <= 128 else 1
    return [make_call(shape, torch.bfloat16, torch.device("cuda"), seed=i) for i in range(copies)]


def _kpt(call, backend: str | None):
    return lambda: rmsnorm_qkv_rope(
        call.x, call.norm_weight, call.qkv_weight, call.positions,
        num_q_heads=call.num_q_heads, num_kv_heads=call.num_kv_heads, head_dim=call.head_dim,
        eps=call.eps, qkv_bias=call.qkv_bias, q_norm_weight=call.q_norm_weight,
        k_norm_weight=call.k_norm_weight, residual=call.residual, backend=backend)


_compiled = torch.compile(eager_unfused, dynamic=True)


def _impl_fns(impl: str, calls: list) -> list | None:
    if impl.startswith("kpt_"):
        backend = impl.removeprefix("kpt_")
        if backend != "auto":
            reasons = SPEC.reasons(backend, problem_of(calls[0]))
            if reasons:
                pytest.skip(f"{backend}: " + "; ".join(reasons))
        return [_kpt(c, None if backend == "auto" else backend) for c in calls]
    if impl == "eager_torch":
        return [functools.partial(eager_unfused, c) for c in calls]
    if impl == "torch_compile":
        return [functools.partial(_compiled, c) for c in calls]
    xn = [torch.randn_like(c.x) for c in calls]
    return [functools.partial(torch.mm, a, c.qkv_weight.t()) for a, c in zip(xn, calls)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_rmsnorm_qkv_rope(benchmark, cuda_only, case, impl):
    calls = _calls(case)
    fns = _impl_fns(impl, calls)
    try:
        kernel = graph_time_us(fns)
    except RuntimeError:
        torch.cuda.synchronize()
        kernel = event_time_us(fns)

    def one_call():
        fns[0]()
        torch.cuda.synchronize()

    benchmark.pedantic(one_call, rounds=30, iterations=1, warmup_rounds=3)
    latency = benchmark.stats.stats.median * 1e6
    backend = SPEC.choose(problem_of(calls[0]))[0].name if impl == "kpt_auto" else ""
    benchmark.extra_info.update(kernel_us=kernel, latency_us=latency, chosen=backend)
    label = f"{impl}[{backend}]" if backend else impl
    record(case, label, kernel_us=kernel, latency_us=latency)
