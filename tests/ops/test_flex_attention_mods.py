"""flex_attention named mods (kpt.ops.flex_attention.mods) and their lowering to the cuda/hip
flash-attention kernels.

CPU: every named mod equals its hand-written lambda through the reference and Triton
(interpreter) backends and torch's eager flex_attention; lowering of mods to kernel
parameters, the bottom-right window arithmetic (checked element by element against the
top-left mask), block-mask key ranges and the block-mask check. GPU (skipped without one): the
cuda/hip backend against the reference, forward and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from kpt.ops._common import compare
from kpt.ops.flash_attention import TOLERANCE, compare_lse
from kpt.ops.flex_attention import SPEC, _codegen, _lower, create_block_mask, flex_attention, mods
from kpt.ops.flex_attention import block_mask as kbm
from kpt.ops.flex_attention import reference as ref
from tests.ops.grad_checks import compare_grad

tflex = pytest.importorskip("torch.nn.attention.flex_attention",
                            reason="torch flex_attention is the drop-in target (torch >= 2.5)")
pytestmark = [pytest.mark.filterwarnings("ignore:.*flex_attention.*"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32, same as test_flex_attention: only the summation order differs (a few fp32 ulps).
TOL = 2e-5
BS = 16
S = 33
DOC = torch.tensor([0] * 7 + [1] * 13 + [2] * 13, device=DEVICE)
DOC2 = torch.stack([DOC, torch.tensor([0] * 20 + [1] * 13, device=DEVICE)])
PREFIX = torch.tensor([5, 12], device=DEVICE)
SLOPES = torch.tensor([0.5, 0.125], device=DEVICE)


# name: (named score_mod, named mask_mod, hand-written score_mod, hand-written mask_mod)
NAMED = {
    "causal": (None, mods.causal(), None, lambda b, h, q, kv: q >= kv),
    "sliding_window": (None, mods.sliding_window(5), None,
                       lambda b, h, q, kv: (q >= kv) & (q - kv <= 5)),
    "prefix_lm_int": (None, mods.prefix_lm(9), None, lambda b, h, q, kv: (kv < 9) | (q >= kv)),
    "prefix_lm_tensor": (None, mods.prefix_lm(PREFIX), None,
                         lambda b, h, q, kv: (kv < PREFIX[b]) | (kv <= q)),
    "document_causal": (None, mods.and_masks(mods.document(DOC), mods.causal()), None,
                        lambda b, h, q, kv: (DOC[q] == DOC[kv]) & (q >= kv)),
    "document_batched": (None, mods.document(DOC2), None,
                         lambda b, h, q, kv: DOC2[b, q] == DOC2[b, kv]),
    "softcap": (mods.softcap(2.0), None, lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0), None),
    "alibi_causal": (mods.alibi(SLOPES), mods.causal(),
                     lambda s, b, h, q, kv: s + SLOPES[h] * (kv - q),
                     lambda b, h, q, kv: q >= kv),
    "softcap_alibi_window": (
        mods.compose(mods.softcap(2.0), mods.alibi(SLOPES)), mods.sliding_window(8),
        lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0) - SLOPES[h] * (q - kv),
        lambda b, h, q, kv: (q - kv >= 0) & (q - kv < 9)),
}


def _inputs(sq=S, sk=S, B=2, H=2, Hkv=2, d=16, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_(grad)
            for shape in ((B, H, sq, d), (B, Hkv, sk, d), (B, Hkv, sk, d))]


def check(name, out, want, tol=TOL):
    reason = compare(name, out, want, tol)
    assert reason is None, reason


# ---- named mods everywhere --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NAMED))
def test_named_mod_equals_lambda_everywhere(name):
    score, mask, score_l, mask_l = NAMED[name]
    q, k, v = _inputs()
    want, want_lse = ref.attention(q, k, v, score_l, mask_l, q.shape[-1] ** -0.5)
    bm = None if mask is None else tflex.create_block_mask(mask, 2, None, S, S, device=DEVICE,
                                                           BLOCK_SIZE=BS)
    theirs, theirs_lse = tflex.flex_attention(q, k, v, score_mod=score, block_mask=bm,
                                              return_lse=True)
    check("torch", theirs, want)
    check("torch lse", theirs_lse, want_lse)
    kbm_ = None if mask is None else create_block_mask(mask, 2, None, S, S, DEVICE, BS)
    for backend in ("reference", "triton"):
        out, lse = flex_attention(q, k, v, score, kbm_, return_lse=True, backend=backend)
        check(backend, out, want)
        check(f"{backend} lse", lse, want_lse)


@pytest.mark.parametrize("name", list(NAMED))
def test_named_mod_and_its_lambda_lower_alike(name):
    score, mask, score_l, mask_l = NAMED[name]
    named = _lower.lower(_codegen.translate(score, mask))
    hand = _lower.lower(_codegen.translate(score_l, mask_l))
    assert not isinstance(named, str), named
    assert not isinstance(hand, str), hand
    assert (named.dmin, named.dmax, named.softcap) == (hand.dmin, hand.dmax, hand.softcap)
    assert (named.prefix is None) == (hand.prefix is None)
    assert (named.doc is None) == (hand.doc is None)
    assert (named.slopes is None) == (hand.slopes is None)


def test_descriptions_are_machine_readable():
    assert mods.describe(mods.sliding_window(7)) == mods.NamedMod("sliding_window", {"window": 7})
    both = mods.describe(mods.and_masks(mods.document(DOC), mods.causal()))
    assert both.name == "and_masks" and [p.name for p in both.parts] == ["document", "causal"]
    assert mods.describe(lambda b, h, q, kv: q >= kv) is None
    with pytest.raises(ValueError, match="softcap"):
        mods.softcap(0.0)
    with pytest.raises(TypeError, match="document"):
        mods.document(torch.ones(3))
    slopes = mods.alibi_slopes(8)
    assert torch.allclose(slopes, torch.tensor([2.0 ** (-i) for i in range(1, 9)]))


# ---- lowering ---------------------------------------------------------------------------------

INF = math.inf


@pytest.mark.parametrize("mask, band", [
    (lambda b, h, q, kv: q >= kv, (0, INF)),
    (lambda b, h, q, kv: kv <= q + 3, (-3, INF)),
    (lambda b, h, q, kv: (q - kv < 4) & (kv - q < 2), (-1, 3)),
    (lambda b, h, q, kv: q == kv, (0, 0)),
    (lambda b, h, q, kv: -(kv - q) > 2, (3, INF)),
])
def test_bands(mask, band):
    low = _lower.lower(_codegen.translate(None, mask))
    assert (low.dmin, low.dmax) == band


@pytest.mark.parametrize("score, mask, words", [
    (None, lambda b, h, q, kv: q != kv, "not a band"),
    (None, lambda b, h, q, kv: q >= 2 * kv, "not a band"),
    (None, lambda b, h, q, kv: (q >= kv) | (q < 3), "prefix-LM"),
    (None, lambda b, h, q, kv: ((kv < 4) | (q >= kv)) & (q - kv < 9), "outside the `|`"),
    (None, lambda b, h, q, kv: kv < PREFIX[b], "not a band"),
    (lambda s, b, h, q, kv: torch.tanh(s), None, "not soft-cap"),
    (lambda s, b, h, q, kv: s + SLOPES[h] * abs(kv - q), None, "not soft-cap"),
    (mods.compose(mods.alibi(SLOPES), mods.softcap(3.0)), None, "not soft-cap"),
    (lambda s, b, h, q, kv: torch.erf(s), None, "torch.erf"),
])
def test_unlowerable_mods_give_reasons(score, mask, words):
    low = _lower.lower(_codegen.translate(score, mask))
    assert isinstance(low, str) and _lower.NOT_NAMED in low or "outside" in low, low
    assert words in low, low


def _kernel_visible(geo, sq, sk):
    """The launcher's band (bottom-right windows on the cut sizes), in caller coordinates."""
    i = torch.arange(sq).view(-1, 1)
    j = torch.arange(sk).view(1, -1)
    rel = j - i - (geo.sk - geo.sq)
    vis = (i < geo.sq) & (j < geo.sk)
    if geo.window_left >= 0:
        vis &= rel >= -geo.window_left
    if geo.window_right >= 0:
        vis &= rel <= geo.window_right
    return vis


@pytest.mark.parametrize("sq, sk", [(1, 17), (17, 1), (9, 9), (9, 30), (30, 9), (5, 5)])
@pytest.mark.parametrize("dmin, dmax", [(0, INF), (0, 4), (-2, 3), (-INF, 2), (2, 6), (-5, -1),
                                        (-INF, INF)])
def test_windows_reproduce_the_top_left_band(sq, sk, dmin, dmax):
    low = _lower.Lowered(dmin=dmin, dmax=dmax, has_mask=True)
    geo = _lower.geometry(low, sq, sk)
    d = torch.arange(sq).view(-1, 1) - torch.arange(sk).view(1, -1)
    want = (d >= dmin) & (d <= dmax)
    if isinstance(geo, str):
        # Only a band strictly above the diagonal can need a negative left window.
        assert dmax < 0 and "window_left" in geo, geo
        return
    assert torch.equal(_kernel_visible(geo, sq, sk), want), geo


def test_top_left_causal_with_fewer_queries_cuts_the_keys():
    geo = _lower.geometry(_lower.lower(_codegen.translate(None, mods.causal())), 4, 10)
    assert geo == _lower.Geometry(sq=4, sk=4, window_left=-1, window_right=0)
    geo = _lower.geometry(_lower.lower(_codegen.translate(None, mods.prefix_lm(2))), 4, 10)
    assert isinstance(geo, str) and "window_right" in geo  # a prefix forbids cutting keys


def test_params_materialise_captured_tensors():
    score = mods.compose(mods.softcap(3.0), mods.alibi(SLOPES))
    low = _lower.lower(_codegen.translate(score, mods.and_masks(mods.document(DOC2),
                                                                mods.prefix_lm(PREFIX))))
    t = _codegen.translate(score, mods.and_masks(mods.document(DOC2), mods.prefix_lm(PREFIX)))
    geo = _lower.geometry(low, S, S)
    p = _lower.params(low, t.buffers, 2, 2, geo, torch.device(DEVICE))
    assert p["softcap"] == 3.0 and (p["window_left"], p["window_right"]) == (-1, 0)
    assert torch.equal(p["alibi_slopes"], SLOPES.float())
    assert p["prefix_len"].dtype == torch.int32 and p["prefix_len"].tolist() == [5, 12]
    assert torch.equal(p["doc_q"], DOC2.int()) and torch.equal(p["doc_k"], DOC2.int())


# ---- block masks --------------------------------------------------------------------------------


def _visible(mask, B, sq, sk):
    return kbm.mask_grid(mask, B, 1, torch.arange(sq, device=DEVICE),
                         torch.arange(sk, device=DEVICE))


@pytest.mark.parametrize("q_block", [16, 64, 24, 8])
@pytest.mark.parametrize("name", ["causal", "sliding_window", "document_causal"])
def test_kv_block_range_covers_every_visible_key(name, q_block):
    mask = NAMED[name][1]
    sq, sk = S, S
    tables = kbm.normalize(create_block_mask(mask, 1, None, sq, sk, DEVICE, BS), 1, 2, sq, sk,
                           torch.device(DEVICE))
    rng = _lower.kv_block_range(tables, q_block, sq, sk)
    assert rng.shape == (1, 1, -(-sq // q_block), 2) and rng.dtype == torch.int32
    vis = _visible(mask, 1, sq, sk)[0, 0]
    for r in range(rng.shape[2]):
        rows = vis[r * q_block:(r + 1) * q_block].any(0).nonzero().view(-1)
        lo, hi = rng[0, 0, r].tolist()
        if rows.numel():
            assert lo <= rows.min() and rows.max() < hi <= sk
    if name == "sliding_window" and q_block == 16:
        assert rng[0, 0, -1].tolist() == [16, S]  # blocks left of the window are skipped


def test_block_mask_check_accepts_own_masks_and_rejects_sparsity():
    dev = torch.device(DEVICE)
    mask = NAMED["document_causal"][1]
    t = _codegen.translate(None, mask)
    low = _lower.lower(t)
    for bm in (create_block_mask(mask, 1, None, S, S, DEVICE, BS),
               tflex.create_block_mask(mask, None, None, S, S, device=DEVICE, BLOCK_SIZE=BS)):
        assert _lower.check_tables(low, t.buffers, kbm.normalize(bm, 2, 2, S, S, dev), 2, S,
                                   S) == ""
    # The same mask_mod with a visible block dropped from the table: flex masks that block.
    bm = create_block_mask(mask, 1, None, S, S, DEVICE, BS)
    dense = kbm.normalize(bm, 1, 1, S, S, dev).dense()
    dense[0, 0, 2, 1] = 0
    sparse = kbm.Tables(*kbm._tables_from_dense(dense == 1, dense == 2), block_q=BS,
                        block_kv=BS, mask_mod=mask)
    assert "BlockMask skips blocks" in _lower.check_tables(low, t.buffers, sparse, 1, S, S)


def test_cuda_supports_gives_reasons_for_the_problem():
    from kpt.ops.flex_attention import _cuda, problem_of

    q, k, v = _inputs(sq=17, sk=40)
    tables = kbm.all_full(17, 40, 64, q.device)
    good = problem_of(q, k, v, _codegen.translate(mods.softcap(3.0), None), tables, False)
    assert _cuda.supports(good) == []
    bad = problem_of(q, k, v, _codegen.translate(lambda s, b, h, qi, kv: s * s, None), tables,
                     True)
    assert any(_lower.NOT_NAMED in r for r in _cuda.supports(bad))
    big = problem_of(*_inputs(d=272), _codegen.translate(None, None), tables, False)
    assert any("head dim 272" in r for r in _cuda.supports(big))


# ---- cuda/hip kernels vs the reference (GPU) ----------------------------------------------------

NATIVE = "hip" if torch.version.hip else "cuda"


def _native_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return SPEC.unavailable(SPEC.backend(NATIVE))


gpu = pytest.mark.skipif(_native_reason() is not None, reason=str(_native_reason()))
GPU_CASES = ["causal", "sliding_window", "prefix_lm_tensor", "document_causal",
             "document_batched", "softcap", "alibi_causal", "softcap_alibi_window", "plain"]
# (Sq, Sk, Hq, Hkv): odd lengths, Sq != Sk both ways, GQA
GPU_SIZES = [(1, 1, 2, 2), (17, 17, 4, 2), (113, 113, 4, 1), (1000, 1000, 2, 2), (17, 113, 4, 2),
             (113, 17, 2, 2), (1, 1000, 4, 4)]


def _gpu_mods(name, sq, sk, heads):
    if name == "plain":
        return None, None
    score, mask = NAMED[name][:2]
    if name == "alibi_causal":  # one slope per query head of this size
        score = mods.alibi(mods.alibi_slopes(heads).to(DEVICE))
    elif name == "softcap_alibi_window":
        score = mods.compose(mods.softcap(2.0), mods.alibi(mods.alibi_slopes(heads).to(DEVICE)))
    if name.startswith("document"):  # ids over the longer sequence: uneven documents
        pos = torch.arange(max(sq, sk), device=DEVICE)
        ids = (pos * 3 // pos.numel()).int()
        if name == "document_batched":
            mask = mods.document(torch.stack([ids, (pos * pos // 500).int()]))
        else:
            mask = mods.and_masks(mods.document(ids), mods.causal())
    return score, mask


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", GPU_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", GPU_CASES)
def test_cuda_backend_matches_reference(name, size, dtype):
    sq, sk, H, Hkv = size
    score, mask = _gpu_mods(name, sq, sk, H)
    bm = None if mask is None else create_block_mask(mask, 2, None, sq, sk, DEVICE, 128)
    q, k, v = _inputs(sq, sk, B=2, H=H, Hkv=Hkv, d=64, dtype=dtype, grad=True)
    tables = (kbm.all_full(sq, sk, 128, q.device) if bm is None
              else kbm.normalize(bm, 2, H, sq, sk, q.device))
    from kpt.ops.flex_attention import problem_of

    mods_t = _codegen.translate(score, mask)
    reasons = SPEC.reasons(NATIVE, problem_of(q, k, v, mods_t, tables, True))
    if reasons:  # e.g. a window that would need a negative width: dispatch must not pick it
        pytest.skip("; ".join(reasons))
    out, lse = flex_attention(q, k, v, score, bm, enable_gqa=True, return_lse=True,
                              backend=NATIVE)
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    want, want_lse = ref.attention(qr, kr, vr, score, mask, q.shape[-1] ** -0.5)
    for reason in (compare("out", out, want, TOLERANCE[dtype]),
                   compare_lse("lse", lse, want_lse)):
        assert reason is None, reason
    dout = torch.randn_like(out)
    torch.autograd.backward((out, lse), (dout, torch.zeros_like(lse)))
    torch.autograd.backward((want, want_lse), (dout, torch.zeros_like(want_lse)))
    for n, got, exp, other in (("dq", q.grad, qr.grad, k), ("dk", k.grad, kr.grad, q),
                               ("dv", v.grad, vr.grad, q)):
        reason = compare_grad(n, got, exp, dout=dout, v=v, other=other,
                              scale=q.shape[-1] ** -0.5)
        assert reason is None, reason


@gpu
def test_unnamed_mod_falls_back_and_is_right():
    q, k, v = _inputs(65, 65, dtype=torch.bfloat16)

    def odd(s, b, h, qi, kv):
        return s * 0.5 + torch.sigmoid(s)

    from kpt.ops.flex_attention import problem_of

    tables = kbm.all_full(65, 65, 128, q.device)
    reasons = SPEC.reasons(NATIVE, problem_of(q, k, v, _codegen.translate(odd, None), tables,
                                              False))
    assert any(_lower.NOT_NAMED in r for r in reasons), reasons
    with pytest.raises(ValueError, match="not a kpt named mod"):
        flex_attention(q, k, v, odd, backend=NATIVE)
    out = flex_attention(q, k, v, odd)
    want, _ = ref.attention(q, k, v, odd, None, q.shape[-1] ** -0.5)
    assert compare("out", out, want, TOLERANCE[torch.bfloat16]) is None
