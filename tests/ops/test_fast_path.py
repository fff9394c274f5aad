"""The repeat-call fast path (``Backend.fast`` / ``Op.fast``), on the CPU.

flash_attention's entry keeps, per call signature, the launcher a backend hands back after a
validated run; a repeat of that signature skips validation and dispatch. These tests give the
reference backend a ``fast`` that counts its uses, and check: a repeat is served by it with the
same result; any change the validation or dispatch would see (shape, stride, dtype, a flag's
type, the requested backend, grad mode, a cleared cache) goes through the full path again, so
bad input still gets its error.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import pytest
import torch

from kpt.ops import flash_attention
from kpt.ops.flash_attention import SPEC
from kpt.ops.flash_attention import reference as ref

USES = {"fast": 0, "made": 0}


def _fast(call, config):
    USES["made"] += 1
    options = (call.scale, call.window_left, call.window_right, call.softcap)

    def launch(q, k, v):
        USES["fast"] += 1
        return ref.attention_forward(q, k, v, None, None, *options)

    return launch


@pytest.fixture
def counted(monkeypatch):
    backends = tuple(dataclasses.replace(b, fast=_fast) if b.name == "reference" else b
                     for b in SPEC.backends)
    monkeypatch.setattr(SPEC, "backends", backends)
    SPEC.clear_cache()
    USES.update(fast=0, made=0)
    yield
    SPEC.clear_cache()


def _qkv(b=2, s=7, h=4, hkv=2, d=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(b, s, n, d, generator=gen, dtype=dtype) for n in (h, hkv, hkv)]


def test_a_repeat_is_served_by_the_stored_launcher(counted):
    q, k, v = _qkv()
    first = flash_attention(q, k, v, causal=True)
    assert USES == {"fast": 0, "made": 1}
    again = flash_attention(q, k, v, causal=True)
    assert USES["fast"] == 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # the same reference math
    # Fresh data of the same signature: still the launcher, and the right answer for it.
    q2, k2, v2 = (t + 1 for t in (q, k, v))
    got = flash_attention(q2, k2, v2, causal=True)
    assert USES["fast"] == 2
    want, _ = ref.attention_forward(q2, k2, v2, None, None, 16**-0.5, -1, 0, 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the reference's own math


@pytest.mark.parametrize("change", ["shape", "stride", "dtype", "flag type", "backend",
                                    "option", "lse"])
def test_a_changed_signature_takes_the_full_path(counted, change):
    q, k, v = _qkv()
    flash_attention(q, k, v, causal=True)
    kwargs = dict(causal=True)
    if change == "shape":
        q, k, v = _qkv(s=9)
    elif change == "stride":
        q = torch.randn(2, 4, 7, 16).transpose(1, 2)
    elif change == "dtype":
        q, k, v = _qkv(dtype=torch.bfloat16)
    elif change == "flag type":
        kwargs = dict(causal=1)  # equal to True as a key, but not a bool: must be rejected
        with pytest.raises(TypeError, match="flash_attention: causal must be a bool"):
            flash_attention(q, k, v, **kwargs)
        assert USES["fast"] == 0
        return
    elif change == "backend":
        kwargs["backend"] = "reference"
    elif change == "option":
        kwargs["softcap"] = 5.0
    elif change == "lse":
        kwargs["return_lse"] = True
    made = USES["made"]
    flash_attention(q, k, v, **kwargs)
    assert USES["fast"] == 0
    assert USES["made"] == made + 1  # validated, ran, stored for its own signature


def test_bad_input_after_a_stored_call_still_fails(counted):
    q, k, v = _qkv()
    flash_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="flash_attention: window"):
        flash_attention(q, k, v, causal=True, window=[1, 2, 3])  # unhashable: full path
    with pytest.raises(ValueError, match="flash_attention: k .* and v .* must have one shape"):
        flash_attention(q, k, v[:, :3], causal=True)
    with pytest.raises(TypeError, match="flash_attention: q must be a torch.Tensor"):
        flash_attention(q.numpy(), k, v, causal=True)
    assert USES["fast"] == 0


def test_autograd_and_cleared_caches_take_the_full_path(counted):
    q, k, v = _qkv()
    flash_attention(q, k, v, causal=True)
    flash_attention(q.requires_grad_(), k, v, causal=True).sum().backward()
    assert USES["fast"] == 0 and q.grad is not None
    q.grad = None
    with torch.no_grad():  # no gradient to track: the launcher again
        flash_attention(q, k, v, causal=True)
    assert USES["fast"] == 1
    SPEC.clear_cache()
    flash_attention(q.detach(), k, v, causal=True)
    assert USES["fast"] == 1 and USES["made"] == 2


def test_copied_inputs_store_nothing(counted):
    """A last dim that is not contiguous is copied before the launch: the launcher would be
    built for the copy's layout, so nothing is stored for the given one."""
    q, k, v = _qkv()
    q_odd = torch.randn(2, 7, 4, 32)[..., ::2]
    flash_attention(q_odd, k, v)
    flash_attention(q_odd, k, v)
    assert USES == {"fast": 0, "made": 0}


# ---- rmsnorm_qkv_rope ------------------------------------------------------------------------


def _rqr_fast(call, config):
    """A launcher with the cuda backend's interface, running the reference."""
    from kpt.ops.rmsnorm_qkv_rope import Call as RCall
    from kpt.ops.rmsnorm_qkv_rope import reference as rref

    USES["made"] += 1
    fixed = (call.inv_freq, call.num_q_heads, call.num_kv_heads, call.head_dim,
             call.rotary_dim, call.eps, call.neox)

    def launch(x, residual, norm_weight, weight, bias, q_norm, k_norm, positions):
        USES["fast"] += 1
        inv_freq, hq, hkv, d, rot, eps, neox = fixed
        q, k, v = (x.new_empty(x.shape[0], h, d) for h in (hq, hkv, hkv))
        res = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
        new = RCall(x, residual, norm_weight, weight, bias, q_norm, k_norm, positions, inv_freq,
                    hq, hkv, d, rot, eps, neox, q, k, v, res if residual is not None else None)
        rref.run(new, {})
        return q, k, v, res

    return launch


@pytest.fixture
def counted_rqr(monkeypatch):
    from kpt.ops.rmsnorm_qkv_rope import SPEC as RSPEC

    backends = tuple(dataclasses.replace(b, fast=_rqr_fast) if b.name == "reference" else b
                     for b in RSPEC.backends)
    monkeypatch.setattr(RSPEC, "backends", backends)
    RSPEC.clear_cache()
    USES.update(fast=0, made=0)
    yield RSPEC
    RSPEC.clear_cache()


def test_rmsnorm_qkv_rope_repeat_uses_the_launcher_and_matches(counted_rqr):
    from kpt.ops import rmsnorm_qkv_rope

    gen = torch.Generator().manual_seed(2)
    hidden, hq, hkv, d = 48, 4, 2, 8
    x = torch.randn(3, 5, hidden, generator=gen)
    res = torch.randn(3, 5, hidden, generator=gen)
    norm = torch.rand(hidden, generator=gen) + 0.5
    blocks = [torch.randn(h * d, hidden, generator=gen) * 0.1 for h in (hq, hkv, hkv)]
    pos = torch.arange(5).expand(3, 5)
    scaling = {"rope_type": "linear", "factor": 2.0}

    def call(x, **kw):
        return rmsnorm_qkv_rope(x, norm, blocks, pos, num_q_heads=hq, num_kv_heads=hkv,
                                head_dim=d, residual=res, rope_scaling=scaling, **kw)

    first = call(x)
    assert USES == {"fast": 0, "made": 1}
    x2 = x * 2 + 1  # fresh data, same signature
    got = call(x2)
    assert USES["fast"] == 1
    USES["fast"] = -10**6  # the full path, for the expected values, must not use it
    counted_rqr.fast.clear()
    want = call(x2)
    assert USES["fast"] == -10**6
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # the same reference math
    assert not any(torch.equal(a, b) for a, b in zip(first, got, strict=True))
    with pytest.raises(ValueError, match="rmsnorm_qkv_rope"):
        rmsnorm_qkv_rope(x, norm, blocks, pos, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                         residual=res, rope_scaling=scaling, rotary_dim=3)
    with pytest.raises(TypeError, match="rmsnorm_qkv_rope"):
        rmsnorm_qkv_rope(x, norm, blocks, pos, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                         residual=res, rope_scaling=[("rope_type", "linear")])


# ---- paged_attention: decode calls and Plan.run ---------------------------------------------


def _paged_fast(call, config, varlen=False):
    from kpt.ops.paged_attention import reference as paged_ref

    USES["made"] += 1
    if (call.cu_seqlens_q is not None and not varlen) or call.k_scale is not None:
        return None  # as the cuda backend's fast(): decode with a 16-bit cache only

    def launch(q, k_cache, v_cache, block_table, seq_lens, out, lse, cu_seqlens_q=None):
        USES["fast"] += 1
        paged_ref.run(dataclasses.replace(call, q=q, k_cache=k_cache, v_cache=v_cache,
                                          block_table=block_table, seq_lens=seq_lens,
                                          cu_seqlens_q=cu_seqlens_q, out=out, lse=lse), config)

    return launch


@pytest.fixture
def counted_paged(monkeypatch):
    from kpt.ops.paged_attention import SPEC as PSPEC

    backends = tuple(dataclasses.replace(b, fast=_paged_fast) if b.name == "reference" else b
                     for b in PSPEC.backends)
    monkeypatch.setattr(PSPEC, "backends", backends)
    PSPEC.clear_cache()
    USES.update(fast=0, made=0)
    yield PSPEC
    PSPEC.clear_cache()


def _paged_inputs(seed=3, batch=3, heads=4, heads_kv=2, d=16, page=4, pages=12):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, d, generator=gen)
    k_cache, v_cache = (torch.randn(pages, page, heads_kv, d, generator=gen) for _ in range(2))
    table = torch.randperm(pages, generator=gen)[:batch * 3].reshape(batch, 3).to(torch.int32)
    seq_lens = torch.tensor([5, 0, 11][:batch], dtype=torch.int32)
    return q, k_cache, v_cache, table, seq_lens


def test_paged_decode_repeat_uses_the_launcher_and_matches(counted_paged):
    from kpt.ops import paged_attention
    from kpt.ops.paged_attention import plan

    q, k_cache, v_cache, table, seq_lens = _paged_inputs()
    first, lse = paged_attention(q, k_cache, v_cache, table, seq_lens, return_lse=True)
    assert USES == {"fast": 0, "made": 1}
    q2 = q * 2 + 1  # fresh data, same signature; the launcher gets uninitialised outputs
    got, got_lse = paged_attention(q2, k_cache, v_cache, table, seq_lens, return_lse=True)
    assert USES["fast"] == 1
    counted_paged.fast.clear()
    USES["fast"] = -10**6
    want, want_lse = paged_attention(q2, k_cache, v_cache, table, seq_lens, return_lse=True)
    assert USES["fast"] == -10**6
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_lse, want_lse, rtol=0, atol=0)
    assert (got[1] == 0).all() and torch.isneginf(got_lse[1]).all()  # the empty sequence
    assert not torch.equal(first, got)
    # Another option (a window) or a changed table shape: the full path again.
    USES.update(fast=0, made=0)
    paged_attention(q, k_cache, v_cache, table, seq_lens, window=(2, 0))
    paged_attention(q, k_cache, v_cache, table[:, :2].contiguous(), seq_lens.clamp(max=8))
    assert USES == {"fast": 0, "made": 2}
    with pytest.raises(ValueError, match="paged_attention"):
        paged_attention(q, k_cache, v_cache, table, seq_lens[:2])
    # Plan.run: the second call of a layer shape is the launcher's, with or without out.
    USES.update(fast=0, made=0)
    p = plan(q, k_cache, v_cache, table, seq_lens)
    a = p.run(q2, k_cache, v_cache)
    out = torch.full_like(q2, float("nan"))
    b = p.run(q2, k_cache, v_cache, out=out)
    c = p.run(q2, k_cache, v_cache, out=out)
    assert USES["fast"] == 1 and c is out
    torch.testing.assert_close(a, want, rtol=0, atol=0)
    torch.testing.assert_close(b, want, rtol=0, atol=0)


def test_paged_chunked_repeat_uses_the_launcher_where_nothing_is_read_back(monkeypatch):
    """Chunked prefill (as the Triton backend's fast() serves it): a repeat with max_seqlen_q
    given and cu_seqlens_q not read on the host (a GPU tensor; here read_content patched off)
    runs the launcher on zeroed outputs; without max_seqlen_q, or with the content read (CPU
    tensors, KPT_CHECK=1), every call takes the full path and its checks."""
    from kpt.ops import paged_attention
    from kpt.ops.paged_attention import SPEC as PSPEC

    paged_module = sys.modules["kpt.ops.paged_attention"]
    backends = tuple(dataclasses.replace(b, fast=functools.partial(_paged_fast, varlen=True))
                     if b.name == "reference" else b for b in PSPEC.backends)
    monkeypatch.setattr(PSPEC, "backends", backends)
    PSPEC.clear_cache()
    USES.update(fast=0, made=0)
    q, k_cache, v_cache, table, seq_lens = _paged_inputs()
    q = torch.randn(7, q.shape[1], q.shape[2])
    cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32)  # the empty sequence has no queries
    call = functools.partial(paged_attention, k_cache=k_cache, v_cache=v_cache,
                             block_table=table, seq_lens=seq_lens, cu_seqlens_q=cu,
                             return_lse=True)
    call(q, max_seqlen_q=5)
    call(q, max_seqlen_q=5)
    assert USES == {"fast": 0, "made": 0}  # CPU: content read, no launcher stored or used
    monkeypatch.setattr(paged_module, "read_content", lambda t: False)
    want, want_lse = call(q, max_seqlen_q=5)
    assert USES == {"fast": 0, "made": 1}
    q2 = q * 2 - 1
    got, got_lse = call(q2, max_seqlen_q=5)
    assert USES["fast"] == 1
    PSPEC.fast.clear()
    USES["fast"] = -10**6
    want2, want2_lse = call(q2, max_seqlen_q=5)
    torch.testing.assert_close(got, want2, rtol=0, atol=0)
    torch.testing.assert_close(got_lse, want2_lse, rtol=0, atol=0)
    assert not torch.equal(got, want)
    USES.update(fast=0, made=0)
    call(q2, max_seqlen_q=5)  # the launcher stored by the full call above
    call(q2)  # no max_seqlen_q: read on the host, full path, nothing stored
    call(q2, max_seqlen_q=6)  # another signature: full path, its own launcher stored
    assert USES == {"fast": 1, "made": 1}
    monkeypatch.setenv("KPT_CHECK", "1")
    USES.update(fast=0, made=0)
    call(q2, max_seqlen_q=5)
    assert USES["fast"] == 0
    PSPEC.clear_cache()
