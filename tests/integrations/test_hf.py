"""kpt.integrations.hf.patch on tiny random-weight models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch

import kpt.integrations.hf as kpt_hf
from kpt.ops.rmsnorm_qkv_rope import SPEC

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")

CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
}


def tiny(model_type: str, attn: str = "eager", dtype=torch.float32):
    config_cls, model_cls, extra = CONFIGS[model_type]
    config = config_cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=256, attn_implementation=attn, **extra)
    torch.manual_seed(0)
    return model_cls(config).to(dtype).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_patched_model_matches_and_unpatch_restores(model_type, attn, monkeypatch):
    model = tiny(model_type, attn)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        launches = []
        original = SPEC.launch
        monkeypatch.setattr(SPEC, "launch", lambda *a, **k: launches.append(1) or original(*a, **k))
        handle = kpt_hf.patch(model)
        assert handle.patched == ["model.layers.0", "model.layers.1"] and not handle.skipped
        patched = model(ids).logits
        assert len(launches) == 2  # one fused call per layer: the patched path really ran
        handle.unpatch()
        after = model(ids).logits
    # float32 model, reference backend on the CPU: the same arithmetic as HF's modules up to the
    # summation order of the projection.
    torch.testing.assert_close(patched, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(hasattr(layer, "kpt_qkv") for layer in model.model.layers)


def test_generation_with_kv_cache_matches():
    model = tiny("qwen3", "sdpa")
    ids = torch.randint(0, 96, (1, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        kpt_hf.patch(model)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        kpt_hf.unpatch(model)
    assert torch.equal(got, expected)


def test_patch_shares_parameters_instead_of_copying():
    model = tiny("llama")
    handle = kpt_hf.patch(model)
    layer = model.model.layers[0]
    fused = layer.kpt_qkv
    assert layer.self_attn.q_proj.weight.data_ptr() == fused.qkv_weight.data_ptr()
    assert fused.norm_weight is layer.input_layernorm.weight
    with torch.no_grad():
        layer.self_attn.k_proj.weight.mul_(2.0)  # a view: the fused weight sees the change
    rows = layer.self_attn.q_proj.weight.shape[0]
    assert torch.equal(fused.qkv_weight[rows : rows + 32], layer.self_attn.k_proj.weight)
    handle.unpatch()


def test_patch_rejects_unknown_model_type_and_double_patch():
    model = tiny("llama")
    kpt_hf.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        kpt_hf.patch(model)
    kpt_hf.unpatch(model)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        kpt_hf.patch(model)


def test_unsupported_rope_is_skipped_with_reason_or_raises_when_strict():
    model = tiny("llama")
    model.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    handle = kpt_hf.patch(model)
    assert not handle.patched
    assert all("yarn" in " ".join(r) for r in handle.skipped.values())
    handle.unpatch()
    with pytest.raises(ValueError, match="yarn"):
        kpt_hf.patch(model, strict=True)
