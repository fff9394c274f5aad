"""Build-switch experiments on the sm90 flash-attention kernels (GPU machine only).

Each variant is a copy of csrc/ (or of the tree given by ``src=DIR``, relative to the repo)
with macros defined at the top of the sm90 kernel sources; all variants build in parallel
(kpt's JIT, ``KPT_CSRC_DIR``), then each runs in its own process: a correctness check against
the reference on odd shapes (skipped with ``nocheck``, for builds that drop work on purpose),
then the dispatched forward and the sm90 backward (prep + kernel + post, CUDA-graph replay) on
the cases below, with Triton's backward timed next to the first variant. A table comes last.

  python scripts/kernel_variants.py base= dqfirst=SOME_MACRO probe=A_MACRO=2,nocheck \
      old=src=path/to/other/csrc

``KPT_EXP_CASES=B4S4096,B2S8192c`` limits the cases; ``KPT_EXP_FWD_ONLY=1`` times only the
forward; ``KPT_EXP_FWD_VARIANTS=overlap,dynamic`` times those sm90 forward variants instead of
the dispatched forward. The switches themselves live in the
kernel sources only while an experiment runs (SM90_NOTES.md records the outcomes).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # kpt, bench and tests from this checkout
WINDOW = 1024
CASES = [  # name, B, H, S, D, mask: False (full), True (causal) or "window" (causal, 1024 left)
    ("B4S4096", 4, 32, 4096, 128, False),
    ("B4S4096c", 4, 32, 4096, 128, True),
    ("B4win1024", 4, 32, 4096, 128, "window"),
    ("B1S16384", 1, 32, 16384, 128, False),
    ("B1S16384c", 1, 32, 16384, 128, True),
    ("B8S2048D64", 8, 16, 2048, 64, False),
    ("B8S2048D64c", 8, 16, 2048, 64, True),
    ("B2S8192", 2, 32, 8192, 128, False),
    ("B2S8192c", 2, 32, 8192, 128, True),
    ("B8S2048", 8, 32, 2048, 128, False),
    ("B8S2048c", 8, 32, 2048, 128, True),
    ("B16S1024", 16, 32, 1024, 128, False),
    ("B16S1024c", 16, 32, 1024, 128, True),
    ("B32S512c", 32, 32, 512, 128, True),
    ("B16S1024D64", 16, 16, 1024, 64, False),
    ("B16S1024D64c", 16, 16, 1024, 64, True),
    ("B8S2048win", 8, 32, 2048, 128, "window"),
]
if os.environ.get("KPT_EXP_CASES"):
    CASES = [c for c in CASES if c[0] in os.environ["KPT_EXP_CASES"].split(",")]


def prepare(name: str, flags: list[str]) -> str:
    dst = os.path.join(tempfile.gettempdir(), "kpt-variants", name, "csrc")
    shutil.rmtree(dst, ignore_errors=True)
    src_dir = [f[4:] for f in flags if f.startswith("src=")]
    flags = [f for f in flags if not f.startswith("src=")]
    shutil.copytree(os.path.join(ROOT, src_dir[0]) if src_dir else os.path.join(ROOT, "csrc"),
                    dst)
    defs = "".join(f"#define {f.replace('=', ' ')}\n" for f in flags)
    for name_ in ("kernels_bwd.cu", "kernels_overlap.cu"):
        path = os.path.join(dst, "flash_attention_sm90", name_)
        src = open(path).read()
        lines = src.split("\n", 1)  # keep the kpt-targets line first
        open(path, "w").write(lines[0] + "\n" + defs + lines[1])
    return dst


def _check(name: str) -> None:
    """Backward and forward against the reference on odd shapes, both half dtypes."""
    import torch

    from kpt.ops import flash_attention
    from kpt.ops._common import compare
    from kpt.ops.flash_attention import (
        TOLERANCE,
        _sm90,
        clone_backward_outputs,
        make_backward_call,
    )
    from kpt.ops.flash_attention import _reference as ref
    from tests.ops.grad_checks import compare_grad

    dev = torch.device("cuda")
    bad = 0
    for shape in (dict(batch=2, seqlen_q=1000, seqlen_k=777, heads_q=4, heads_kv=2,
                       head_dim=128, causal=True),
                  dict(batch=1, seqlen_q=517, seqlen_k=1100, heads_q=3, heads_kv=3,
                       head_dim=128),
                  dict(batch=1, seqlen_q=333, seqlen_k=700, heads_q=2, heads_kv=1,
                       head_dim=128, softcap=5.0),
                  dict(batch=2, seqlen_q=300, seqlen_k=500, heads_q=4, heads_kv=4,
                       head_dim=64, causal=True, window_left=100)):
        for dtype in (torch.bfloat16, torch.float16):
            call = make_backward_call(shape, dtype, dev, seed=3)
            expected = clone_backward_outputs(call)
            ref.run_backward(expected, {})
            for t in (call.dq, call.dk, call.dv):
                t.fill_(float("nan"))
            _sm90.run_backward(call, {"impl": "sm90"})
            torch.cuda.synchronize()
            for grad, other in (("dq", call.k), ("dk", call.q), ("dv", call.q)):
                failure = compare_grad(grad, getattr(call, grad), getattr(expected, grad),
                                       dout=call.dout, v=call.v, other=other,
                                       scale=abs(call.scale))
                if failure:
                    bad += 1
                    print(f"[{name}] CHECK FAIL {shape} {dtype}: {failure}", flush=True)
    for b, sq, sk, h, hk, d, causal in ((2, 1000, 777, 4, 2, 128, True),
                                        (1, 1500, 1500, 3, 3, 128, True),
                                        (2, 700, 900, 4, 4, 64, True),
                                        (1, 517, 1100, 2, 1, 128, False)):
        for dtype in (torch.bfloat16, torch.float16):
            q = torch.randn(b, sq, h, d, device=dev, dtype=dtype)
            k = torch.randn(b, sk, hk, d, device=dev, dtype=dtype)
            v = torch.randn(b, sk, hk, d, device=dev, dtype=dtype)
            out = flash_attention(q, k, v, causal=causal, backend="cuda")
            expected = flash_attention(q.float(), k.float(), v.float(), causal=causal,
                                       backend="reference").to(dtype)
            failure = compare("fwd", out, expected, TOLERANCE[dtype])
            if failure:
                bad += 1
                print(f"[{name}] FWD CHECK FAIL {b, sq, sk, causal, dtype}: {failure}",
                      flush=True)
    print(f"[{name}] check: {'ok' if bad == 0 else f'{bad} failures'}", flush=True)


def _time_case(name: str, case: tuple, with_triton: bool) -> None:
    import functools

    import torch

    from bench.conftest import graph_time_us
    from kpt.ops import flash_attention
    from kpt.ops.flash_attention import BackwardCall, _sm90, _triton, backward_problem_of

    label, b, h, s, d, mask = case
    causal = bool(mask)
    left = WINDOW if mask == "window" else -1
    window = (WINDOW, 0) if mask == "window" else (-1, -1)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16,
                                 generator=gen) for _ in range(4))
    with torch.no_grad():
        out, lse = flash_attention(q, k, v, causal=causal, window=window, return_lse=True)
    # Visible (query, key) pairs: query i sees min(i + 1, left + 1) keys when causal.
    pairs = sum(min(i + 1, left + 1) if left >= 0 else i + 1 for i in range(s)) if causal \
        else s * s
    fwd_flops = 4 * b * h * pairs * d
    fwd_variants = [x for x in os.environ.get("KPT_EXP_FWD_VARIANTS", "").split(",") if x]
    if fwd_variants:  # the named sm90 forward variants instead of the dispatched forward
        from kpt.ops.flash_attention import Call

        fwd_call = Call(q, k, v, None, None, s, s, d ** -0.5, left, 0 if causal else -1, 0.0,
                        torch.empty_like(q), torch.empty_like(lse))
        for variant in fwd_variants:
            fn = functools.partial(_sm90.run, fwd_call, {"impl": "sm90", "variant": variant})
            us = graph_time_us([fn], calls=5, replays=5)
            print(f"ROW {label}:fwd {name}/{variant} {us:.0f} {fwd_flops / us / 1e6:.0f}",
                  flush=True)
    else:
        with torch.no_grad():
            us = graph_time_us([functools.partial(flash_attention, q, k, v, causal=causal,
                                                  window=window, backend="cuda")],
                               calls=5, replays=5)
        print(f"ROW {label}:fwd {name} {us:.0f} {fwd_flops / us / 1e6:.0f}", flush=True)
    if os.environ.get("KPT_EXP_FWD_ONLY") == "1":
        return

    def backward_call() -> BackwardCall:
        return BackwardCall(dout, None, q, k, v, out, lse, None, None, s, s, d ** -0.5, left,
                            0 if causal else -1, 0.0, False, torch.empty_like(q),
                            torch.empty_like(k), torch.empty_like(v))

    runs = [(name, functools.partial(_sm90.run_backward, backward_call(), {"impl": "sm90"}))]
    if with_triton:
        call = backward_call()
        config = _triton.backward_configs(backward_problem_of(call))[0]
        runs.append(("triton", functools.partial(_triton.run_backward, call, config)))
    for who, fn in runs:
        us = graph_time_us([fn], calls=3, replays=5)
        print(f"ROW {label} {who} {us:.0f} {2.5 * fwd_flops / us / 1e6:.0f}", flush=True)


def run_one(name: str, check: bool, with_triton: bool) -> None:
    import torch

    from kpt.ops.flash_attention import _sm90

    _sm90.SPEC.load()
    if check:
        _check(name)
    for case in CASES:
        _time_case(name, case, with_triton)
        torch.cuda.empty_cache()


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "--run":
        run_one(sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1")
        return
    variants = []
    for arg in sys.argv[1:]:
        name, _, flags = arg.partition("=")
        flags = [f for f in flags.split(",") if f]
        check = "nocheck" not in flags
        flags = [f for f in flags if f != "nocheck"]
        variants.append((name, prepare(name, flags), check))
    env = dict(os.environ)
    builds = []
    t0 = time.time()
    for _, csrc, _ in variants:
        e = dict(env, KPT_CSRC_DIR=csrc)
        builds.append(subprocess.Popen(
            [sys.executable, "-c", "from kpt.ops.flash_attention import _sm90; _sm90.SPEC.load()"],
            env=e, cwd=ROOT))
    for p in builds:
        p.wait()
    print(f"builds: {time.time() - t0:.0f} s", flush=True)
    rows = []
    for i, (name, csrc, check) in enumerate(variants):
        e = dict(env, KPT_CSRC_DIR=csrc)
        r = subprocess.run([sys.executable, __file__, "--run", name, "1" if check else "0",
                            "1" if i == 0 else "0"], env=e, cwd=ROOT, capture_output=True,
                           text=True)
        sys.stdout.write(r.stdout[-3000:])
        if r.returncode:
            sys.stdout.write(r.stderr[-3000:])
        rows += [ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("ROW ")]
    print("\ncase        variant        us   TFLOP/s")
    for case, name, us, tf in rows:
        print(f"{case:<11} {name:<12} {us:>7} {tf:>6}")


if __name__ == "__main__":
    main()
