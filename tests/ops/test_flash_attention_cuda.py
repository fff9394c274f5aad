"""flash_attention's CUDA/HIP launchers (``kpt.ops.flash_attention._cuda``): the flex hooks
(ALiBi, prefix, document ids, per-query-block key ranges) against a float64 PyTorch reference,
forward and backward, on a GPU; the Python-side reasons and validation on any machine.

The registry-level behaviour (every mask, varlen, strides, determinism) is covered by
test_flash_attention.py, which parametrizes the ``cuda`` and ``hip`` backends.
"""

from __future__ import annotations

import pytest
import torch

from kpt.ops._common import compare
from kpt.ops._registry import Problem
from kpt.ops.flash_attention import BACKWARD_TOLERANCE, TOLERANCE, _cuda, compare_lse
from tests.ops.grad_checks import compare_grad

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference(q, k, v, *, scale, left=-1, right=-1, softcap=0.0, alibi=None, prefix=None,
              doc_q=None, doc_k=None, rng=None):
    """float64 attention with the flex hooks on materialised (B, H, Sq, Sk) scores."""
    b, sq, h, _ = q.shape
    sk, group = k.shape[1], h // k.shape[2]
    qf = q.double().transpose(1, 2)
    kf = k.double().transpose(1, 2).repeat_interleave(group, 1)
    vf = v.double().transpose(1, 2).repeat_interleave(group, 1)
    s = qf @ kf.transpose(-1, -2) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    if alibi is not None:
        s = s + alibi.double()[None, :, None, None] * (j - i)
    diag = sk - sq
    band = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if right >= 0:
        band &= j <= i + diag + right
    if left >= 0:
        band &= j >= i + diag - left
    vis = band.expand(b, h, sq, sk)
    if prefix is not None:
        vis = vis | (j < prefix[:, None, None, None])
    if doc_q is not None:
        vis = vis & (doc_q[:, None, :sq, None] == doc_k[:, None, None, :sk])
    if rng is not None:
        per_q = rng[:, :, i[:, 0] // _cuda.Q_BLOCK].long()  # (B, H or 1, Sq, 2)
        vis = vis & (j >= per_q[..., :1]) & (j < per_q[..., 1:])
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).masked_fill(~vis, 0.0)
    return (p @ vf).transpose(1, 2), lse.float()


def _hook_case(name: str, b: int, sq: int, h: int, device: str) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(7)
    kw: dict = {}
    if name in ("alibi", "all"):
        kw["alibi"] = (torch.rand(h, generator=gen) * 0.1).to(device)
    if name in ("prefix", "all"):
        kw["prefix"] = torch.tensor([37, 150][:b], dtype=torch.int32, device=device)
    if name in ("doc", "all"):
        cuts = torch.tensor([0, 90, 91, 200, sq])
        doc = torch.bucketize(torch.arange(sq), cuts[1:], right=True).to(torch.int32)
        kw["doc_q"] = kw["doc_k"] = doc.expand(b, sq).contiguous().to(device)
    if name in ("range", "all"):
        blocks = -(-sq // _cuda.Q_BLOCK)
        qb = torch.arange(blocks)
        lo = (qb * _cuda.Q_BLOCK - 64).clamp(min=0)
        hi = ((qb + 1) * _cuda.Q_BLOCK).clamp(max=sq)
        rng = torch.stack([lo, hi], -1).to(torch.int32)  # contains every diagonal key
        kw["rng"] = rng.expand(b, 1, blocks, 2).contiguous().to(device)
    return kw


def _launch_kw(kw: dict) -> dict:
    names = {"alibi": "alibi_slopes", "prefix": "prefix_len", "doc_q": "doc_q",
             "doc_k": "doc_k", "rng": "kv_block_range"}
    return {names[key]: value for key, value in kw.items()}


HOOKS = ["alibi", "prefix", "doc", "range", "all"]


@needs_cuda
@pytest.mark.parametrize("impl", ["mma", "simt"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("hook", HOOKS)
def test_flex_hooks_forward_and_backward(hook, d, impl):
    if _cuda.cuda_unavailable() or torch.version.hip is not None:
        pytest.skip(_cuda.cuda_unavailable() or "the mma impl is NVIDIA-only")
    b, s, h, hkv, dtype, dev = 2, 300, 4, 2, torch.bfloat16, "cuda"
    gen = torch.Generator(device="cpu").manual_seed(d)
    q, k, v, dout = (torch.randn(b, s, n, d, generator=gen).to(dev, dtype)
                     for n in (h, hkv, hkv, h))
    softcap = 5.0 if hook == "all" else 0.0
    kw = _hook_case(hook, b, s, h, dev)
    scale = d**-0.5
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, device=dev)
    _cuda.forward(q, k, v, out, lse, scale=scale, window_left=-1, window_right=0,
                  softcap=softcap, config={"impl": impl}, **_launch_kw(kw))
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference(qr, kr, vr, scale=scale, right=0, softcap=softcap, **kw)
    assert compare("out", out, ref_out, TOLERANCE[dtype]) is None
    assert compare_lse("lse", lse, ref_lse) is None
    grads = torch.autograd.grad(ref_out, (qr, kr, vr), dout.double())
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    _cuda.backward(dout, None, q, k, v, out, lse, dq, dk, dv, scale=scale, window_left=-1,
                   window_right=0, softcap=softcap, config={"impl": impl}, **_launch_kw(kw))
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        assert compare(name, got, want, BACKWARD_TOLERANCE[dtype]) is None


def _skip_without_cuda() -> None:
    if _cuda.cuda_unavailable() or torch.version.hip is not None:
        pytest.skip(_cuda.cuda_unavailable() or "the mma impl is NVIDIA-only")


def _check_backward(q, k, v, dout, impl, *, scale, left=-1, right=-1, softcap=0.0):
    """Forward with ``impl``, then backward with ``impl`` into NaN-filled gradients, against
    the float64 reference's autograd."""
    b, sq, h, _ = q.shape
    out, lse = torch.empty_like(q), torch.empty(b, h, sq, device=q.device)
    band = dict(scale=scale, window_left=left, window_right=right, softcap=softcap)
    _cuda.forward(q, k, v, out, lse, config={"impl": impl}, **band)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    _cuda.backward(dout, None, q, k, v, out, lse, dq, dk, dv, config={"impl": impl}, **band)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, _ = reference(qr, kr, vr, scale=scale, left=left, right=right, softcap=softcap)
    grads = torch.autograd.grad(ref_out, (qr, kr, vr), dout.double())
    for name, got, want, other in zip(("dq", "dk", "dv"), (dq, dk, dv), grads, (k, q, q)):
        assert compare_grad(name, got, want, dout=dout, v=v, other=other, scale=scale) is None


# (Sq, Sk): tile remainders on both sides (1, 17, 113), several tiles (1000), Sq != Sk.
ODD = [(1, 1), (17, 17), (113, 113), (1000, 1000), (17, 113), (113, 1000)]


@needs_cuda
@pytest.mark.parametrize("impl", ["mma", "simt"])
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
@pytest.mark.parametrize("sq,sk", ODD)
def test_backward_odd_lengths_gqa(sq, sk, mask, d, impl):
    _skip_without_cuda()
    gen = torch.Generator(device="cpu").manual_seed(sq + sk + d)
    dtype, dev = torch.float16, "cuda"
    q, dout = (torch.randn(2, sq, 6, d, generator=gen).to(dev, dtype) for _ in range(2))
    k, v = (torch.randn(2, sk, 2, d, generator=gen).to(dev, dtype) for _ in range(2))
    left, right = {"none": (-1, -1), "causal": (-1, 0), "window": (40, 7)}[mask]
    _check_backward(q, k, v, dout, impl, scale=d**-0.5, left=left, right=right,
                    softcap=3.0 if mask == "window" else 0.0)


@needs_cuda
@pytest.mark.parametrize("impl", ["mma", "simt"])
def test_backward_strided_bhsd_views(impl):
    _skip_without_cuda()
    gen = torch.Generator(device="cpu").manual_seed(5)
    # (B, H, S, D) storage seen as (B, S, H, D): token stride D, head stride S * D.
    q, k, v, dout = (torch.randn(2, 4, 200, 64, generator=gen).to("cuda", torch.bfloat16)
                     .transpose(1, 2) for _ in range(4))
    _check_backward(q, k, v, dout, impl, scale=0.125, right=0)


@needs_cuda
@pytest.mark.parametrize("impl", ["mma", "simt"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_varlen_backward_never_reads_or_writes_padding(d, impl):
    _skip_without_cuda()
    lens, pad, h, hkv, dtype, dev = [1, 17, 113, 1000], 24, 4, 2, torch.bfloat16, "cuda"
    total = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=dev)
    gen = torch.Generator(device="cpu").manual_seed(11)

    def poisoned(heads: int) -> torch.Tensor:
        t = torch.full((total + pad, heads, d), float("nan"), dtype=dtype, device=dev)
        t[:total] = torch.randn(total, heads, d, generator=gen).to(dev, dtype)
        return t

    q, dout, k, v = poisoned(h), poisoned(h), poisoned(hkv), poisoned(hkv)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((h, total + pad), float("nan"), device=dev)
    band = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens),
                max_seqlen_k=max(lens), scale=d**-0.5, window_right=0)
    _cuda.forward(q, k, v, out, lse, config={"impl": impl}, **band)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    _cuda.backward(dout, None, q, k, v, out, lse, dq, dk, dv, config={"impl": impl}, **band)
    for grad in (dq, dk, dv):
        assert grad[total:].isnan().all()  # rows outside every sequence are not written
    for start, n in zip(cu[:-1].tolist(), lens):
        rows = slice(start, start + n)
        qr, kr, vr = (t[rows][None].double().requires_grad_() for t in (q, k, v))
        ref_out, _ = reference(qr, kr, vr, scale=d**-0.5, right=0)
        grads = torch.autograd.grad(ref_out, (qr, kr, vr), dout[rows][None].double())
        for name, got, want, other in zip(("dq", "dk", "dv"), (dq, dk, dv), grads, (k, q, q)):
            assert compare_grad(name, got[rows][None], want, dout=dout[rows], v=v[rows],
                                other=other[rows], scale=d**-0.5) is None


@needs_cuda
def test_backward_of_rows_without_visible_keys_is_zero():
    _skip_without_cuda()
    # A document split: queries of document 1 see no key of document 1 past
    # kv_block_range, so their lse is -inf; their dq and their keys' dk/dv must be 0, not NaN.
    b, s, h, d, dev = 1, 256, 2, 64, "cuda"
    gen = torch.Generator(device="cpu").manual_seed(2)
    q, k, v, dout = (torch.randn(b, s, h, d, generator=gen).to(dev, torch.float16)
                     for _ in range(4))
    rng = torch.tensor([[[[0, 128], [0, 128]]]], dtype=torch.int32, device=dev)
    doc = (torch.arange(s, device=dev) >= 128).to(torch.int32)[None]
    for impl in ("mma", "simt"):
        out, lse = torch.empty_like(q), torch.empty(b, h, s, device=dev)
        hooks = dict(scale=0.125, doc_q=doc, doc_k=doc, kv_block_range=rng)
        _cuda.forward(q, k, v, out, lse, config={"impl": impl}, **hooks)
        assert lse[..., 128:].isneginf().all()
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
        _cuda.backward(dout, None, q, k, v, out, lse, dq, dk, dv, config={"impl": impl},
                       **hooks)
        for grad in (dq, dk, dv):
            assert torch.equal(grad[:, 128:], torch.zeros_like(grad[:, 128:]))
            assert not grad.isnan().any()


@needs_cuda
@pytest.mark.parametrize("impl", ["mma", "simt"])
def test_deterministic_backward_is_bitwise_identical(impl):
    if _cuda.cuda_unavailable():
        pytest.skip(_cuda.cuda_unavailable())
    gen = torch.Generator(device="cpu").manual_seed(3)
    q, dout = (torch.randn(1, 257, 4, 128, generator=gen).to("cuda", torch.float16)
               for _ in range(2))
    k, v = (torch.randn(1, 257, 2, 128, generator=gen).to("cuda", torch.float16)
            for _ in range(2))
    out, lse = torch.empty_like(q), torch.empty(1, 4, 257, device="cuda")
    _cuda.forward(q, k, v, out, lse, scale=0.1, window_right=0)
    runs = []
    for _ in range(2):
        grads = tuple(torch.empty_like(t) for t in (q, k, v))
        _cuda.backward(dout, None, q, k, v, out, lse, *grads, scale=0.1, window_right=0,
                       deterministic=True, config={"impl": impl})
        runs.append(grads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---- CPU: reasons, configs and validation --------------------------------------------------


def _problem(d: int) -> Problem:
    return Problem.of(torch.device("cpu"), torch.float16, batch=1, seqlen_q=8, seqlen_k=8,
                      heads_q=2, heads_kv=1, head_dim=d, mask="causal", softcap=False,
                      varlen=False)


def test_supports_reasons():
    assert _cuda.supports(_problem(128)) == []
    assert _cuda.supports(_problem(24)) == []
    assert any("multiple of 8" in r for r in _cuda.supports(_problem(20)))
    assert any("> 256" in r for r in _cuda.supports(_problem(512)))


def test_configs_default_first_and_no_sm90_without_its_device():
    fwd = _cuda.configs(_problem(64))
    assert fwd[0] == {"impl": "simt" if torch.version.hip else "mma"}
    assert {"impl": "sm90"} not in fwd  # a CPU problem is never served by the sm90 kernel

def test_backward_configs_offer_mma_up_to_its_head_dim():
    rocm = torch.version.hip is not None
    for d in (24, 64, 96, 128):
        want = [{"impl": "simt"}] if rocm else [{"impl": "mma"}, {"impl": "simt"}]
        assert _cuda.backward_configs(_problem(d)) == want
    assert _cuda.backward_configs(_problem(256)) == [{"impl": "simt"}]


def test_misaligned_reasons():
    x = torch.zeros(2, 8, 2, 64, dtype=torch.float16)
    assert _cuda._misaligned(x) is None
    assert "contiguous" in _cuda._misaligned(x.transpose(-1, -2))
    shifted = torch.zeros(x.numel() + 4, dtype=torch.float16)[4:].view(x.shape)  # +8 bytes
    assert "16-byte aligned" in _cuda._misaligned(shifted)
    assert _cuda._misaligned(_cuda._aligned(shifted)) is None
    odd = torch.zeros(2, 8, 2, 60, dtype=torch.float16)  # rows of 120 bytes
    assert "multiple of 8" in _cuda._misaligned(odd)


def test_launcher_rejects_cpu_tensors():
    q = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="needs GPU tensors"):
        _cuda.forward(q, q, q, q, torch.zeros(1, 2, 8), scale=1.0)


@needs_cuda
def test_launcher_rejects_bad_hooks_before_launch():
    q = torch.zeros(1, 300, 2, 64, dtype=torch.float16, device="cuda")
    lse = torch.zeros(1, 2, 300, device="cuda")
    short = torch.zeros(1, 1, 2, 2, dtype=torch.int32, device="cuda")  # needs 3 query blocks
    with pytest.raises(ValueError, match="kv_block_range"):
        _cuda.forward(q, q, q, q, lse, scale=1.0, kv_block_range=short)
    doc = torch.zeros(1, 300, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="come together"):
        _cuda.forward(q, q, q, q, lse, scale=1.0, doc_q=doc)
    with pytest.raises(ValueError, match="multiple of 8"):
        _cuda.forward(q[..., :60], q[..., :60], q[..., :60], q[..., :60], lse, scale=1.0)
