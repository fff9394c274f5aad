"""flex_attention: kpt's generated Triton kernels vs torch's compiled flex_attention.

B4 H32 S4096 D128 bf16, forward and forward+backward, for: no mask, causal, soft-cap 30, a
1024-token causal sliding window, and packed documents with causal masks inside each (700-token
documents, and a ragged set of 120 to 1500 tokens) (TARGETS.md). Both implementations get the
same torch BlockMask (BLOCK_SIZE 128). ``kpt_cuda`` runs the same cases on the hand-written
kernels with the named mods of ``kpt.ops.flex_attention.mods`` (its BlockMask built from them);
``kpt_flash`` runs those named mods on the ``flash`` backend (``kpt.ops.flash_attention``'s own
dispatch).
TFLOP/s count 4*B*H*Sq*Skv*D for the forward, times the visible
fraction of the score matrix, and 2.5x that for the backward. Kernel times are back-to-back
calls between events under sustained load (``bench/conftest.py``: 1 s of warm-up, then the
median of 3 windows of >= 100 ms; ``mhz`` is the SM clock read in them).

Run: ``KPT_BENCH_BASELINE=torch_flex_compiled pytest bench/bench_flex_attention.py`` (needs a
CUDA device; about 2-3 minutes, most of it torch.compile).
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.conftest import event_timing, record
from kpt.ops.flex_attention import SPEC, flex_attention, mods

B, H, S, D = 4, 32, 4096, 128
WINDOW = 1024


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def _softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


# Packed documents (causal inside each): 700-token documents as in TARGETS.md, and a ragged
# set (the case where the backward lagged most).
DOCS = {"docs700_causal": [700] * (S // 700) + [S % 700],
        "ragged_docs_causal": [1500, 300, 900, 120, 1276]}


# Each case's document id per token, made on the device by _doc_ids. The mask mods read them
# from this dict: torch.compile traces a global dict's tensor into the compiled kernel, where a
# call of a functools.cache'd function inside the mask mod made inductor fail to lower the
# mask (the torch baseline then ran unfused and its backward raised).
_DOC_IDS: dict[str, torch.Tensor] = {}


def _doc_ids(case: str) -> torch.Tensor:
    if case not in _DOC_IDS:
        lengths = torch.tensor(DOCS[case])
        _DOC_IDS[case] = torch.repeat_interleave(torch.arange(len(DOCS[case])), lengths).cuda()
    return _DOC_IDS[case]


def _doc_mask(case: str):
    def mask(b, h, q_idx, kv_idx):
        ids = _DOC_IDS[case]
        return (q_idx >= kv_idx) & (ids[q_idx] == ids[kv_idx])
    return mask


# case: (score_mod, mask_mod, visible fraction of the S x S score matrix)
CASES = {
    "full": (None, None, 1.0),
    "causal": (None, _causal, (S + 1) / (2 * S)),
    "softcap30": (_softcap, None, 1.0),
    "window1024_causal": (None, _window,
                          sum(min(i + 1, WINDOW) for i in range(S)) / (S * S)),
    **{case: (None, _doc_mask(case), sum(n * (n + 1) / 2 for n in lengths) / (S * S))
       for case, lengths in DOCS.items()},
}
# The same cases as named mods (the window: q - kv < WINDOW is sliding_window(WINDOW - 1)).
NAMED = {
    "full": (None, None),
    "causal": (None, mods.causal()),
    "softcap30": (mods.softcap(30.0), None),
    "window1024_causal": (None, mods.sliding_window(WINDOW - 1)),
}
NAMED |= {case: (None, "document") for case in DOCS}  # built on the device (_named_mask)
MODES = ("fwd", "fwd_bwd")
IMPLS = ("kpt_triton", "kpt_cuda", "kpt_flash", "torch_flex_compiled")
_NAMED_IMPLS = ("kpt_cuda", "kpt_flash")  # on the named mods; the others take CASES' lambdas


@functools.cache
def _inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_(True) for _ in range(3))
    return q, k, v, torch.randn_like(q)


@functools.cache
def _block_mask(case: str, named: bool = False):
    from torch.nn.attention.flex_attention import create_block_mask

    if case in DOCS:
        _doc_ids(case)  # the mask mods read it
    mask_mod = NAMED[case][1] if named else CASES[case][1]
    if mask_mod == "document":
        mask_mod = mods.and_masks(mods.causal(), mods.document(_doc_ids(case)))
    if mask_mod is None:
        return None
    return create_block_mask(mask_mod, None, None, S, S, device="cuda", BLOCK_SIZE=128)


@functools.cache
def _torch_compiled():
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    return torch.compile(torch_flex)


def _forward(impl: str, case: str):
    q, k, v, _ = _inputs()
    score_mod, bm = CASES[case][0], _block_mask(case)
    if impl == "kpt_triton":
        return lambda: flex_attention(q, k, v, score_mod, bm, backend="triton")
    if impl in _NAMED_IMPLS:
        named, nbm = NAMED[case][0], _block_mask(case, True)
        return lambda: flex_attention(q, k, v, named, nbm, backend=_backend(impl))
    compiled = _torch_compiled()
    return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=bm)


def _fn(impl: str, case: str, mode: str):
    fwd = _forward(impl, case)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd()
        return run
    q, k, v, dout = _inputs()
    return lambda: torch.autograd.grad(fwd(), (q, k, v), dout)


def _native() -> str:
    return "hip" if torch.version.hip else "cuda"


def _backend(impl: str) -> str:
    return {"kpt_triton": "triton", "kpt_cuda": _native(), "kpt_flash": "flash"}[impl]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_flex_attention(benchmark, cuda_only, case, mode, impl):
    if impl != "torch_flex_compiled":
        from kpt.ops.flex_attention import _codegen, block_mask, problem_of

        named = impl in _NAMED_IMPLS
        name = _backend(impl)
        q, k, v, _ = _inputs()
        bm = _block_mask(case, named)
        tables = (block_mask.all_full(S, S, 128, q.device) if bm is None
                  else block_mask.normalize(bm, B, H, S, S, q.device))
        translated = _codegen.translate((NAMED if named else CASES)[case][0],
                                        tables.mask_mod if tables.has_partial else None)
        reasons = SPEC.reasons(name, problem_of(q, k, v, translated, tables, mode != "fwd"))
        if reasons:
            pytest.skip(f"{name}: " + "; ".join(reasons))
    fn = _fn(impl, case, mode)
    timing = event_timing([fn], calls=10)
    kernel = timing.us

    def one_call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(one_call, rounds=5, iterations=1, warmup_rounds=1)
    latency = benchmark.stats.stats.median * 1e6
    flops = 4 * B * H * S * S * D * CASES[case][2] * (1.0 if mode == "fwd" else 3.5)
    tflops = flops / (kernel * 1e-6) / 1e12
    clock = timing.clock(tflops)
    benchmark.extra_info.update(kernel_us=kernel, latency_us=latency, tflops=tflops, **clock)
    record(f"flex {case} {mode} B{B} H{H} S{S} D{D}", impl, kernel_us=kernel,
           latency_us=latency, tflops=tflops, **clock)
