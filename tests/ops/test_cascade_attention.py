"""merge_attention_states: attention over two disjoint key sets merged through their lse equals
attention over all the keys (float32, odd sizes), empty parts (lse = -inf) leave the other part
unchanged and two empty parts give zeros without NaN; the in-place variant; bad input."""

from __future__ import annotations

import pytest
import torch

from kpt.ops import flash_attention
from kpt.ops.cascade_attention import merge_attention_states, merge_attention_states_


def _parts(seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 5, 6, 24, generator=gen).to(dtype)  # (B, Sq, H, D)
    k = torch.randn(2, 19, 3, 24, generator=gen).to(dtype)
    v = torch.randn(2, 19, 3, 24, generator=gen).to(dtype)
    whole = flash_attention(q, k, v, return_lse=True, backend="reference")
    a = flash_attention(q, k[:, :7], v[:, :7], return_lse=True, backend="reference")
    b = flash_attention(q, k[:, 7:], v[:, 7:], return_lse=True, backend="reference")
    lse = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  (B, H, Sq) -> (B, Sq, H)
    return (whole[0], lse(whole[1])), (a[0], lse(a[1])), (b[0], lse(b[1]))


# float32: the merge is exact math up to rounding (~1e-7 relative); bf16 inputs: the parts
# were each rounded to bf16 once, so the merged output is within ~1 bf16 ulp (2^-8) of the
# whole, norm-wise.
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_merge_equals_attention_over_all_keys(dtype, tol):
    (o, lse), (o_a, lse_a), (o_b, lse_b) = _parts(1, dtype)
    got, got_lse = merge_attention_states(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(got_lse, lse, rtol=1e-5, atol=1e-5)
    err = (got.double() - o.double()).norm() / o.double().norm()
    assert err < tol, err
    # the check can fail: one part alone is not the whole
    assert (o_a.double() - o.double()).norm() / o.double().norm() > 0.05


def test_empty_parts():
    (_, _), (o_a, lse_a), (o_b, lse_b) = _parts(2, torch.float32)
    empty = torch.full_like(lse_b, float("-inf"))
    got, got_lse = merge_attention_states(o_a, lse_a, torch.randn_like(o_b), empty)
    torch.testing.assert_close(got, o_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_lse, lse_a)
    got, got_lse = merge_attention_states(o_a, empty, o_b, empty.clone())
    assert not got.isnan().any() and not got.any() and torch.isinf(got_lse).all()


def test_in_place_variant():
    (o, lse), (o_a, lse_a), (o_b, lse_b) = _parts(3, torch.float32)
    out, out_lse = merge_attention_states_(o_a, lse_a, o_b, lse_b)
    assert out is o_a and out_lse is lse_a
    torch.testing.assert_close(o_a, o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_a, lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("override", "error", "text"), [
    (dict(o_b=torch.randn(2, 5, 6, 23)), ValueError, "differ"),
    (dict(lse_a=torch.randn(2, 5, 6, dtype=torch.float64)), TypeError, "lse_a"),
    (dict(lse_b=torch.randn(2, 6, 5)), ValueError, "shaped like o"),
    (dict(o_a=torch.randn(4)), ValueError, "must be"),
    (dict(o_a=[1.0]), TypeError, "o_a must be a torch.Tensor"),
], ids=["o shapes", "lse dtype", "lse shape", "o 1-D", "o list"])
def test_bad_input(override, error, text):
    (_, _), (o_a, lse_a), (o_b, lse_b) = _parts(4, torch.float32)
    args = dict(o_a=o_a, lse_a=lse_a, o_b=o_b, lse_b=lse_b) | override
    with pytest.raises(error, match=text) as info:
        merge_attention_states(**args)
    assert "merge_attention_states" in str(info.value)
