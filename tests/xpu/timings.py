"""CPU timings of the ``xpu`` backend's IPEX paths against kpt's reference backend, in one
process on the same calls (the ops' tuning hooks make them; dispatch is not timed):
``.venv-xpu/bin/python tests/xpu/timings.py``. Fastest of 9 alternating runs after a warm-up;
the table is what the IPEX modules' notes (kpt/backends/xpu/) and the CPU priorities rest on."""

from __future__ import annotations

import time

import torch

from kpt.backends.xpu import flash_attention as ipex_flash
from kpt.backends.xpu import rmsnorm_qkv_rope as ipex_fused
from kpt.ops.flash_attention import make_call as flash_call
from kpt.ops.flash_attention import reference as flash_reference
from kpt.ops.rmsnorm_qkv_rope import make_call as fused_call
from kpt.ops.rmsnorm_qkv_rope import reference as fused_reference


def best_ms(fn_a, fn_b, repeats: int = 9) -> tuple[float, float]:
    """The fastest of ``repeats`` runs of each of two functions, run alternately: the CPU is
    shared, and the fastest run is the one least disturbed by other jobs."""
    fn_a(), fn_b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return min(times[0]) * 1e3, min(times[1]) * 1e3


def cases():
    cpu = torch.device("cpu")
    for b, s, hq, hkv, d, dtype in [(1, 1024, 8, 2, 64, torch.bfloat16),
                                   (4, 256, 8, 2, 128, torch.bfloat16),
                                   (1, 64, 8, 2, 64, torch.bfloat16),
                                   (1, 1024, 8, 2, 64, torch.float32)]:
        shape = dict(batch=b, seqlen_q=s, seqlen_k=s, heads_q=hq, heads_kv=hkv, head_dim=d,
                     causal=True)
        call = flash_call(shape, dtype, cpu)
        yield (f"flash_attention causal B{b} S{s} H{hq}/{hkv} D{d} {str(dtype)[6:]}",
               lambda c=call: ipex_flash.run(c, {}), lambda c=call: flash_reference.run(c, {}))
    for tokens, hidden, hq, hkv, d, dtype in [(64, 4096, 32, 8, 128, torch.bfloat16),
                                              (1, 4096, 32, 8, 128, torch.bfloat16),
                                              (64, 4096, 32, 8, 128, torch.float16),
                                              (64, 2048, 16, 8, 128, torch.float32)]:
        shape = dict(tokens=tokens, hidden=hidden, num_q_heads=hq, num_kv_heads=hkv,
                     head_dim=d, residual=True, rope_theta=5e5)
        call = fused_call(shape, dtype, cpu)
        yield (f"rmsnorm_qkv_rope T{tokens} hidden {hidden} H{hq}/{hkv} D{d} "
               f"{str(dtype)[6:]}",
               lambda c=call: ipex_fused.run(c, {}), lambda c=call: fused_reference.run(c, {}))


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':60s} {'ipex ms':>9s} {'ref ms':>9s} {'speed-up':>8s}")
    for name, ipex, reference in cases():
        a, b = best_ms(ipex, reference)
        print(f"{name:60s} {a:9.2f} {b:9.2f} {b / a:7.2f}x")


if __name__ == "__main__":
    main()
