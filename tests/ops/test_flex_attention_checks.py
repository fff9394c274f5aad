"""flex_attention's shared checks of score_mod / mask_mod (``_checks``): a mod that is not
elementwise (a reduction, a slice, a transpose), returns the wrong kind of value, or branches
on its arguments in Python is rejected before any backend runs, with one error naming
``flex_attention`` and the rule, whatever backend was asked for. Valid mods the Triton tracer
cannot translate (``torch.erf``, ``torch.sin``) still run, on the reference.

Before these checks the reference backend broadcast a reduced or sliced score over the whole
score tensor and returned uniform attention without an error, and data-dependent branching gave
it an obscure "Boolean value of Tensor ... is ambiguous".
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kpt.ops._common import compare
from kpt.ops.flex_attention import SPEC, _checks, create_block_mask, flex_attention
from kpt.ops.flex_attention import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, SQ, SKV, D, BS = 1, 2, 33, 33, 16, 16
# Every backend name, and None (dispatch's choice): the verdict must not depend on it.
BACKENDS = [None, *(b.name for b in SPEC.backends)]
# fp32 reference against float64 attention over 33 keys: a few float32 ulps of values of
# order 1; the bound leaves a wide margin.
TOL = 2e-5


@pytest.fixture(autouse=True)
def _fresh_checks():
    """Each test sees mods as new: no verdict remembered from another test."""
    _checks.forget()
    yield
    _checks.forget()


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if any backend is chosen or launched."""
    def refuse(*_args, **_kwargs):
        pytest.fail("a backend was chosen for a call the checks must reject")

    monkeypatch.setattr(SPEC, "choose", refuse)
    monkeypatch.setattr(SPEC, "launch", refuse)


def _qkv(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g).to(DEVICE, dtype) for n in (SQ, SKV, SKV))


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


# name: (score_mod, error type, words of the message)
BAD_SCORE_MODS = {
    "sum": (lambda s, b, h, q, kv: s.sum(), ValueError, "not elementwise"),
    "row_softmax_shift": (lambda s, b, h, q, kv: s - s.amax(-1, keepdim=True), ValueError,
                          "not elementwise"),
    "slice": (lambda s, b, h, q, kv: s[..., :1], ValueError, "not elementwise"),
    "transpose": (lambda s, b, h, q, kv: s.transpose(-1, -2), ValueError, "returned shape"),
    "tuple": (lambda s, b, h, q, kv: (s, s), TypeError, "must return a tensor"),
    "bool": (lambda s, b, h, q, kv: q >= kv, TypeError, "must return a score"),
    "complex": (lambda s, b, h, q, kv: torch.complex(s, s), TypeError, "real score"),
    "if_on_score": (lambda s, b, h, q, kv: s if s > 0 else s * 0.5, ValueError,
                    "data-dependent Python control flow"),
    "if_on_head": (lambda s, b, h, q, kv: s if h == 0 else -s, ValueError,
                   "data-dependent Python control flow"),
    "python_max": (lambda s, b, h, q, kv: max(s, s * 0.5), ValueError,
                   "data-dependent Python control flow"),
    "list_index": (lambda s, b, h, q, kv: s + [0.0, 1.0][h], ValueError,
                   "used as a Python int"),
    "float_of_index": (lambda s, b, h, q, kv: s + float(q), ValueError,
                       "used as a Python int"),
    # Untranslatable first (torch.erf), then a branch: seen by the probe on real tensors.
    "erf_then_if": (lambda s, b, h, q, kv: torch.erf(s) if q > kv else s, ValueError,
                    "data-dependent Python control flow"),
}


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("name", list(BAD_SCORE_MODS))
def test_bad_score_mod_is_rejected_before_any_backend(name, backend, no_launch):
    score_mod, error, words = BAD_SCORE_MODS[name]
    q, k, v = _qkv()
    with pytest.raises(error, match=words) as info:
        flex_attention(q, k, v, score_mod, backend=backend)
    assert str(info.value).startswith("flex_attention: score_mod")


@pytest.mark.parametrize("name", list(BAD_SCORE_MODS))
def test_bad_score_mod_gets_one_message_on_every_backend(name, no_launch):
    score_mod = BAD_SCORE_MODS[name][0]
    q, k, v = _qkv()
    messages = set()
    for backend in BACKENDS:
        _checks.forget()  # each backend checks the mod afresh, not from a remembered verdict
        with pytest.raises((TypeError, ValueError)) as info:
            flex_attention(q, k, v, score_mod, backend=backend)
        messages.add((type(info.value), str(info.value)))
    assert len(messages) == 1, messages


# name: (mask_mod, error type, words of the message)
BAD_MASK_MODS = {
    "int": (lambda b, h, q, kv: q - kv, TypeError, "must return bool"),
    "float": (lambda b, h, q, kv: (q >= kv) * 1.0, TypeError, "must return bool"),
    "any": (lambda b, h, q, kv: (q >= kv).any(), ValueError, "not elementwise"),
    "slice": (lambda b, h, q, kv: (q >= kv)[..., :1], ValueError, "not elementwise"),
    "if_on_head": (lambda b, h, q, kv: q >= kv if h == 0 else q <= kv, ValueError,
                   "data-dependent Python control flow"),
    "python_and": (lambda b, h, q, kv: (q >= kv) and (q - kv < 4), ValueError,
                   "data-dependent Python control flow"),
}


def _block_mask_with(mask_mod):
    """A BlockMask with partial blocks whose mask_mod is ``mask_mod`` (built from a valid
    causal mask, as a hand-made or torch-built BlockMask can carry any callable)."""
    good = create_block_mask(causal, B, H, SQ, SKV, DEVICE, BS)
    return dataclasses.replace(good, mask_mod=mask_mod)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("name", list(BAD_MASK_MODS))
def test_bad_mask_mod_is_rejected_before_any_backend(name, backend, no_launch):
    mask_mod, error, words = BAD_MASK_MODS[name]
    q, k, v = _qkv()
    block_mask = _block_mask_with(mask_mod)
    with pytest.raises(error, match=words) as info:
        flex_attention(q, k, v, block_mask=block_mask, backend=backend)
    assert str(info.value).startswith("flex_attention: mask_mod")


@pytest.mark.parametrize("name", list(BAD_MASK_MODS))
def test_create_block_mask_applies_the_same_rules(name):
    """kpt's create_block_mask evaluates the mask_mod first: it rejects it the same way."""
    mask_mod, error, words = BAD_MASK_MODS[name]
    with pytest.raises(error, match=words) as info:
        create_block_mask(mask_mod, B, H, SQ, SKV, DEVICE, BS)
    assert str(info.value).startswith("flex_attention: mask_mod")


def _float64_attention(q, k, v, score_mod, mask_mod):
    """Attention in float64 with the mods called on one element at a time (torch's vmap
    semantics): what an elementwise mod means."""
    q, k, v = (t.double() for t in (q, k, v))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    out = torch.empty_like(s)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in s.shape)).tolist():
        b, h, i, j = (torch.tensor(x, device=s.device) for x in idx)
        x = s[tuple(idx)]
        x = score_mod(x, b, h, i, j) if score_mod else x
        keep = bool(mask_mod(b, h, i, j)) if mask_mod else True
        out[tuple(idx)] = x if keep else float("-inf")
    return torch.softmax(out, -1) @ v


# name: (score_mod, mask_mod); none of them is translated to Triton, all are elementwise.
VALID_UNTRANSLATED = {
    "erf": (lambda s, b, h, q, kv: torch.erf(s), None),
    "sin_of_positions_only": (lambda s, b, h, q, kv: torch.sin((q - kv) * 0.1), None),
    "integer_score": (lambda s, b, h, q, kv: torch.remainder(q - kv, 3).to(torch.int32), None),
    "erf_mask": (None, lambda b, h, q, kv: torch.erf((q - kv) * 1.0 + 0.5) > 0),
}


@pytest.mark.parametrize("name", list(VALID_UNTRANSLATED))
def test_valid_untranslated_mods_still_run(name):
    """The checks do not reject what every backend can run: elementwise mods the Triton path
    does not translate go to the reference, and agree with per-element float64 attention."""
    score_mod, mask_mod = VALID_UNTRANSLATED[name]
    q, k, v = _qkv(1)
    small = tuple(t[:, :, :9] for t in (q, k, v))  # per-element truth: keep it small
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, B, H, 9, 9, DEVICE, BS)
    out = flex_attention(*small, score_mod, block_mask)
    truth = _float64_attention(*small, score_mod, mask_mod)
    reason = compare(name, out, truth, TOL)
    assert reason is None, reason


def test_valid_mod_is_probed_once_per_code(monkeypatch):
    """The probe of an untranslated mod is remembered per mod code: a second call (or another
    closure of the same code) costs no probe; different code is probed again."""
    probes = []
    real = _checks._probe
    monkeypatch.setattr(_checks, "_probe", lambda *args: probes.append(args[0]) or real(*args))
    q, k, v = _qkv(2)

    def scaled_erf(factor):
        def score_mod(s, b, h, q_idx, kv_idx):
            return torch.erf(s * factor)
        return score_mod

    for factor in (0.5, 0.5):
        flex_attention(q, k, v, scaled_erf(factor))
    assert probes == ["score_mod"]
    flex_attention(q, k, v, scaled_erf(2.0))  # another scalar: other code, probed again
    assert probes == ["score_mod", "score_mod"]


def test_reference_with_a_reduction_no_longer_returns_uniform_attention():
    """The bug the checks close: the reference broadcast ``s.sum()`` over the scores (every row
    uniform, no error). The reference itself still would; flex_attention must not reach it."""
    q, k, v = _qkv(3)
    reduction = BAD_SCORE_MODS["sum"][0]
    out, _ = ref.attention(q, k, v, reduction, None, D ** -0.5)
    uniform = v.mean(2, keepdim=True).expand_as(out)
    # Uniform weights: the mean of v over the keys, up to float32 summation order.
    torch.testing.assert_close(out, uniform, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not elementwise"):
        flex_attention(q, k, v, reduction, backend="reference")


@pytest.mark.parametrize("name", ["sum", "if_on_score"])
def test_compiled_calls_apply_the_same_rules(name):
    """Under torch.compile the plan (run eagerly while tracing) applies the checks; dynamo
    wraps the error, whose message is the eager one."""
    score_mod = BAD_SCORE_MODS[name][0]
    q, k, v = _qkv(4)
    with pytest.raises(ValueError) as eager:
        flex_attention(q, k, v, score_mod)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: flex_attention(q, k, v, score_mod),
                             backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="flex_attention: score_mod") as info:
        compiled(q, k, v)
    assert str(eager.value).split(";")[0] in str(info.value)
