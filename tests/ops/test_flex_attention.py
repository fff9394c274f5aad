"""flex_attention: reference vs float64 and torch's eager flex_attention; Triton (interpreter on
CPU) vs the reference, forward, lse and gradients; mod translation, caching and fallback.

Shapes are tiny and odd (the Triton interpreter is slow); block masks use BLOCK_SIZE 16 so that
several blocks are partial, full and skipped.
"""

from __future__ import annotations

import sys

import pytest
import torch

from kpt.ops._common import compare
from kpt.ops.flex_attention import SPEC, _codegen, create_block_mask, flex_attention, problem_of
from kpt.ops.flex_attention import block_mask as kbm
from kpt.ops.flex_attention import reference as ref

tflex = pytest.importorskip("torch.nn.attention.flex_attention",
                            reason="torch flex_attention is the drop-in target (torch >= 2.5)")
pytestmark = [pytest.mark.filterwarnings("ignore:.*flex_attention.*"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated")]

# fp32 everywhere: the kernel and the reference differ only in summation order (online softmax
# over 16-wide tiles), a few float32 ulps on values of order 1.
TOL = 2e-5
BS = 16
# On a GPU machine the same cases run on CUDA (Triton compiled, not interpreted).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLOPES = torch.linspace(0.1, 0.9, 4, device=DEVICE)
DOC = torch.tensor([0] * 7 + [1] * 13 + [2] * 13, device=DEVICE)  # 33 tokens, three documents
LENGTHS = torch.tensor([33, 20], device=DEVICE)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 8)


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < 10) | (q_idx >= kv_idx)


def document(b, h, q_idx, kv_idx):
    return (DOC[q_idx] == DOC[kv_idx]) & (q_idx >= kv_idx)


def per_batch_length(b, h, q_idx, kv_idx):
    return kv_idx < LENGTHS[b]


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 3.0 * torch.tanh(score / 3.0)


def mixed(score, b, h, q_idx, kv_idx):
    bias = torch.where(torch.abs(q_idx - kv_idx) % 3 == 0, 0.5, -0.25)
    return torch.maximum(score, score * 0.5) + bias - torch.exp(-torch.abs(score)) / (h + 1)


# name: (B, H, Hkv, Sq, Skv, D, score_mod, mask_mod)
CASES = {
    "plain": (2, 2, 2, 33, 33, 16, None, None),
    "causal": (1, 2, 2, 33, 33, 16, None, causal),
    "sliding_window": (1, 2, 2, 48, 48, 16, None, sliding_window),
    "alibi_causal": (1, 4, 4, 33, 33, 16, alibi, causal),
    "softcap": (1, 2, 2, 17, 33, 32, softcap, None),
    "prefix_lm": (1, 2, 2, 33, 33, 16, None, prefix_lm),
    "document": (1, 2, 2, 33, 33, 16, None, document),
    "lengths_gqa": (2, 4, 2, 17, 33, 16, alibi, per_batch_length),
    "one_query": (1, 2, 1, 1, 17, 16, softcap, None),
    "mixed_sq_ne_skv": (1, 2, 2, 33, 17, 16, mixed, causal),
}
GRAD_CASES = ["alibi_causal", "softcap", "document", "lengths_gqa", "mixed_sq_ne_skv"]


def make(case: str, seed: int = 0, dtype=torch.float32, requires_grad: bool = False):
    B, H, Hkv, sq, skv, d, score_mod, mask_mod = CASES[case]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        t = torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return rand(B, H, sq, d), rand(B, Hkv, skv, d), rand(B, Hkv, skv, d), score_mod, mask_mod


def torch_mask(mask_mod, B, H, sq, skv):
    if mask_mod is None:
        return None
    return tflex.create_block_mask(mask_mod, B, H, sq, skv, device=DEVICE, BLOCK_SIZE=BS)


def kpt_mask(mask_mod, B, H, sq, skv):
    return None if mask_mod is None else create_block_mask(mask_mod, B, H, sq, skv, DEVICE, BS)


def reference_of(q, k, v, score_mod, mask_mod):
    """The reference called directly with the Python mods (not through dispatch)."""
    return ref.attention(q, k, v, score_mod, mask_mod, q.shape[-1] ** -0.5)


def float64_truth(q, k, v, score_mod, mask_mod):
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    B, H, sq, skv = s.shape
    out = torch.empty_like(s)
    keep = torch.ones_like(s, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(sq):
                for j in range(skv):
                    idx = [torch.tensor(x, device=DEVICE) for x in (b, h, i, j)]
                    x = s[b, h, i, j]
                    out[b, h, i, j] = score_mod(x, *idx) if score_mod else x
                    keep[b, h, i, j] = bool(mask_mod(*idx)) if mask_mod else True
    out = out.masked_fill(~keep, float("-inf"))
    return torch.softmax(out, -1) @ v, torch.logsumexp(out, -1)


def check(name, out, expected, tol=TOL):
    reason = compare(name, out, expected, tol)
    assert reason is None, reason


# ---- reference --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["alibi_causal", "softcap", "document"])
def test_reference_matches_float64(case):
    q, k, v, score_mod, mask_mod = make(case)
    q, k, v = q[:1, :, :9], k[:1, :, :9], v[:1, :, :9]  # the truth loops per element
    out, lse = reference_of(q, k, v, score_mod, mask_mod)
    want_out, want_lse = float64_truth(q, k, v, score_mod, mask_mod)
    check("out", out, want_out, 1e-5)
    check("lse", lse, want_lse, 1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_torch_eager_flex(case):
    q, k, v, score_mod, mask_mod = make(case)
    B, H, sq, _ = q.shape
    bm = torch_mask(mask_mod, B, H, sq, k.shape[2])
    want, want_lse = tflex.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm,
                                          enable_gqa=True, return_lse=True)
    out, lse = flex_attention(q, k, v, score_mod, bm, enable_gqa=True, return_lse=True,
                              backend="reference")
    check("out", out, want)
    check("lse", lse, want_lse)


@pytest.mark.parametrize("mask_mod", [causal, sliding_window, document, per_batch_length])
def test_kpt_block_mask_matches_torch(mask_mod):
    theirs = tflex.create_block_mask(mask_mod, 2, None, 33, 33, device=DEVICE, BLOCK_SIZE=BS)
    ours = create_block_mask(mask_mod, 2, None, 33, 33, DEVICE, BS)
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name).long(), getattr(theirs, name).long()), name
    dev = torch.device(DEVICE)
    mine = kbm.normalize(ours, 2, 4, 33, 33, dev).dense()
    torchs = kbm.normalize(theirs, 2, 4, 33, 33, dev).dense()
    assert torch.equal(mine, torchs)


# ---- triton vs reference ------------------------------------------------------------------------


@pytest.mark.parametrize("builder", ["torch", "kpt"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case, builder):
    q, k, v, score_mod, mask_mod = make(case, seed=1)
    B, H, sq, _ = q.shape
    bm = (torch_mask if builder == "torch" else kpt_mask)(mask_mod, B, H, sq, k.shape[2])
    out, lse = flex_attention(q, k, v, score_mod, bm, enable_gqa=True, return_lse=True,
                              backend="triton")
    want, want_lse = reference_of(q, k, v, score_mod, mask_mod)
    check("out", out, want)
    check("lse", lse, want_lse)


@pytest.mark.parametrize("case", GRAD_CASES)
def test_triton_gradients_match_reference_autograd(case):
    B, H, Hkv, sq, skv, d, score_mod, mask_mod = CASES[case]
    bm = kpt_mask(mask_mod, B, H, sq, skv)
    grads = []
    for backend in ("triton", None):
        q, k, v, _, _ = make(case, seed=2, requires_grad=True)
        if backend is None:
            out, lse = reference_of(q, k, v, score_mod, mask_mod)
        else:
            out, lse = flex_attention(q, k, v, score_mod, bm, enable_gqa=True, return_lse=True,
                                      backend=backend)
        weight = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
        # The lse term checks the gradient that flows through the returned lse.
        ((out * weight).sum() + 0.3 * lse.nan_to_num(0, 0, 0).sum()).backward()
        grads.append((q.grad, k.grad, v.grad))
    for name, got, want in zip(("dq", "dk", "dv"), *grads):
        check(name, got, want, 5e-5)


def test_half_precision_forward():
    q, k, v, score_mod, mask_mod = make("alibi_causal", dtype=torch.float16)
    bm = kpt_mask(mask_mod, 1, 4, 33, 33)
    out = flex_attention(q, k, v, score_mod, bm, backend="triton")
    want, _ = reference_of(q, k, v, score_mod, mask_mod)
    # p is rounded to fp16 before the PV product: about one fp16 ulp (2^-11) norm-wise.
    check("out", out, want, 2e-3)


# ---- translation, fallback, cache -------------------------------------------------------------


def _problem(score_mod, mask_mod=None):
    q, k, v, _, _ = make("plain")
    tables = kbm.all_full(33, 33, 64, q.device)
    return problem_of(q, k, v, _codegen.translate(score_mod, mask_mod), tables, False)


def erf_mod(score, b, h, q_idx, kv_idx):
    return torch.erf(score)


def branchy_mod(score, b, h, q_idx, kv_idx):
    if score > 0:
        return score
    return score * 0.5


def test_unsupported_mod_falls_back_with_reason():
    reasons = SPEC.reasons("triton", _problem(erf_mod))
    assert any("unsupported operation torch.erf" in r for r in reasons), reasons
    reasons = SPEC.reasons("triton", _problem(branchy_mod))
    assert any("data-dependent Python control flow" in r for r in reasons), reasons
    q, k, v, _, _ = make("plain")
    out = flex_attention(q, k, v, erf_mod)  # dispatch chooses the reference
    want, _ = reference_of(q, k, v, erf_mod, None)
    check("out", out, want)
    with pytest.raises(ValueError, match="torch.erf"):
        flex_attention(q, k, v, erf_mod, backend="triton")


def _softcap_factory(cap):
    def mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return mod


def _bias_factory(table):
    def mod(score, b, h, q_idx, kv_idx):
        return score + table[h]
    return mod


def test_kernel_cache_keys_follow_code_and_scalars():
    first, again = _codegen.translate(_softcap_factory(20.0), None), None
    entries = len(_codegen._CODE_CACHE)
    again = _codegen.translate(_softcap_factory(20.0), None)
    assert again.key == first.key and len(_codegen._CODE_CACHE) == entries  # a cache hit
    other = _codegen.translate(_softcap_factory(30.0), None)
    assert other.key != first.key
    t1 = _codegen.translate(_bias_factory(torch.randn(2)), None)
    new_table = torch.randn(2)
    t2 = _codegen.translate(_bias_factory(new_table), None)
    assert t1.key == t2.key and t2.buffers[0] is new_table


def test_composed_mods_reuse_their_translation_with_new_tensors(monkeypatch):
    """Composed mods (``and_masks(causal(), document(ids))``) hold their tensors in closures of
    closures, inside a tuple for the second mask: found there, so a call with new ids of the
    same shape reuses the translation (no trace) and reads the new tensors."""
    from kpt.ops.flex_attention import mods

    def composed(ids, slopes):
        return (mods.alibi(slopes),
                mods.and_masks(mods.causal(), mods.sliding_window(9), mods.document(ids)))

    first = _codegen.translate(*composed(torch.tensor([0, 0, 1, 1]), torch.ones(2)))
    traced = []
    real = _codegen._translate
    monkeypatch.setattr(_codegen, "_translate", lambda *a: traced.append(a) or real(*a))
    ids, slopes = torch.tensor([3, 4, 4, 4]), torch.full((2,), 0.5)
    again = _codegen.translate(*composed(ids, slopes))
    assert not traced and again.key == first.key
    assert {id(b) for b in again.buffers} == {id(ids), id(slopes)}
    assert len(again.buffers) == len(first.buffers) == 2
    # Different composition: a different code key, traced.
    _codegen.translate(None, mods.and_masks(mods.document(ids), mods.causal()))
    assert traced


def test_new_captured_values_reuse_the_kernel_and_stay_correct():
    from kpt.ops.flex_attention import _triton

    q, k, v, _, _ = make("plain")
    keys = set()
    for seed in range(2):
        table = torch.randn(2, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        mod = _bias_factory(table)
        out = flex_attention(q, k, v, mod, backend="triton")
        check("out", out, reference_of(q, k, v, mod, None)[0])
        keys.add(_codegen.translate(mod, None).key)
    assert len(keys) == 1 and keys <= set(_triton._MODULES)


def test_generated_source_is_on_disk_and_has_derivative():
    from kpt.ops.flex_attention import _triton

    t = _codegen.translate(softcap, None)
    assert t.reason is None and t.grad_reason is None
    q, k, v, _, _ = make("softcap")
    flex_attention(q, k, v, softcap, backend="triton")
    path = _triton._MODULES[t.key].__file__
    source = open(path).read()
    assert "_kpt_tanh" in source and "def _score_grad" in source


def _slope_factory(table):
    def mod(score, b, h, q_idx, kv_idx):
        return score + table[h] * (kv_idx - q_idx)
    return mod


def test_captured_tensor_gradient_uses_autograd():
    """A captured tensor that requires grad gets its gradient (through the reference with
    autograd). The mod varies along the keys, so the gradient is not 0: a per-head constant
    such as ``table[h]`` cancels in the softmax, and its exact gradient is 0."""
    q, k, v, _, _ = make("plain")
    g = torch.Generator().manual_seed(3)
    table = (torch.randn(2, generator=g) * 0.1).to(DEVICE).requires_grad_(True)
    weights = torch.randn(q.shape[:3] + (v.shape[-1],), generator=g).to(DEVICE)
    (flex_attention(q, k, v, _slope_factory(table)) * weights).sum().backward()
    # The same loss in float64 with the Python mod, differentiated by torch.
    table64 = table.detach().double().requires_grad_(True)
    out64 = float64_truth(q, k, v, _slope_factory(table64), None)[0]
    (out64 * weights.double()).sum().backward()
    assert table.grad is not None
    check("d table", table.grad, table64.grad, 1e-4)  # fp32 forward and backward vs float64


@pytest.mark.parametrize("bad", ["ndim", "head_dim", "heads", "dtype", "score_mod", "length",
                                 "block_mask"])
def test_bad_input_is_rejected_before_launch(bad, monkeypatch):
    from kpt.ops.flex_attention import _triton

    monkeypatch.setattr(_triton, "run", lambda *a: pytest.fail("launched"))
    q, k, v, _, _ = make("plain")
    args = dict(query=q, key=k, value=v)
    kwargs = {}
    if bad == "ndim":
        args["query"] = q[0]
    elif bad == "head_dim":
        args["key"] = k[..., :8]
    elif bad == "heads":
        args["key"], args["value"] = k[:, :1], v[:, :1]
    elif bad == "dtype":
        args["value"] = v.half()
    elif bad == "score_mod":
        kwargs["score_mod"] = 3
    elif bad == "length":
        kwargs["block_mask"] = create_block_mask(causal, 1, 1, 32, 33, DEVICE, BS)
    else:
        kwargs["block_mask"] = "causal"
    with pytest.raises((ValueError, TypeError), match="flex_attention"):
        flex_attention(**args, **kwargs, backend="triton")


# ---- torch.compile ----------------------------------------------------------------------------

SOFTCAP = 3.0  # a module-level scalar a mod reads: changing it must re-trace compiled callers


def softcap_global(score, b, h, q_idx, kv_idx):
    return SOFTCAP * torch.tanh(score / SOFTCAP)


def sin_mod(score, b, h, q_idx, kv_idx):  # not translatable: compiled as the traced reference
    return score + torch.sin(score)


# name: (score_mod, mask_mod, block mask builder)
COMPILE_CASES = {
    "causal_kpt_mask": (None, causal, "kpt"),
    "causal_torch_mask": (None, causal, "torch"),
    "softcap": (softcap, None, None),
    "alibi_causal_torch_mask": (alibi, causal, "torch"),
    "alibi_causal_kpt_mask": (alibi, causal, "kpt"),
}


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()  # parametrized cases share code objects; no recompile limits
    return torch.compile(fn, backend=backend, fullgraph=True)


def _compile_inputs(mask_mod, builder, requires_grad):
    q, k, v, _, _ = make("alibi_causal", requires_grad=requires_grad)  # H = 4 = len(SLOPES)
    B, H, sq, _ = q.shape
    maker = {"kpt": kpt_mask, "torch": torch_mask}.get(builder)
    return q, k, v, maker(mask_mod, B, H, sq, k.shape[2]) if maker else None


def _check_fwd_bwd(fn, q, k, v, extra=()):
    compiled = _compiled(fn)
    out, lse = compiled(q, k, v)
    out_e, lse_e = fn(q, k, v)
    check("out", out, out_e)
    check("lse", lse, lse_e)
    inputs = (q, k, v, *extra)
    grads = torch.autograd.grad((out * out).sum() + lse.sum(), inputs)
    expected = torch.autograd.grad((out_e * out_e).sum() + lse_e.sum(), inputs)
    for name, g, e in zip("q k v buffer".split(), grads, expected):
        check(f"d{name}", g, e)


@pytest.mark.parametrize("dynamo_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_fullgraph_forward(case, dynamo_backend):
    score_mod, mask_mod, builder = COMPILE_CASES[case]
    q, k, v, bm = _compile_inputs(mask_mod, builder, requires_grad=False)

    def fn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)

    check("out", _compiled(fn, dynamo_backend)(q, k, v), fn(q, k, v))


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_fullgraph_backward(case):
    score_mod, mask_mod, builder = COMPILE_CASES[case]
    q, k, v, bm = _compile_inputs(mask_mod, builder, requires_grad=True)
    _check_fwd_bwd(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=bm,
                                                  return_lse=True), q, k, v)


@pytest.mark.parametrize("case", ["softcap", "alibi_causal_torch_mask"])
def test_compile_fullgraph_triton(case):
    score_mod, mask_mod, builder = COMPILE_CASES[case]
    q, k, v, bm = _compile_inputs(mask_mod, builder, requires_grad=True)
    _check_fwd_bwd(lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=bm,
                                                  return_lse=True, backend="triton"), q, k, v)


def test_compile_graph_has_the_op_and_captured_tensors_as_inputs(monkeypatch):
    graphs = []

    def backend(gm, _example_inputs):
        graphs.append(gm)
        return gm

    q, k, v, bm = _compile_inputs(causal, "torch", requires_grad=False)
    compiled = _compiled(lambda q, k, v: flex_attention(q, k, v, alibi, bm), backend)
    compiled(q, k, v)
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.kpt.flex_attention in targets or \
        torch.ops.kpt.flex_attention.default in targets
    # The slopes are a graph input: new values (even a new tensor) reuse the graph.
    monkeypatch.setattr(sys.modules[__name__], "SLOPES", SLOPES.flip(0) * 3)
    new = compiled(q, k, v)
    assert len(graphs) == 1
    check("out", new, flex_attention(q, k, v, alibi, bm))
    # A scalar the mod reads decides the kernel: a new value re-traces instead of reusing it.
    compiled = _compiled(lambda q, k, v: flex_attention(q, k, v, softcap_global))
    first = compiled(q, k, v)
    monkeypatch.setattr(sys.modules[__name__], "SOFTCAP", 1.5)
    second = compiled(q, k, v)
    check("out", second, flex_attention(q, k, v, softcap_global))
    assert (second - first).abs().max() > 1e-3


def test_compile_untranslated_mod_and_learnable_buffer_trace_the_reference():
    q, k, v, bm = _compile_inputs(causal, "kpt", requires_grad=True)
    _check_fwd_bwd(lambda q, k, v: flex_attention(q, k, v, sin_mod, bm, return_lse=True),
                   q, k, v)
    table = SLOPES.clone().requires_grad_(True)
    mod = _bias_factory(table)
    _check_fwd_bwd(lambda q, k, v: flex_attention(q, k, v, mod, bm, return_lse=True),
                   q, k, v, extra=(table,))
    with pytest.raises(Exception, match="cannot run this call under torch.compile"):
        _compiled(lambda q, k, v: flex_attention(q, k, v, sin_mod, backend="triton"))(q, k, v)
