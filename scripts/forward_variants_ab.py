"""Interleaved A/B of the sm90 forward variants on one GPU (GPU machine only).

Rows of one kernel measured minutes apart in the benchmark differ by up to ~10% on the H200
(its clock moves with power and temperature), so this times the named variants alternately,
three rounds each in A B B A A B order, in one process, and prints the medians per case:

  python scripts/forward_variants_ab.py overlap persistent dynamic cudnn

``triton`` is kpt's Triton forward (its first config); ``cudnn`` is torch's SDPA with the
cuDNN backend on (B, H, S, D) copies of the same inputs (cases without a window or soft cap);
``KPT_AB_CASES=B4S4096,B8S2048D64c`` limits the cases; ``KPT_AB_SLEEP=2`` idles the GPU that
many seconds before each measurement (below its power limit the clock stays high, and
differences in instruction count show that a sustained load's lower clock hides).
``KPT_AB_ROUNDS`` (default 3) and ``KPT_AB_CALLS`` (launches per timed graph, default 5) set how
many alternating rounds run and how long each measurement lasts: at B4 S4096 one launch takes
~1.7 ms, so ``KPT_AB_CALLS=40`` measures a third of a second of sustained load, at the clock
the power limit allows. ``VARIANT@DIR`` times a variant built from another source tree (a
copy of ``csrc/``, DIR relative to the repository, through ``KPT_CSRC_DIR``), so that a kernel
change is compared with the build before it in one process:

  python scripts/forward_variants_ab.py dynamic@old/csrc dynamic

``bwd`` (also ``bwd@DIR``) is the sm90 backward (prep, kernel and dQ cast) on the same case,
reported in backward TFLOP/s (2.5x the forward's FLOPs).
"""
from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # kpt and bench from this checkout

CASES = [  # label, B, H, S, D, causal, window_left, softcap
    ("B4S4096", 4, 32, 4096, 128, False, -1, 0.0),
    ("B4S4096c", 4, 32, 4096, 128, True, -1, 0.0),
    ("B4win1024", 4, 32, 4096, 128, True, 1024, 0.0),
    ("B4S4096soft", 4, 32, 4096, 128, False, -1, 30.0),
    ("B1S16384", 1, 32, 16384, 128, False, -1, 0.0),
    ("B1S16384c", 1, 32, 16384, 128, True, -1, 0.0),
    ("B8S2048", 8, 32, 2048, 128, False, -1, 0.0),
    ("B2S8192win", 2, 32, 8192, 128, True, 1024, 0.0),
    ("B8S2048D64", 8, 16, 2048, 64, False, -1, 0.0),
    ("B8S2048D64c", 8, 16, 2048, 64, True, -1, 0.0),
]


def main() -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.conftest import graph_time_us
    from kpt.ops.flash_attention import BackwardCall, Call, _sm90, _triton, problem_of

    variants = sys.argv[1:] or ["overlap", "persistent"]
    trees = sorted({os.path.join(ROOT, n.partition("@")[2]) for n in variants if "@" in n})
    builds = [subprocess.Popen([sys.executable, "-c", "from kpt.ops.flash_attention import "
                                "_sm90; _sm90.SPEC.load()"], cwd=ROOT,
                               env=dict(os.environ, **({"KPT_CSRC_DIR": t} if t else {})))
              for t in trees + [""]]  # every tree's build, and this checkout's, in parallel
    if any(b.wait() for b in builds):
        sys.exit("a build failed")
    only = [c for c in os.environ.get("KPT_AB_CASES", "").split(",") if c]
    for label, b, h, s, d, causal, left, softcap in CASES:
        if only and label not in only:
            continue
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        out = torch.empty_like(q)
        lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        call = Call(q, k, v, None, None, s, s, d ** -0.5, left, 0 if causal else -1, softcap,
                    out, lse)
        _sm90.run(call, {"impl": "sm90"})  # out and lse for the backward
        bcall = BackwardCall(torch.randn_like(q), None, q, k, v, out.clone(), lse.clone(), None,
                             None, s, s, d ** -0.5, left, 0 if causal else -1, softcap, False,
                             torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        # Visible (query, key) pairs: query i sees min(i + 1, left + 1) keys when causal.
        pairs = (sum(min(i + 1, left + 1) if left >= 0 else i + 1 for i in range(s))
                 if causal else s * s)
        flops = 4 * b * h * pairs * d
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))

        def cudnn(qt=qt, kt=kt, vt=vt, causal=causal):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt,
                                                                        is_causal=causal)

        triton_config = _triton.configs(problem_of(call))[0]
        names = [n for n in variants if n != "cudnn" or (left < 0 and softcap == 0.0)]
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(int(os.environ.get("KPT_AB_ROUNDS", "3"))):
            for name in names if rep % 2 == 0 else names[::-1]:
                if name == "cudnn":
                    fn = cudnn
                elif name == "triton":
                    fn = functools.partial(_triton.run, call, triton_config)
                else:
                    variant, _, tree = name.partition("@")
                    fn = (functools.partial(_sm90.run_backward, bcall, {"impl": "sm90"})
                          if variant == "bwd" else
                          functools.partial(_sm90.run, call, {"impl": "sm90", "variant": variant}))
                    if tree:
                        fn = functools.partial(_in_tree, os.path.join(ROOT, tree), fn)
                time.sleep(float(os.environ.get("KPT_AB_SLEEP", "0")))
                times[name].append(graph_time_us(  # KPT_AB_CALLS sets the load: no warm-up
                    [fn], calls=int(os.environ.get("KPT_AB_CALLS", "5")), replays=5,
                    warmup_ms=0.0, window_ms=0.0))

        def tflops(name: str, us: float, flops: float = flops) -> float:
            return flops * (2.5 if name.startswith("bwd") else 1.0) / us / 1e6

        row = "  ".join(f"{name} {statistics.median(t):7.0f} us "
                        f"{tflops(name, statistics.median(t)):4.0f} TFLOP/s"
                        for name, t in times.items())
        print(f"{label:<12} {row}", flush=True)
        del q, k, v, out, lse, call, bcall, qt, kt, vt
        torch.cuda.empty_cache()


def _in_tree(tree: str, fn):
    """fn() with kpt's JIT loading from the sources in ``tree`` (a separately cached build)."""
    before = os.environ.get("KPT_CSRC_DIR")
    os.environ["KPT_CSRC_DIR"] = tree
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["KPT_CSRC_DIR"]
        else:
            os.environ["KPT_CSRC_DIR"] = before


if __name__ == "__main__":
    main()
