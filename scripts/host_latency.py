"""Host time per eager flash_attention / flex_attention call, and of the layers under it.

Small attention calls are bound by the host: the GPU finishes before the next launch is
issued. This times back-to-back eager calls on tiny to small causal problems and prints the
host time per call (the loop alone) and the total (after a final synchronise), for:

  kpt public     kpt.ops.flash_attention (validation, the eager fast path, dispatch, launch)
  kpt op         torch.ops.kpt.flash_attention (what torch.compile calls: the custom op)
  SPEC.launch    dispatch and launch of a prepared Call
  sm90.run       the sm90 launcher alone (variant "dynamic")
  sdpa flash     torch's SDPA with the FlashAttention-2 backend, on (B, H, S, D) views

and for flex_attention with a causal 1024-key sliding window (kpt's named mod and BlockMask
for kpt, the same mask_mod and torch's BlockMask for torch), on (B, H, S, D) views:

  flex public    kpt.ops.flex_attention (default dispatch: the flash backend on CUDA)
  flex op        torch.ops.kpt.flex_attention (the custom op, as torch.compile sees it)
  torch flex     torch's flex_attention under torch.compile (its compiled call, guards included)

GPU machine only. ``KPT_HOST_PARTS=flash`` or ``flex`` runs one half.

  python scripts/host_latency.py
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = [(1, 128), (1, 1024), (8, 512)]  # (batch, seqlen); 32 heads, head dim 128, bf16


def _per_call_us(fn, calls: int = 400, repeats: int = 5) -> tuple[float, float]:
    """Host and total microseconds per call: the best of ``repeats`` runs of ``calls`` calls
    (the host of a shared machine is noisy; the best run is the least disturbed one)."""
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


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kpt.ops import flash_attention
    from kpt.ops.flash_attention import SPEC, Call, _sm90, problem_of

    heads, head_dim = 32, 128
    for batch, seqlen in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda",
                               dtype=torch.bfloat16, generator=gen) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        call = Call(q, k, v, None, None, seqlen, seqlen, head_dim ** -0.5, -1, 0, 0.0,
                    torch.empty_like(q), torch.empty(batch, heads, seqlen, device="cuda"))

        def sdpa(qt=qt, kt=kt, vt=vt):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        fns = {
            "kpt public": functools.partial(flash_attention, q, k, v, causal=True),
            "kpt op": functools.partial(torch.ops.kpt.flash_attention, q, k, v, None, None,
                                        seqlen, seqlen, head_dim ** -0.5, -1, 0, 0.0, False,
                                        False, ""),
            "SPEC.launch": lambda call=call: SPEC.launch(problem_of(call), call),
            "sm90.run": functools.partial(_sm90.run, call, {"impl": "sm90",
                                                            "variant": "dynamic"}),
            "sdpa flash": sdpa,
        }
        parts = os.environ.get("KPT_HOST_PARTS", "flash,flex").split(",")
        if "flex" in parts:
            fns = fns if "flash" in parts else {}
            fns.update(_flex_fns(qt, kt, vt))
        elif "flash" not in parts:
            fns = {}
        for name, fn in fns.items():
            host, total = _per_call_us(fn)
            print(f"B{batch} S{seqlen:<5} {name:<12} host {host:6.1f} us/call  "
                  f"total {total:6.1f} us/call", flush=True)


WINDOW = 1024


def _torch_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


@functools.cache
def _torch_flex():
    import torch
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    return torch.compile(torch_flex)


def _flex_fns(qt, kt, vt) -> dict:
    """The flex rows on (B, H, S, D) views, forward under no_grad (a fresh BlockMask per shape,
    built once, as a model builds one per sequence length)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask

    from kpt.ops.flex_attention import _codegen, create_block_mask, flex_attention, mods

    B, H, S, D = qt.shape
    kbm = create_block_mask(mods.sliding_window(WINDOW - 1), None, None, S, S, "cuda", 128)
    tbm = torch_block_mask(_torch_window, None, None, S, S, device="cuda", BLOCK_SIZE=128)
    flex_mod = importlib.import_module("kpt.ops.flex_attention")
    tables = flex_mod.block_mask.normalize(kbm, B, H, S, S, qt.device)
    m = _codegen.translate(None, tables.mask_mod if tables.has_partial else None)
    compiled = _torch_flex()

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    return {
        "flex public": no_grad(functools.partial(flex_attention, qt, kt, vt, None, kbm)),
        "flex op": no_grad(functools.partial(
            torch.ops.kpt.flex_attention, qt, kt, vt, list(m.buffers), tables.as_list(),
            tables.block_q, tables.block_kv, tables.has_partial, D ** -0.5, m.key, "flash",
            False)),
        "torch flex": no_grad(functools.partial(compiled, qt, kt, vt, block_mask=tbm)),
    }


if __name__ == "__main__":
    main()
