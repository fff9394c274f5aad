"""RMSNormQKVRoPE against HuggingFace's eager Llama and Qwen3 modules (tiny random configs).

The rule: kpt may differ from HF eager by no more than HF eager differs from a float64 run of
the same modules, output by output. Qwen3's k-norm weights are set as large as 100, where a
difference of one rounding before the norm would be magnified.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kpt.nn import RMSNormQKVRoPE
from kpt.ops.rmsnorm_qkv_rope import BACKENDS, SPEC
from tests.conftest import devices

transformers = pytest.importorskip("transformers", reason="the HF tests need transformers")
from transformers.models.llama import modeling_llama  # noqa: E402


def tiny_model(kind: str, dtype: torch.dtype, device: str):
    common = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=8192, attn_implementation="eager")
    if kind == "llama":
        config = transformers.LlamaConfig(
            **common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 1024},
            rope_theta=500000.0)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen3Config(**common, rope_theta=1000000.0)
        model = transformers.Qwen3ForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        layer = model.model.layers[0]
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        if kind == "qwen3":
            layer.self_attn.q_norm.weight.uniform_(0.5, 2.0)
            layer.self_attn.k_norm.weight.uniform_(20.0, 100.0)
    # from_pretrained(dtype=...) keeps RoPE's inverse frequencies in float32; a plain .to(dtype)
    # would round them to bf16, so they are put back as HF loads them.
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    model = model.to(device=device, dtype=dtype).eval()
    model.model.rotary_emb.inv_freq = inv_freq.to(device)
    return model


def hf_eager(model, x, position_ids):
    """HF's own modules, called in the order the eager attention calls them."""
    layer = model.model.layers[0]
    attn = layer.self_attn
    xn = layer.input_layernorm(x)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k, v = attn.q_proj(xn).view(shape), attn.k_proj(xn).view(shape), attn.v_proj(xn).view(shape)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = model.model.rotary_emb(x, position_ids)
    q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_matches_hf_eager_within_hf_error(backend, kind, device):
    dtype = torch.bfloat16
    model = tiny_model(kind, dtype, device)
    exact = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, 128, generator=gen).to(device=device, dtype=dtype)
    position_ids = torch.randint(0, 8000, (2, 37), generator=gen).to(device)
    layer = model.model.layers[0]
    fused = RMSNormQKVRoPE.from_hf(layer.input_layernorm, layer.self_attn, backend=backend)
    reasons = SPEC.reasons(backend, _problem(fused, x))
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))
    with torch.no_grad():
        hf = hf_eager(model, x, position_ids)
        truth = hf_eager(exact, x.double(), position_ids)
        ours = [t.transpose(1, 2) for t in fused(x, position_ids)]
    for name, a, h, t in zip("qkv", ours, hf, truth):
        assert a.shape == h.shape and a.dtype == dtype
        ours_vs_hf = (a.double() - h.double()).norm().item()
        hf_vs_exact = (h.double() - t).norm().item()
        assert hf_vs_exact > 0
        assert ours_vs_hf <= hf_vs_exact, (name, ours_vs_hf, hf_vs_exact)


def _problem(fused: RMSNormQKVRoPE, x: torch.Tensor):
    from tests.ops.test_rmsnorm_qkv_rope import problem_for

    args = dict(x=x, norm_weight=fused.norm_weight, qkv_weight=fused.qkv_weight,
                positions=torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device),
                num_q_heads=fused.num_q_heads, num_kv_heads=fused.num_kv_heads,
                head_dim=fused.head_dim, rotary_dim=fused.rotary_dim, eps=fused.eps,
                rope_style=fused.rope_style)
    for name in ("qkv_bias", "q_norm_weight", "k_norm_weight"):
        if getattr(fused, name) is not None:
            args[name] = getattr(fused, name)
    return problem_for(args, x.dtype, x.device.type)


def test_training_mode_is_differentiable():
    model = tiny_model("qwen3", torch.float32, "cpu")
    layer = model.model.layers[0]
    fused = RMSNormQKVRoPE.from_hf(layer.input_layernorm, layer.self_attn)
    x = torch.randn(1, 5, 128, requires_grad=True)
    q, k, v = fused(x, torch.arange(5)[None])
    (q.square().sum() + k.sum() + v.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert fused.qkv_weight.grad is not None and fused.k_norm_weight.grad is not None
    with torch.no_grad():
        q2, _, _ = fused(x, torch.arange(5)[None])
    torch.testing.assert_close(q, q2)
