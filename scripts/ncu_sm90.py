"""Run the sm90 flash-attention kernels once each for Nsight Compute (GPU machine only).

  python scripts/ncu_sm90.py CASE [CASE ...]   CASE: bwd, bwdc, fwd, fwdc (B4 H32 S4096 D128),
                                               fwdw (the same, causal window 1024),
                                               bwd64c, fwd64, fwd64c (B8 H16 S2048 D64)

KPT_NCU_VARIANT names the forward variant (default "overlap").

Each case runs twice (the first is a warm-up that ncu skips with --launch-skip).
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    import torch

    from kpt.ops.flash_attention import BackwardCall, Call, _sm90

    _sm90.SPEC.load()
    for case in sys.argv[1:]:
        b, h, s, d = (8, 16, 2048, 64) if "64" in case else (4, 32, 4096, 128)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16,
                                     generator=gen) for _ in range(4))
        causal = case.endswith(("c", "w"))
        left = 1024 if case.endswith("w") else -1
        out = torch.empty_like(q)
        lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        variant = os.environ.get("KPT_NCU_VARIANT", "overlap")
        call = Call(q, k, v, None, None, s, s, d ** -0.5, left, 0 if causal else -1, 0.0, out,
                    lse)
        for _ in range(2):
            if case.startswith("fwd"):
                _sm90.run(call, {"impl": "sm90", "variant": variant})
        if case.startswith("bwd"):
            _sm90.run(call, {"impl": "sm90", "variant": variant})
            bc = BackwardCall(dout, None, q, k, v, out, lse, None, None, s, s, d ** -0.5, -1,
                              0 if causal else -1, 0.0, False, torch.empty_like(q),
                              torch.empty_like(k), torch.empty_like(v))
            for _ in range(2):
                _sm90.run_backward(bc, {"impl": "sm90"})
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
