"""GPU check of the cuda backend of rmsnorm_qkv_rope: build, correctness, timing table.

Run from the repository root on a CUDA machine::

    KPT_AUTOTUNE=0 PYTHONPATH=. python bench/devcheck_cuda_rmsnorm_qkv_rope.py

1. builds the extension (kpt.jit);
2. checks every config of the cuda backend against the reference backend on fresh random
   inputs (outputs poisoned with NaN first; each run repeated and compared bit for bit to catch
   races) for Llama-3-8B at several token counts and for Qwen3 (q/k norm), gptj with partial
   rotary, bias, and a neox partial rotary whose halves do not fall on 8-element vectors;
3. measures the copy bandwidth and times, with CUDA-graph replay of 100 calls (weights rotated
   over four copies so that L2 does not hold them) and with plain events, the whole kpt op
   against cuBLAS's QKV GEMM alone, plus the three kpt stages on their own.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from kpt.ops.rmsnorm_qkv_rope import (
    _cuda,
    check,
    clone_outputs,
    make_call,
    poison,
    problem_of,
    rmsnorm_qkv_rope,
)
from kpt.ops.rmsnorm_qkv_rope import reference as ref

DEV = torch.device("cuda")
LLAMA = dict(hidden=4096, num_q_heads=32, num_kv_heads=8, head_dim=128, rotary_dim=128,
             residual=True, neox=True, eps=1e-5, rope_theta=500000.0)
CASES = [
    ("llama3-8b", LLAMA, (1, 3, 16, 17, 128, 4096), (torch.bfloat16, torch.float16)),
    ("qwen3-8b qk-norm", dict(LLAMA, qk_norm=True, eps=1e-6, rope_theta=1e6), (1, 16, 300),
     (torch.bfloat16,)),
    ("gptj rd=64 bias", dict(hidden=2048, num_q_heads=16, num_kv_heads=4, head_dim=128,
                             rotary_dim=64, neox=False, bias=True), (1, 5, 64),
     (torch.bfloat16, torch.float16)),
    ("neox D=96 rd=24 bias", dict(hidden=1024, num_q_heads=8, num_kv_heads=8, head_dim=96,
                                  rotary_dim=24, neox=True, bias=True, residual=True),
     (2, 31, 40), (torch.bfloat16,)),
    ("qwen2 D=64 bias", dict(hidden=896, num_q_heads=14, num_kv_heads=2, head_dim=64,
                             rotary_dim=64, bias=True, residual=True), (1, 7), (torch.float16,)),
]
TIMED_TOKENS = (1, 16, 128, 4096)


def outputs(call):
    outs = [call.q, call.k, call.v]
    return outs + ([call.residual_out] if call.residual_out is not None else [])


def correctness() -> int:
    failures = 0
    for name, shape, token_counts, dtypes in CASES:
        for dtype in dtypes:
            for tokens in token_counts:
                call = make_call(dict(shape, tokens=tokens), dtype, DEV, seed=tokens + 7)
                # Positions up to 2e5: large RoPE angles need accurate sin/cos.
                call.positions = torch.randint(0, 200_000, (tokens,), device=DEV)
                expected = clone_outputs(call)
                ref.run(expected, {})
                for config in _cuda.configs(problem_of(call)):
                    runs = []
                    for _ in range(2):
                        got = clone_outputs(call)
                        poison(got)
                        _cuda.run_cuda(got, config)
                        runs.append(got)
                    torch.cuda.synchronize()
                    reason = check(runs[0], expected)
                    same = all(torch.equal(a, b) for a, b in
                               zip(outputs(runs[0]), outputs(runs[1])))
                    err = (runs[0].q.double() - expected.q.double()).norm() / \
                        expected.q.double().norm()
                    status = "ok" if reason is None and same else "FAIL"
                    failures += status != "ok"
                    print(f"{status:4} {name:22} {str(dtype)[6:]:8} T={tokens:<5} q rel err "
                          f"{err:.2e} deterministic={same} {config}"
                          + (f"  <- {reason}" if reason else ""))
    return failures


def graph_us(fn, reps: int = 100, trials: int = 10) -> float:
    """Median time per call of ``fn(i)`` replayed from one CUDA graph of ``reps`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def eager_us(fn, reps: int = 100, trials: int = 5) -> float:
    """Median time per call of ``reps`` back-to-back eager calls (launch overhead included)."""
    for i in range(3):
        fn(i)
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(reps):
            fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second. Eager on purpose: captured in a
    graph, copy_ becomes a copy-engine memcpy node (2.7 TB/s measured, not the SMs' 4.3)."""
    a = torch.randn(256 * 2**20, device=DEV)  # 1 GiB
    b = torch.empty_like(a)
    us = eager_us(lambda i: b.copy_(a), reps=10, trials=5)
    return 2 * a.numel() * 4 / (us * 1e-6)


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def time_tokens(module, tokens: int, bw: float) -> str:
    """One table row: Llama-3-8B shapes, bf16, with residual, at ``tokens`` tokens."""
    hidden, n = LLAMA["hidden"], (32 + 2 * 8) * 128
    base = make_call(dict(LLAMA, tokens=tokens), torch.bfloat16, DEV, seed=1)
    weights = [base.qkv_weight] + [torch.randn_like(base.qkv_weight) * hidden**-0.5
                                   for _ in range(3)]
    pos, x, res, nw = base.positions, base.x, base.residual, base.norm_weight

    def kpt_call(i):
        return rmsnorm_qkv_rope(x, nw, weights[i % 4], pos, num_q_heads=32, num_kv_heads=8,
                                head_dim=128, eps=1e-5, rope_theta=500000.0, residual=res,
                                backend="cuda")

    xn = torch.randn(tokens, hidden, device=DEV, dtype=torch.bfloat16)

    def cublas(i):
        return torch.mm(xn, weights[i % 4].t())

    # The three stages alone, as the default config runs them. The stream is read at each call:
    # under graph capture it is the capture stream, not the one current outside.
    config = _cuda.configs(problem_of(base))[0]
    res_out, xn_out = torch.empty_like(res), torch.empty_like(xn)
    gemv = tokens <= config["gemv_max_tokens"]
    splits = _cuda._auto_splits(n, hidden, tokens, 64, _cuda._sm_count(0))
    if gemv:
        ws = torch.randn(splits, tokens, n, device=DEV)
    else:
        ws = torch.randn(tokens, n, device=DEV, dtype=torch.bfloat16)
    q, k, v = (torch.empty(tokens, h, 128, device=DEV, dtype=torch.bfloat16) for h in (32, 8, 8))

    def norm(i):
        module.add_rmsnorm(x, res, res_out, nw, xn_out, 1e-5, stream())

    def proj(i):
        if gemv:
            module.gemv(xn, weights[i % 4], ws, module.GEMV_MMA, 1, stream())
        else:
            torch.mm(xn, weights[i % 4].t(), out=ws)

    def epi(i):
        module.epilogue(ws, None, None, None, pos, base.inv_freq, q, k, v, 128, 1e-5, True,
                        stream())

    floor_bytes = tokens * hidden * 2 * 3 + n * hidden * 2 + tokens * n * 2
    floor_us = max(floor_bytes / bw, 2 * tokens * n * hidden / 788e12) * 1e6
    kg, cg = graph_us(kpt_call), graph_us(cublas)
    ke, ce = eager_us(kpt_call), eager_us(cublas)
    st = [graph_us(f) for f in (norm, proj, epi)]
    return (f"{tokens:>5} {splits if gemv else 0:>6} {floor_us:>9.1f} {kg:>10.1f} {cg:>13.1f} "
            f"{kg / cg:>6.2f} {ke:>10.1f} {ce:>13.1f} {st[0]:>6.1f} {st[1]:>7.1f} {st[2]:>6.1f}")


def timing(module) -> list[str]:
    bw = copy_bandwidth()
    rows = [f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write); matrix rate taken as 788 "
            "TFLOP/s (KINDS.md, bf16 8192^3 on random data)",
            f"{'T':>5} {'splits':>6} {'floor us':>9} {'kpt graph':>10} {'cuBLAS graph':>13} "
            f"{'ratio':>6} {'kpt eager':>10} {'cuBLAS eager':>13} {'norm':>6} {'proj':>7} "
            f"{'epi':>6}"]
    rows += [time_tokens(module, tokens, bw) for tokens in TIMED_TOKENS]
    return rows


def main() -> int:
    print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(),
          torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
    start = time.perf_counter()
    module = _cuda.SPEC.load()
    print(f"built/loaded {module.__name__} in {time.perf_counter() - start:.1f} s")
    failures = correctness()
    rows = timing(module)
    print(f"\ncorrectness failures: {failures}")
    print("Llama-3-8B QKV (hidden 4096, N 6144), bf16, residual; times in us per call")
    print("\n".join(rows))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
