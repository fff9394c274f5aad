"""Arguments at the edges of their ranges, found by scripts/adversarial.py: each gets a clear
error naming the op, or the reference's result."""

from __future__ import annotations

import pytest
import torch

from kpt.ops import flash_attention, flex_attention, rmsnorm_qkv_rope
from kpt.ops.flash_attention import SPEC as FLASH
from kpt.ops.flash_attention import Call, problem_of
from kpt.ops.flex_attention import mods


def _qkv(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(1, 9, 2, 16, generator=gen).to(dtype) for _ in range(3)]


def _triton_runs() -> bool:
    q, k, v = _qkv()
    call = Call(q, k, v, None, None, 9, 9, 0.25, -1, -1, 0.0, q, q)
    return not FLASH.reasons("triton", problem_of(call))


@pytest.mark.parametrize("softcap", [1e4, 1e8, 1e30])
def test_huge_softcap_is_plain_attention_on_triton(softcap):
    """softcap * tanh(s / softcap) -> s: the kernel's tanh stays accurate for tiny arguments."""
    if not _triton_runs():
        pytest.skip("flash_attention's Triton backend cannot run here (CPU without "
                    "TRITON_INTERPRET=1)")
    q, k, v = _qkv()
    got = flash_attention(q, k, v, softcap=softcap, backend="triton")
    want = flash_attention(q, k, v, backend="reference")
    err = (got.double() - want.double()).norm() / want.double().norm()
    assert err < 2**-7, err  # bf16: within two units, norm-wise, like every kernel test


@pytest.mark.parametrize("window", [(2**64, 0), (0, 2**31)])
def test_window_past_int32_is_rejected(window):
    q, k, v = _qkv(torch.float32)
    with pytest.raises(ValueError, match="flash_attention: window"):
        flash_attention(q, k, v, window=window)


def test_rope_theta_of_the_wrong_type():
    x = torch.randn(1, 3, 32)
    w = torch.randn(8 * 4, 32)
    with pytest.raises(ValueError, match="rmsnorm_qkv_rope: rope_theta"):
        rmsnorm_qkv_rope(x, torch.ones(32), w, torch.arange(3), num_q_heads=4,
                         num_kv_heads=2, head_dim=4, rope_theta=[10000.0])


def test_flex_flags_must_be_bools():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(TypeError, match="flex_attention: return_lse must be a bool"):
        flex_attention(q, q, q, return_lse="no")


@pytest.mark.parametrize("heads", [0, -3, 2.5, True])
def test_alibi_slopes_need_a_positive_head_count(heads):
    with pytest.raises(ValueError, match="flex_attention: alibi_slopes"):
        mods.alibi_slopes(heads)
