"""Host time per eager call of kpt's public functions against torch calls of the same problem.

Small calls are bound by the host: the GPU finishes each kernel before the next launch is
issued, so back-to-back calls measure what Python, dispatch and the launch cost. For each row
this times ``CALLS`` back-to-back eager calls (best of ``REPEATS`` runs: the host of a shared
machine is noisy, the best run is the least disturbed) and prints the host time per call (the
loop alone) and the total (after a final synchronise). The ratios are the targets of the
per-call path:

* ``flash``: ``flash_attention(q, k, v, causal=True)`` on (B, S, H, D) against
  ``F.scaled_dot_product_attention`` on the same data as (B, H, S, D) views, torch's default
  backend choice (target: kpt <= 1.3x SDPA's host time). Also the chosen backend named
  (``backend=``) and the custom op ``torch.ops.kpt.flash_attention`` (what torch.compile calls).
* ``rmsnorm``: ``rmsnorm_qkv_rope`` on Llama-3-8B shapes (hidden 4096, 32/8 heads, head dim
  128) against the bare ``x @ W.T`` of its QKV GEMM (target: kpt <= 1.5x), and the unfused
  eager PyTorch chain it replaces (HF's RMSNorm, one GEMM, RoPE).
* ``paged``: ``paged_attention`` decode (B16, 2048 keys in 16-token pages, 32/8 heads, head
  dim 128) against SDPA decode on the same keys stored contiguously, and ``Plan.run`` (the
  per-layer call of the plan/run split).
* ``flex``: ``flex_attention`` with a causal 1024-key sliding window against torch's compiled
  flex_attention (guards included).
* ``cascade``: ``cascade_attention`` on its benchmark shape against the naive paged batch
  (every request's own copy of the shared pages in its table), dispatch's choice and Triton.

``auto - direct`` is the dispatch's own cost: the default call minus the same call naming the
backend dispatch chose (target: within 5 us).

``KPT_HOST_PROFILE=1`` also runs each case's ``kpt`` row under cProfile and prints the functions
with the most own time (where the host time goes).

GPU machine only. ``KPT_HOST_PARTS`` picks parts (default ``flash,rmsnorm,paged``); with ``OUT`` set
the table is also written to ``$OUT/host.md``.

  python scripts/host_latency.py
"""
from __future__ import annotations

import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)  # after PYTHONPATH: a kpt tree named there is the one timed

CALLS, REPEATS = 400, 7
FLASH_SHAPES = [(1, 128), (1, 1024), (8, 512)]  # (batch, seqlen); 32 heads, head dim 128, bf16
RMSNORM_TOKENS = [1, 16, 128]
WINDOW = 1024


def per_call_us(fn, calls: int = CALLS, repeats: int = REPEATS) -> tuple[float, float]:
    """Host and total microseconds per call of ``fn``."""
    import torch

    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best_host = best_total = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
        best_host = min(best_host, host)
        best_total = min(best_total, (time.perf_counter() - start) / calls * 1e6)
    return best_host, best_total


def flash_rows() -> list[tuple[str, dict, str]]:
    """(case, {row: fn}, baseline row) per shape."""
    import torch
    import torch.nn.functional as F

    from kpt.ops import flash_attention
    from kpt.ops.flash_attention import SPEC

    heads, head_dim = 32, 128
    cases = []
    for batch, seqlen in FLASH_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda",
                               dtype=torch.bfloat16, generator=gen) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        SPEC.clear_cache()
        flash_attention(q, k, v, causal=True)  # warm: builds, dispatch decision
        chosen, config = _chosen(SPEC, "flash_attention")
        fns = {
            "sdpa": functools.partial(F.scaled_dot_product_attention, qt, kt, vt,
                                      is_causal=True),
            "kpt": functools.partial(flash_attention, q, k, v, causal=True),
            f"kpt backend={chosen}": functools.partial(flash_attention, q, k, v, causal=True,
                                                       backend=chosen),
            "kpt custom op": functools.partial(
                torch.ops.kpt.flash_attention, q, k, v, None, None, seqlen, seqlen,
                head_dim ** -0.5, -1, 0, 0.0, False, False, ""),
        }
        if config.get("impl") == "sm90":  # the binding alone: what C++ and the launch cost
            from kpt.ops.flash_attention import _sm90

            out = torch.empty_like(q)
            lse = torch.empty(batch, heads, seqlen, device="cuda")
            fns["sm90 binding"] = functools.partial(
                _sm90.SPEC.load().forward, q, k, v, out, lse, head_dim ** -0.5, 0.0, -1, 0,
                _sm90.VARIANTS[config.get("variant", "base")], _stream())
        cases.append((f"flash B{batch} S{seqlen} H32 D128 causal", fns, "sdpa"))
    return cases


def _chosen(spec, op: str) -> tuple[str, dict]:
    """The backend and config the last call of ``op`` used: the dispatch cache's one entry."""
    found = {(backend.name, repr(config)): config for backend, config in spec._cache.values()}
    if len(found) != 1:
        raise RuntimeError(f"{op}: expected one cached dispatch decision, found {list(found)}")
    spec.clear_cache()
    (name, _), config = found.popitem()
    return name, config


def _stream() -> int:
    import torch

    return torch.cuda.current_stream().cuda_stream


def rmsnorm_rows() -> list[tuple[str, dict, str]]:
    import torch

    from kpt.ops import rmsnorm_qkv_rope
    from kpt.ops.rmsnorm_qkv_rope import SPEC, make_call, problem_of, shapes_from_hf_config
    from kpt.ops.rmsnorm_qkv_rope.reference import eager_unfused

    config = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0}
    cases = []
    for shape in shapes_from_hf_config(config, RMSNORM_TOKENS):
        c = make_call(shape, torch.bfloat16, torch.device("cuda"), seed=0)

        def kpt(backend=None, c=c):
            return rmsnorm_qkv_rope(c.x, c.norm_weight, c.qkv_weight, c.positions,
                                    num_q_heads=c.num_q_heads, num_kv_heads=c.num_kv_heads,
                                    head_dim=c.head_dim, eps=c.eps, rope_theta=500000.0,
                                    backend=backend)

        SPEC.clear_cache()
        kpt()
        chosen, _ = _chosen(SPEC, "rmsnorm_qkv_rope")
        w_t = c.qkv_weight.t()
        fns = {
            "x @ W.T": lambda c=c, w_t=w_t: c.x @ w_t,
            "kpt": kpt,
            f"kpt backend={chosen}": functools.partial(kpt, chosen),
            "eager unfused": functools.partial(eager_unfused, c),
        }
        from kpt.ops.rmsnorm_qkv_rope import _cuda

        module = _cuda.SPEC.load()
        if chosen == "cuda" and hasattr(module, "forward"):  # the binding alone
            impl, tiles, splits = _cuda._plan(SPEC.choose(problem_of(c))[1], c.qkv_weight.shape[0],
                                              c.hidden, c.tokens, 0, False)
            fns["cuda binding"] = functools.partial(
                module.forward, c.x, None, None, c.norm_weight, c.qkv_weight, None, None, None,
                c.positions, c.inv_freq, c.q, c.k, c.v, c.rotary_dim, c.eps, c.neox, impl, tiles,
                splits, _stream())
        cases.append((f"rmsnorm_qkv_rope T={shape['tokens']} llama3-8b", fns, "x @ W.T"))
    return cases


def paged_rows() -> list[tuple[str, dict, str]]:
    import torch
    import torch.nn.functional as F

    from kpt.ops import paged_attention
    from kpt.ops.paged_attention import SPEC, Call, plan, problem_of

    batch, context, page, heads, heads_kv, head_dim = 16, 2048, 16, 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    pages = batch * context // page
    kc, vc = (torch.randn(pages, page, heads_kv, head_dim, device="cuda", dtype=torch.bfloat16,
                          generator=gen) for _ in range(2))
    table = torch.randperm(pages, device="cuda", generator=gen).view(batch, -1).int()
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    # The same keys, contiguous (B, Hkv, S, D), for SDPA's GQA decode.
    kt, vt = (c[table.long()].flatten(1, 2).transpose(1, 2).contiguous() for c in (kc, vc))
    SPEC.clear_cache()
    paged_attention(q, kc, vc, table, lens)
    chosen, _ = _chosen(SPEC, "paged_attention")
    handle = plan(q, kc, vc, table, lens)
    out = torch.empty_like(q)
    fns = {
        "sdpa": functools.partial(F.scaled_dot_product_attention, q.unsqueeze(2), kt, vt,
                                  enable_gqa=True),
        "kpt": functools.partial(paged_attention, q, kc, vc, table, lens),
        f"kpt backend={chosen}": functools.partial(paged_attention, q, kc, vc, table, lens,
                                                   backend=chosen),
        "kpt plan.run": functools.partial(handle.run, q, kc, vc, out=out),
    }
    # Every other backend that runs this call, named, and its plan: which one a decode step
    # should take is a per-call question (kernel time against host time).
    for name in (b.name for b in SPEC.backends):
        if name in (chosen, "reference") or SPEC.reasons(name, problem_of(Call(
                q, kc, vc, table, lens, None, 1, head_dim**-0.5, -1, 0, 0.0, None, None, "NHD",
                q, q))):
            continue
        other = plan(q, kc, vc, table, lens, backend=name)
        fns[f"kpt backend={name}"] = functools.partial(paged_attention, q, kc, vc, table, lens,
                                                       backend=name)
        fns[f"kpt plan.run backend={name}"] = functools.partial(other.run, q, kc, vc,
                                                                out=torch.empty_like(q))
    return [(f"paged decode B{batch} ctx{context} page{page} 32/8 D128", fns, "sdpa")]


def cascade_rows() -> list[tuple[str, dict, str]]:
    """cascade_attention on its benchmark shape (64 requests sharing 16384 keys plus 256 each)
    against the naive batch (paged_attention over each request's concatenated pages)."""
    from bench.bench_cascade_attention import _inputs
    from kpt.ops import cascade_attention, paged_attention

    q, kc, vc, levels, flat, totals = _inputs()
    fns = {
        "naive paged batch": functools.partial(paged_attention, q, kc, vc, flat, totals),
        "kpt": functools.partial(cascade_attention, q, kc, vc, levels),
        "kpt (backend=triton)": functools.partial(cascade_attention, q, kc, vc, levels,
                                                  backend="triton"),
    }
    return [("cascade 64 x (16384 shared + 256), 32/8 D128", fns, "naive paged batch")]


def _torch_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def flex_rows() -> list[tuple[str, dict, str]]:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    from kpt.ops.flex_attention import create_block_mask, flex_attention, mods

    compiled = torch.compile(torch_flex)
    cases = []
    for batch, seqlen in FLASH_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        qt, kt, vt = (torch.randn(batch, 32, seqlen, 128, device="cuda", dtype=torch.bfloat16,
                                  generator=gen) for _ in range(3))
        kbm = create_block_mask(mods.sliding_window(WINDOW - 1), None, None, seqlen, seqlen,
                                "cuda", 128)
        tbm = torch_block_mask(_torch_window, None, None, seqlen, seqlen, device="cuda",
                               BLOCK_SIZE=128)

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    return fn()
            return run

        fns = {
            "torch flex compiled": no_grad(functools.partial(compiled, qt, kt, vt,
                                                             block_mask=tbm)),
            "kpt": no_grad(functools.partial(flex_attention, qt, kt, vt, None, kbm)),
        }
        cases.append((f"flex B{batch} S{seqlen} window{WINDOW}", fns, "torch flex compiled"))
    return cases


def profile(case: str, fn, calls: int = 2000) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    print(f"--- {case}: kpt, cProfile of {calls} calls (own time) ---", flush=True)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


def main() -> None:
    import torch

    parts = os.environ.get("KPT_HOST_PARTS", "flash,rmsnorm,paged").split(",")
    builders = {"flash": flash_rows, "rmsnorm": rmsnorm_rows, "paged": paged_rows,
                "cascade": cascade_rows, "flex": flex_rows}
    name = torch.cuda.get_device_name()
    lines = [f"Host time per eager call, {name}, torch {torch.__version__}: best of {REPEATS} "
             f"runs of {CALLS} back-to-back calls.", "",
             "| case | row | host us | total us | host / baseline |", "|---|---|---|---|---|"]
    print(lines[0], flush=True)
    for part in parts:
        for case, fns, baseline in builders[part]():
            times = {row: per_call_us(fn) for row, fn in fns.items()}
            base = times[baseline][0]
            for row, (host, total) in times.items():
                line = f"| {case} | {row} | {host:.1f} | {total:.1f} | {host / base:.2f} |"
                lines.append(line)
                print(line, flush=True)
            if os.environ.get("KPT_HOST_PROFILE") == "1":
                profile(case, fns["kpt"])
            direct = [row for row in times if row.startswith("kpt backend=")]
            if direct:
                gap = times["kpt"][0] - times[direct[0]][0]
                line = f"| {case} | auto - direct | {gap:+.1f} | | |"
                lines.append(line)
                print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "host.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
