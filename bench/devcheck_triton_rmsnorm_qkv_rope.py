"""One-call GPU check and timing of the Triton backend of rmsnorm_qkv_rope.

Correctness of the default config against the reference backend (fresh random data, outputs
NaN-poisoned) at T in 1, 3, 16, 17, 128, 4096 for a Llama-3-8B and a Qwen3 (q/k norm) layer;
then every config of ``configs()`` at T = 1, 16, 128, 4096, checked and timed against cuBLAS
(``torch.mm`` of the normalised rows by W.T alone). Small T is timed both with do_bench and as
CUDA-graph replays, rotating over three weight copies so that the 50 MB weight does not sit in
L2. Prints a table last; full results go to $OUT/devcheck_triton.json.

    KPT_AUTOTUNE=0 python bench/devcheck_triton.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kpt.ops.rmsnorm_qkv_rope import _triton as tri  # noqa: E402
from kpt.ops.rmsnorm_qkv_rope import check, clone_outputs, make_call, poison, problem_of  # noqa: E402
from kpt.ops.rmsnorm_qkv_rope import reference as ref  # noqa: E402

BUDGET_S = float(os.environ.get("DEVCHECK_BUDGET_S", "250"))
START = time.time()
DRY = not torch.cuda.is_available()  # CPU dry run of the script itself (TRITON_INTERPRET=1)
DEV = torch.device("cpu" if DRY else "cuda")
DTYPE = torch.bfloat16
LLAMA = dict(hidden=4096, num_q_heads=32, num_kv_heads=8, head_dim=128, rotary_dim=128,
             residual=True, neox=True, eps=1e-5, rope_theta=500000.0)
BIG_T = 4096
if DRY:
    LLAMA = dict(LLAMA, hidden=64, num_q_heads=2, num_kv_heads=1)
    BIG_T = 600
SHAPES = {"llama3-8b": LLAMA, "qwen3-8b": dict(LLAMA, qk_norm=True, eps=1e-6, rope_theta=1e6)}
ROTATE = 3  # weight copies cycled through when timing small T (3 x 50 MB > L2)
GRAPH_REPS = 30


def left() -> float:
    return BUDGET_S - (time.time() - START)


def short(cfg: dict) -> str:
    return (f"m{cfg['BLOCK_M']}p{cfg['BLOCK_P']}k{cfg['BLOCK_K']}s{cfg['SPLIT_K']}"
            f"w{cfg['num_warps']}st{cfg['num_stages']}-{cfg['stats']}")


def verify(shape: dict, tokens: int, cfg: dict, seed: int) -> str | None:
    call = make_call(dict(shape, tokens=tokens), DTYPE, DEV, seed)
    expected = clone_outputs(call)
    ref.run(expected, {})
    out = clone_outputs(call)
    poison(out)
    tri.run(out, cfg)
    if not DRY:
        torch.cuda.synchronize()
    return check(out, expected)


def timed(fns: list, graph: bool) -> float:
    """Median microseconds of one call, cycling through ``fns`` (different weight copies)."""
    if DRY:
        fns[0]()
        return 0.0
    state = {"i": 0}

    def step():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    if not graph:
        for _ in range(3):
            step()
        return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median") * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(GRAPH_REPS):
            fns[i % len(fns)]()
    ms = triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")
    return ms * 1e3 / GRAPH_REPS


def report(rows: list) -> None:
    """The table: every config's time and its ratio to cuBLAS alone (graph replay for T<=128)."""
    print(f"\n{'shape':10} {'T':>5} {'config':34} {'check':8} {'bench us':>9} {'graph us':>9} "
          f"{'x cuBLAS':>8}")
    ref_t: dict = {}
    for name, tokens, cfg, reason, t, tg in rows:
        small = tokens <= 128
        if cfg == "cuBLAS mm alone":
            ref_t[(name, tokens)] = tg if small else t
        best = tg if small else t
        base = ref_t[(name, tokens)]
        ratio = best / base if base > 0 else float("nan")  # zero only in the CPU dry run
        print(f"{name:10} {tokens:5d} {cfg:34} {reason[:8]:8} {t:9.1f} {tg:9.1f} {ratio:8.2f}")


def main() -> None:
    device = "cpu (dry run)" if DRY else torch.cuda.get_device_name()
    print(device, "torch", torch.__version__, "triton", triton.__version__)
    results: dict = {"correctness": [], "timing": []}
    # 1. Default configs against the reference at every regime boundary.
    for name, shape in SHAPES.items():
        for tokens in (1, 3, 16, 17, 128, BIG_T):
            probe = make_call(dict(shape, tokens=tokens), DTYPE, DEV)
            cfg = tri.configs(problem_of(probe))[0]
            try:
                reason = verify(shape, tokens, cfg, seed=tokens)
            except Exception as err:  # report and go on: one failure must not end the run
                reason = f"error: {type(err).__name__}: {err}"[:160]
            results["correctness"].append((name, tokens, short(cfg), reason or "ok"))
            print(f"check {name} T={tokens} {short(cfg)}: {reason or 'ok'}", flush=True)
    # 2. Every config, checked then timed, against cuBLAS alone.
    rows = []
    for name, shape in SHAPES.items():
        for tokens in (1, 16, 128, BIG_T):
            small = tokens <= 128
            calls = [make_call(dict(shape, tokens=tokens), DTYPE, DEV, seed=100 + i)
                     for i in range(ROTATE if small else 1)]
            xn = [ref.rms_norm(c.x if c.residual is None else c.x + c.residual, c.norm_weight,
                               c.eps) for c in calls]
            mm = [lambda a=a, c=c: torch.mm(a, c.qkv_weight.t()) for a, c in zip(xn, calls)]
            base = timed(mm, graph=False)
            base_g = timed(mm, graph=True) if small else float("nan")
            rows.append((name, tokens, "cuBLAS mm alone", "-", base, base_g))
            for cfg in tri.configs(problem_of(calls[0])):
                if left() < 15:
                    rows.append((name, tokens, short(cfg), "skipped: time", float("nan"),
                                 float("nan")))
                    continue
                try:
                    reason = verify(shape, tokens, cfg, seed=7) or "ok"
                    fns = [lambda c=c, cfg=cfg: tri.run(c, cfg) for c in calls]
                    t = timed(fns, graph=False)
                    tg = timed(fns, graph=True) if small else float("nan")
                except Exception as err:  # a config that fails must not end the run
                    reason, t, tg = f"error: {type(err).__name__}: {err}"[:120], float("nan"), \
                        float("nan")
                rows.append((name, tokens, short(cfg), reason, t, tg))
                print(f"time {name} T={tokens} {short(cfg)}: {reason} {t:.1f} us "
                      f"graph {tg:.1f} us", flush=True)
    results["timing"] = rows
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "devcheck_triton.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    report(rows)
    print(f"total {time.time() - START:.0f} s")


if __name__ == "__main__":
    main()
