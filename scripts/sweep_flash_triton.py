"""Sweep Triton flash-attention kernel variants on the benchmark shapes (GPU only).

For each shape of ``bench/attention-shapes.json`` (or ``--shapes``) and each candidate config
below, checks the config's outputs against the current default config's (the kernels' own
tolerance, ``kpt.ops._common.compare``) and times it by CUDA-graph replay
(``triton.testing.do_bench_cudagraph``). Kernels are compiled first in parallel worker
processes (Triton's on-disk cache then serves the timing process). Prints one line per
(shape, config): microseconds, TFLOP/s and the speedup over the default.

    python scripts/sweep_flash_triton.py [--shapes FILE] [--only fwd|bwd] [--workers N]

This chooses defaults and tuner candidates; it is not a benchmark against other libraries
(``bench/bench_flash_attention.py`` is).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import multiprocessing as mp
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _bwd(m1, n1, w1, s1, m2, n2, w2, s2, **extra):
    return {"BLOCK_M1": m1, "BLOCK_N1": n1, "WARPS1": w1, "STAGES1": s1,
            "BLOCK_M2": m2, "BLOCK_N2": n2, "WARPS2": w2, "STAGES2": s2, **extra}


def _fwd(bm, bn, w, s, **extra):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, **extra}


def candidates(kind: str, d: int) -> list[dict]:
    """First entry: the baseline the others are compared with (the current default)."""
    if kind == "fwd":
        if d <= 64:
            return [_fwd(128, 128, 4, 3, TMA=True), _fwd(128, 64, 4, 3, TMA=True)]
        return [_fwd(128, 128, 8, 3, TMA=True), _fwd(128, 64, 8, 3, TMA=True)]
    if d <= 64:
        base = _bwd(64, 64, 4, 3, 128, 64, 8, 3, TMA=True)
        return [base, _bwd(64, 128, 8, 3, 128, 64, 8, 3, TMA=True),
                _bwd(32, 64, 4, 3, 64, 64, 4, 3, TMA=True)]
    base = _bwd(64, 128, 8, 3, 128, 64, 8, 3, TMA=True)
    return [base, _bwd(64, 64, 4, 2, 64, 64, 4, 2, TMA=True),
            _bwd(32, 64, 4, 3, 64, 64, 4, 3, TMA=True), _bwd(32, 64, 4, 2, 64, 64, 4, 2)]


def _calls(shape: dict, kind: str):
    fa = importlib.import_module("kpt.ops.flash_attention")
    dev = torch.device("cuda")
    if kind == "fwd":
        return fa.make_call(shape, torch.bfloat16, dev, 1)
    return fa.make_backward_call(shape, torch.bfloat16, dev, 1)


def _runner(kind: str):
    from kpt.ops.flash_attention import _triton
    return _triton.run if kind == "fwd" else _triton.run_backward


def _outputs(call, kind: str) -> list[torch.Tensor]:
    return [call.out, call.lse] if kind == "fwd" else [call.dq, call.dk, call.dv]


def _compile(job) -> str:
    """Worker: run one (shape, kind, config) once so that Triton's disk cache has it."""
    shape, kind, config = job
    try:
        call = _calls(shape, kind)
        _runner(kind)(call, config)
        torch.cuda.synchronize()
        return ""
    except Exception as err:  # reported, the sweep goes on
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def _flops(shape: dict, kind: str) -> float:
    b, h, sq, sk, d = (shape[k] for k in ("batch", "heads_q", "seqlen_q", "seqlen_k",
                                           "head_dim"))
    f = 4.0 * b * h * sq * sk * d
    if shape.get("causal"):
        f /= 2
    return f * (2.5 if kind == "bwd" else 1.0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=str(ROOT / "bench" / "attention-shapes.json"))
    ap.add_argument("--only", choices=["fwd", "bwd"])
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--head-dim", type=int, help="only shapes of this head dim")
    ap.add_argument("--skip", default="window_left,softcap",
                    help="shape keys whose presence drops the shape (comma list)")
    args = ap.parse_args()
    import triton

    from kpt.ops._common import compare
    from kpt.ops.flash_attention import BACKWARD_TOLERANCE, TOLERANCE

    skip = [k for k in args.skip.split(",") if k]
    shapes = [s for s in json.loads(Path(args.shapes).read_text())
              if not any(s.get(k) for k in skip)
              and args.head_dim in (None, s["head_dim"])]
    kinds = [args.only] if args.only else ["fwd", "bwd"]
    jobs = [(s, kind, c) for kind in kinds for s in shapes
            for c in candidates(kind, s["head_dim"])]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        errors = pool.map(_compile, jobs, chunksize=1)
    failed = {i: e for i, e in enumerate(errors) if e}
    print(f"compiled {len(jobs) - len(failed)}/{len(jobs)} variants")
    rows = []
    for i, (shape, kind, config) in enumerate(jobs):
        name = (f"{kind} B{shape['batch']} H{shape['heads_q']} S{shape['seqlen_q']} "
                f"D{shape['head_dim']}{' causal' if shape.get('causal') else ''}")
        cfg = ",".join(f"{k}={v}" for k, v in config.items())
        if i in failed:
            rows.append((name, cfg, None, None, failed[i]))
            continue
        call = _calls(shape, kind)
        run = _runner(kind)
        base_cfg = candidates(kind, shape["head_dim"])[0]
        if config == base_cfg:
            run(call, config)
            baseline = [t.clone() for t in _outputs(call, kind)]
            base_us = None
        tol = (TOLERANCE if kind == "fwd" else BACKWARD_TOLERANCE)[torch.bfloat16]
        for t in _outputs(call, kind):
            t.fill_(float("nan"))
        run(call, config)
        reason = None
        for got, want in zip(_outputs(call, kind), baseline):
            if got.dtype == torch.float32 and want.dtype == torch.float32:  # lse
                finite = torch.isfinite(want)
                bad = (got[finite] - want[finite]).abs().max().item() > 1e-3
                reason = reason or ("lse differs" if bad else None)
            else:
                # twice the kernels' tolerance: both sides carry their own rounding
                reason = reason or compare(name, got, want, 2 * tol)
        us = 1e3 * triton.testing.do_bench_cudagraph(functools.partial(run, call, config), rep=200)
        if config == base_cfg:
            base_us = us
        rows.append((name, cfg, us, base_us / us, reason or "ok"))
        tf = _flops(shape, kind) / us / 1e6
        print(f"{name:38s} {us:9.1f} us {tf:6.1f} TF/s x{base_us / us:5.2f} "
              f"{reason or 'ok':4s} {cfg}", flush=True)
        call = None
        torch.cuda.empty_cache()
    for name, cfg, us, _, err in rows:
        if us is None:
            print(f"{name:38s} FAILED {cfg}: {err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
