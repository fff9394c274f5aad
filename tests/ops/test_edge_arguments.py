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


def _triton_reasons() -> list[str]:
    """Why flash_attention's Triton backend cannot run a small bf16 call here (its own
    declarations); empty when it can."""
    q, k, v = _qkv()
    call = Call(q, k, v, None, None, 9, 9, 0.25, -1, -1, 0.0, q, q)
    return FLASH.reasons("triton", problem_of(call))


@pytest.mark.parametrize("softcap", [1e4, 1e8, 1e30])
def test_huge_softcap_is_plain_attention_on_triton(softcap):
    """softcap * tanh(s / softcap) -> s: the kernel's tanh stays accurate for tiny arguments."""
    if _triton_reasons():
        pytest.skip("triton: " + "; ".join(_triton_reasons()))
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


def test_flex_triton_bf16_matches_the_reference():
    """bf16 through flex's generated kernels, forward and backward (under the interpreter its
    dots once took bf16 bits as integers: entries of ~1e9)."""
    from kpt.ops.flex_attention import SPEC as FLEX

    if "triton" not in [b.name for b in FLEX.backends] or _triton_reasons():
        pytest.skip("triton: " + "; ".join(_triton_reasons() or ["flex has no triton backend"]))
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 33, 16, generator=gen).to(torch.bfloat16).requires_grad_()
    outs = [flex_attention(q, q, q, backend=b) for b in ("triton", "reference")]
    grads = [torch.autograd.grad(o.float().square().sum(), q)[0] for o in outs]
    for got, want in ((outs[0], outs[1]), (grads[0], grads[1])):
        err = (got.double() - want.double()).norm() / want.double().norm()
        assert err < 2**-6, err  # bf16: a few units of rounding, norm-wise (gradients: two
        # roundings of P and dS more than the output)


def test_from_hf_refuses_gemma_norms_and_takes_the_real_rotary_dim():
    transformers = pytest.importorskip("transformers", reason="the HF layers come from it")
    from kpt.nn import RMSNormQKVRoPE

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64)
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small)).model.layers[0]
    with pytest.raises(ValueError, match="1 \\+ weight"):
        RMSNormQKVRoPE.from_hf(gemma.input_layernorm, gemma.self_attn)
    llama_model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**small, partial_rotary_factor=0.5)).model
    layer = llama_model.layers[0]
    real = 2 * llama_model.rotary_emb.inv_freq.numel()
    # by default, what the model's own rotary embedding rotates (Llama: every feature)
    fused = RMSNormQKVRoPE.from_hf(layer.input_layernorm, layer.self_attn)
    assert fused.rotary_dim == real == 16
    x, pos = torch.randn(1, 5, 64), torch.arange(5)[None]
    q, k, _ = fused(x, pos)
    normed = layer.input_layernorm(x)
    cos, sin = llama_model.rotary_emb(normed, pos)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hq = layer.self_attn.q_proj(normed).view(1, 5, 4, 16).transpose(1, 2)
    hk = layer.self_attn.k_proj(normed).view(1, 5, 2, 16).transpose(1, 2)
    want_q, want_k = apply_rotary_pos_emb(hq, hk, cos, sin)
    # float32 on the reference: the same operations in another order, a few ulps
    torch.testing.assert_close(q, want_q.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want_k.transpose(1, 2), rtol=1e-5, atol=1e-5)
    # a model whose rotary embedding honours partial_rotary_factor (GLM) rotates half
    glm = transformers.GlmForCausalLM(transformers.GlmConfig(
        **{**small, "vocab_size": 200000}, pad_token_id=0, partial_rotary_factor=0.5)).model
    built = RMSNormQKVRoPE.from_hf(glm.layers[0].input_layernorm, glm.layers[0].self_attn)
    assert built.rotary_dim == 2 * glm.rotary_emb.inv_freq.numel() == 8
