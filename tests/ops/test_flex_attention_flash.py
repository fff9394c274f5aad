"""flex_attention's ``flash`` backend: band / soft-cap mods run as a ``flash_attention`` call.

Against the ``reference`` backend, fp16 and bf16: forward, lse and the gradients of q, k, v
(through out and lse) for no mods, causal, sliding window (named and hand-written), soft-cap,
GQA, Sq != Sk both ways (trailing keys / queries cut off), odd lengths and transposed inputs.
On CPU flash's dispatch runs its reference; under ``TRITON_INTERPRET=1`` (and on a GPU) a few
cases also force flash's Triton kernels through ``KPT_BACKEND``. Unsupported mods give
reasons when ``backend="flash"`` is asked for and fall back by default.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kpt.ops._common import compare
from kpt.ops._registry import Problem
from kpt.ops.flash_attention import SPEC as FLASH_SPEC
from kpt.ops.flash_attention import TOLERANCE, compare_lse
from kpt.ops.flex_attention import (
    _BACKWARD,
    SPEC,
    BackwardCall,
    _codegen,
    create_block_mask,
    flex_attention,
    mods,
    problem_of,
)
from kpt.ops.flex_attention import block_mask as kbm
from kpt.ops.flex_attention import reference as ref
from tests.ops.grad_checks import compare_grad
from tests.ops.op_log import OpLog

pytestmark = [pytest.mark.filterwarnings("ignore:.*flex_attention.*")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16  # several partial, full and skipped blocks at these lengths
SLOPES = torch.tensor([0.5, 0.25], device=DEVICE)
DOC = torch.tensor([0] * 9 + [1] * 12 + [2] * 16, device=DEVICE)  # 37 tokens
# One row of ids per batch entry, with documents of 1 token and a whole row in one document.
DOC_B = torch.tensor([[5] * 4 + [7] + [2] * 32, [3] * 37], device=DEVICE)
DOC_SPLIT = torch.tensor([0] * 9 + [1] * 12 + [0] * 16, device=DEVICE)  # document 0 twice


def _causal(b, h, q, kv):
    return kv <= q


def _window5(b, h, q, kv):
    return (q >= kv) & (q - kv <= 5)


def _softcap2(s, b, h, q, kv):
    return 2.0 * torch.tanh(s / 2.0)


def _doc_window5(b, h, q, kv):
    return (q >= kv) & (q - kv <= 5) & (DOC[q] == DOC[kv])


_DOC_CAUSAL = mods.and_masks(mods.causal(), mods.document(DOC))


# name: (B, Hq, Hkv, Sq, Sk, D, score_mod, mask_mod, transposed inputs)
CASES = {
    "full": (2, 2, 2, 17, 17, 16, None, None, False),
    "causal_named": (1, 2, 2, 37, 37, 16, None, mods.causal(), False),
    "causal_lambda_cuts_keys": (1, 2, 2, 17, 37, 16, None, _causal, True),
    "causal_more_queries": (2, 2, 2, 37, 17, 32, None, mods.causal(), False),
    "window_named": (1, 2, 2, 37, 37, 16, None, mods.sliding_window(5), True),
    "window_lambda_cuts_queries": (1, 2, 2, 37, 17, 16, None, _window5, False),
    "softcap_named": (1, 2, 2, 17, 37, 32, mods.softcap(2.0), None, False),
    "softcap_lambda_causal": (1, 2, 2, 37, 37, 16, _softcap2, _causal, True),
    "gqa_softcap_window": (2, 4, 2, 17, 17, 16, mods.softcap(2.0), mods.sliding_window(5),
                           False),
    # Document ids in contiguous runs become varlen sequences: (B*H*S, 1, D) tokens for
    # (B, H, S, D) storage, (B*S, H, D) for transposed storage, copies for GQA on the first.
    "document_causal": (2, 2, 2, 37, 37, 16, None, _DOC_CAUSAL, False),
    "document_per_batch_gqa_transposed": (
        2, 4, 2, 37, 37, 16, None, mods.and_masks(mods.causal(), mods.document(DOC_B)), True),
    "document_gqa_copied": (1, 4, 2, 37, 37, 16, None, _DOC_CAUSAL, False),
    "document_bidirectional_softcap": (1, 2, 2, 37, 37, 32, mods.softcap(2.0),
                                       mods.document(DOC), False),
    "document_window_lambda": (1, 2, 2, 37, 37, 16, None, _doc_window5, True),
}
DTYPES = [torch.float16, torch.bfloat16]


def _inputs(B, H, Hkv, sq, sk, d, dtype, transposed, seed=0):
    """Fresh random q, k, v (B, H, S, D); ``transposed``: (B, S, H, D) storage seen through
    ``transpose(1, 2)``, as a model's projections give them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, s in ((H, sq), (Hkv, sk), (Hkv, sk)):
        shape = (B, s, h, d) if transposed else (B, h, s, d)
        t = torch.randn(*shape, generator=g).to(DEVICE, dtype)
        out.append((t.transpose(1, 2) if transposed else t).requires_grad_(True))
    return out


def _block_mask(mask, B, sq, sk):
    return None if mask is None else create_block_mask(mask, B, None, sq, sk, DEVICE, BS)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _run_and_compare(case, dtype):
    B, H, Hkv, sq, sk, d, score, mask, transposed = case
    q, k, v = _inputs(B, H, Hkv, sq, sk, d, dtype, transposed)
    bm = _block_mask(mask, B, sq, sk)
    kw = dict(score_mod=score, block_mask=bm, enable_gqa=H != Hkv, return_lse=True)
    out, lse = flex_attention(q, k, v, **kw, backend="flash")
    qr, kr, vr = _leaves(q, k, v)
    want, want_lse = flex_attention(qr, kr, vr, **kw, backend="reference")
    # 2 units in the last place of the input dtype (flash_attention's own bound: the kernels
    # round probabilities before P @ V); lse: fp32 summation order only.
    for reason in (compare("out", out, want, TOLERANCE[dtype]),
                   compare_lse("lse", lse, want_lse)):
        assert reason is None, reason
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    dlse = torch.randn(lse.shape, generator=g).to(DEVICE)
    torch.autograd.backward((out, lse), (dout, dlse))
    torch.autograd.backward((want, want_lse), (dout, dlse))
    # flash_attention's backward bound (4u, BACKWARD_TOLERANCE), or an absolute rounding bound
    # where the exact gradient is 0 (a query that sees one key): compare_grad.
    for n, got, exp, other in (("dq", q.grad, qr.grad, k), ("dk", k.grad, kr.grad, q),
                               ("dv", v.grad, vr.grad, q)):
        reason = compare_grad(n, got, exp, dout=dout, v=v, other=other, scale=d ** -0.5)
        assert reason is None, reason


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_flash_backend_matches_reference(name, dtype):
    _run_and_compare(CASES[name], dtype)


def _flash_triton_reason() -> str | None:
    p = Problem.of(torch.device(DEVICE), torch.float16, head_dim=16)
    reasons = FLASH_SPEC.reasons("triton", p)
    return "; ".join(reasons) or None


@pytest.mark.skipif(_flash_triton_reason() is not None, reason=str(_flash_triton_reason()))
@pytest.mark.parametrize("name", ["causal_lambda_cuts_keys", "window_lambda_cuts_queries",
                                  "gqa_softcap_window", "document_causal",
                                  "document_per_batch_gqa_transposed"])
def test_flash_backend_on_flash_triton_kernels(name, monkeypatch):
    # flash's cpu priority is its reference: ask its dispatch for the Triton kernels, which
    # read the (B, S, H, D) views with their strides (interpreted on CPU).
    monkeypatch.setenv("KPT_BACKEND", "flash_attention=triton,flash_attention_backward=triton")
    _run_and_compare(CASES[name], torch.bfloat16)


def test_direct_backward_without_dlse_never_computes_delta():
    """The lse gradient is absent (None) when called directly, and ``delta`` is never
    computed for the flash backend (it computes its own)."""
    B, H, Hkv, sq, sk, d, score, mask, _ = CASES["window_lambda_cuts_queries"]
    q, k, v = (t.detach() for t in _inputs(B, H, Hkv, sq, sk, d, torch.float16, False))
    tables = kbm.normalize(_block_mask(mask, B, sq, sk), B, H, sq, sk, q.device)
    m = _codegen.translate(score, mask)
    scale = d ** -0.5
    out, lse = flex_attention(q, k, v, score, _block_mask(mask, B, sq, sk), return_lse=True,
                              backend="flash")
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, out.dtype)
    call = BackwardCall(q, k, v, m, tables, scale, out, lse, dout=dout, dlse=None,
                        dq=torch.empty_like(q), dk=torch.empty_like(k), dv=torch.empty_like(v))
    _BACKWARD["flash"](call, {})
    assert "delta" not in vars(call)
    kwargs = dict(score_fn=score, mask_fn=mask, scale=scale, blocks=tables.dense(),
                  block_size=(BS, BS))
    want = ref.backward(q, k, v, dout, None, **kwargs)
    for n, got, exp, other in zip(("dq", "dk", "dv"), (call.dq, call.dk, call.dv), want,
                                  (k, q, q)):
        # As in _run_and_compare: flash_attention's backward bound via compare_grad.
        reason = compare_grad(n, got, exp, dout=dout, v=v, other=other, scale=scale)
        assert reason is None, reason
    # delta, where a backend reads it: rowsum(dout * out) - dlse, computed once.
    call.dlse = torch.randn(lse.shape, generator=g).to(DEVICE)
    expected = (dout.float() * out.float()).sum(-1) - call.dlse
    assert torch.allclose(call.delta, expected) and call.delta is call.delta


def test_reasons_under_torch_compile_and_for_other_dtypes():
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 17, 17, 16, torch.float16, False))
    tables = kbm.all_full(17, 17, BS, q.device)
    p = problem_of(q, k, v, _codegen.translate(mods.softcap(2.0), None), tables, True)
    assert SPEC.reasons("flash", p) == []
    traced = dataclasses.replace(p, dims=tuple((n, None if n == "cuda_blocks" else x)
                                              for n, x in p.dims))
    assert any("torch.compile" in r for r in SPEC.reasons("flash", traced))
    p32 = problem_of(q.float(), k.float(), v.float(), _codegen.translate(None, None), tables,
                     False)
    assert any("dtype float32" in r for r in SPEC.reasons("flash", p32))


def _sparse_causal():
    """A BlockMask listing only the blocks of a 5-wide window but masking with causal: the
    blocks it skips hold keys causal leaves visible, which the band kernels would attend."""
    bm = create_block_mask(mods.sliding_window(5), 1, None, 37, 37, DEVICE, BS)
    return dataclasses.replace(bm, mask_mod=mods.causal())


# name: (score_mod, block mask, words of the reason)
UNSUPPORTED = {
    "alibi": (mods.alibi(SLOPES), lambda: None, "ALiBi"),
    "document_split": (None, lambda: create_block_mask(mods.document(DOC_SPLIT), 1, None, 37,
                                                       37, DEVICE, BS),
                       "not one contiguous run"),
    "document_prefix": (None, lambda: create_block_mask(
        mods.and_masks(mods.prefix_lm(7), mods.document(DOC)), 1, None, 37, 37, DEVICE, BS),
        "a prefix"),
    "prefix_lm": (None, lambda: create_block_mask(mods.prefix_lm(7), 1, None, 37, 37, DEVICE,
                                                  BS), "a prefix"),
    "block_sparsity": (None, _sparse_causal, "BlockMask skips blocks"),
    "not_named": (lambda s, b, h, q, kv: s * 0.5 + torch.sigmoid(s), lambda: None,
                  "not a kpt named mod"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_mods_give_reasons_and_fall_back(name):
    score, make_mask, words = UNSUPPORTED[name]
    bm = make_mask()
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 37, 37, 16, torch.bfloat16, False))
    with pytest.raises(ValueError, match=f"flex_attention: backend 'flash'.*{words}"):
        flex_attention(q, k, v, score, bm, backend="flash")
    out = flex_attention(q, k, v, score, bm)
    want = flex_attention(q, k, v, score, bm, backend="reference")
    # The default dispatch runs another backend on the same inputs: the out tolerance above.
    assert compare("out", out, want, TOLERANCE[torch.bfloat16]) is None


def test_documents_past_the_launch_grid(monkeypatch):
    """Flash's grids hold 65535 sequences: (B*H*S, 1, D) tokens make one per head and
    document, so past the limit the call takes (B*S, H, D) tokens (one per document, a copy
    here), and with more documents than the limit it is refused with the reason. The limit is
    lowered to 8 here; fresh ids tensors, as the run check is cached per ids tensor."""
    from kpt.ops.flex_attention import _flash

    monkeypatch.setattr(_flash, "MAX_GRID_YZ", 8)
    ids = torch.tensor([0] * 9 + [1] * 12 + [2] * 16, device=DEVICE)  # 3 documents
    case = (2, 2, 2, 37, 37, 16, None, mods.and_masks(mods.causal(), mods.document(ids)),
            False)  # 2 rows x 2 heads x 3 documents = 12 one-head sequences > 8
    seen = []
    real = _flash._launch
    monkeypatch.setattr(_flash, "_launch", lambda flash, call: seen.append(call) or
                        real(flash, call))
    _run_and_compare(case, torch.bfloat16)
    assert seen and seen[0].q.shape[1] == 2 and seen[0].cu_seqlens_q.numel() == 2 * 3 + 1
    many = torch.arange(37, device=DEVICE) // 4  # 10 documents of up to 4 tokens
    bm = create_block_mask(mods.document(many), 1, None, 37, 37, DEVICE, BS)
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 37, 37, 16, torch.bfloat16, False))
    with pytest.raises(ValueError, match="10 documents in the batch"):
        flex_attention(q, k, v, None, bm, backend="flash")


# ---- the eager fast path ----------------------------------------------------------------------


def _grads_through(fn, q, k, v, dout, dlse):
    leaves = _leaves(q, k, v)
    out, lse = fn(*leaves)
    loss = (out.float() * dout).sum() + (lse.masked_fill(lse == float("-inf"), 0.0) * dlse).sum()
    return (out.detach(), lse.detach(), torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("name", ["gqa_softcap_window", "causal_lambda_cuts_keys"])
def test_eager_fast_path_matches_the_custom_op(name, monkeypatch):
    """Plain eager calls skip the custom ops' layers (``kpt.ops._common.plain_eager``), yet
    compute what the ops compute, forward and backward, bit for bit on the same backend; under
    a dispatch mode the call goes through the ops, which the mode then sees."""
    B, H, Hkv, sq, sk, d, score, mask, transposed = CASES[name]
    q, k, v = (t.detach() for t in _inputs(B, H, Hkv, sq, sk, d, torch.bfloat16, transposed))
    bm = _block_mask(mask, B, sq, sk)
    g = torch.Generator().manual_seed(2)
    dout = torch.randn(B, H, sq, d, generator=g).to(DEVICE)
    dlse = torch.randn(B, H, sq, generator=g).to(DEVICE)
    # Deterministic kernels on a GPU (flash's sm90 backward adds dq with fp32 atomics), so
    # that the gradients of two runs can be compared bit for bit.
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)

    def public(q, k, v):
        return flex_attention(q, k, v, score, bm, enable_gqa=H != Hkv, return_lse=True,
                              backend="flash")

    fast = _grads_through(public, q, k, v, dout, dlse)
    with OpLog() as log:
        logged = _grads_through(public, q, k, v, dout, dlse)
    assert "kpt.flex_attention.default" in log.ops
    assert "kpt.flex_attention_backward.default" in log.ops
    # The op itself, with its own autograd, on the arguments the public function passes.
    tables = kbm.normalize(bm, B, H, sq, sk, q.device) if bm is not None else \
        kbm.all_full(sq, sk, 128, q.device)
    m = _codegen.translate(score, tables.mask_mod if tables.has_partial else None)

    def op(q, k, v):
        return torch.ops.kpt.flex_attention(q, k, v, list(m.buffers), tables.as_list(),
                                            tables.block_q, tables.block_kv, tables.has_partial,
                                            d ** -0.5, m.key, "flash", True)

    direct = _grads_through(op, q, k, v, dout, dlse)
    for other in (logged, direct):
        assert torch.equal(fast[0], other[0]) and torch.equal(fast[1], other[1])
        for a, b in zip(fast[2], other[2]):
            assert torch.equal(a, b)


def test_eager_fast_path_skips_the_ops():
    """The fast path is taken: a plain call, forward and backward, records no dispatch of the
    custom ops in the profiler, while calling the op directly does (so the check can fail)."""
    B, H, Hkv, sq, sk, d, score, mask, transposed = CASES["window_named"]
    q, k, v = _inputs(B, H, Hkv, sq, sk, d, torch.bfloat16, transposed)
    bm = _block_mask(mask, B, sq, sk)

    def names(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return {e.name for e in prof.events()}

    def public():
        flex_attention(q, k, v, score, bm, backend="flash").float().sum().backward()

    def op():
        tables = kbm.normalize(bm, B, H, sq, sk, q.device)
        m = _codegen.translate(score, tables.mask_mod)
        with torch.no_grad():
            torch.ops.kpt.flex_attention(q, k, v, [], tables.as_list(), BS, BS, True,
                                         d ** -0.5, m.key, "flash", False)

    assert not any(n.startswith("kpt::flex_attention") for n in names(public))
    assert "kpt::flex_attention" in names(op)
