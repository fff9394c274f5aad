"""kpt.integrations.hf.patch on tiny random-weight MoE models (Qwen3-MoE, Qwen2-MoE with its
gated shared expert, Mixtral, DeepSeek-V3 with grouped sigmoid routing and shared experts),
built from configs (no downloads).

float32 on the CPU: ``moe_route`` and ``fused_moe`` run their reference backend, which differs
from HF's routers and per-expert loops only in summation order (HF adds expert by expert, kpt
token by token), so logits agree to a few float32 ulps of O(1) values (1e-5), as in
test_hf.py. A wrong routing option (renormalisation, a scaling factor, a dropped group) or a
missing shared expert moves logits by ~1e-1. The MoE weights are re-drawn at O(1) scale
(HF's 0.02 init would make the experts' share of the residual stream, and so the test, weak)
and the routers' logits spread out (no near-ties whose order a float32 ulp could flip).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")

import kpt.integrations.hf as kpt_hf  # noqa: E402
import kpt.nn.moe as kpt_moe  # noqa: E402
from kpt.integrations import _hf_moe  # noqa: E402
from tests.integrations.test_hf import TOL, VOCAB, _loss, padded_batch  # noqa: E402

SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
             intermediate_size=96)
FAMILIES = {
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True)),
    # Layer 0 dense (mlp_only_layers), weights not renormalised.
    "qwen3_moe-dense0": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                         dict(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                              norm_topk_prob=False, mlp_only_layers=[0])),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                       shared_expert_intermediate_size=40)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                     sliding_window=5)),
    # Layer 0 dense (first_k_dense_replace); MLA attention stays HF's.
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    dict(moe_intermediate_size=24, n_routed_experts=16, num_experts_per_tok=4,
                         n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                         routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16,
                         q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
                         v_head_dim=16, head_dim=8, num_key_value_heads=4)),
}
DENSE = {"qwen3_moe-dense0": ["model.layers.0.mlp"], "deepseek_v3": ["model.layers.0.mlp"]}


def tiny(family: str, dtype=torch.float32, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**SMALL, **extra, **overrides}, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
        for path in moe_paths(model):
            # O(1) expert outputs; router logits of spread ~2 (see the module docstring)
            for name, p in model.get_submodule(path).named_parameters():
                p.normal_(0, (4.0 if name == "gate.weight" else 1.0) / p.shape[-1] ** 0.5)
            for b in model.get_submodule(path).buffers():  # DeepSeek's correction bias
                b.normal_(0, 0.3)
    return model


def moe_paths(model) -> list[str]:
    return [p for p, m in model.named_modules() if _hf_moe.family_of(m) is not None]


@pytest.fixture
def op_calls(monkeypatch):
    """Counts of kpt's MoE op calls made by the patched blocks."""
    calls = {"moe_route": 0, "fused_moe": 0}

    def counting(name):
        original = getattr(kpt_moe, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return call

    for name in calls:
        monkeypatch.setattr(kpt_moe, name, counting(name))
    return calls


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_matches_hf_and_unpatch_restores(family, op_calls):
    model = tiny(family)
    ids, mask = padded_batch([9, 4, 7, 1])
    blocks = moe_paths(model)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        handle = kpt_hf.patch(model)
        assert set(blocks) <= set(handle.patched)
        assert sorted(handle.skipped) == DENSE.get(family, [])
        assert all("dense" in " ".join(r) for r in handle.skipped.values())
        patched = model(ids, attention_mask=mask).logits
        handle.unpatch()
        after = model(ids, attention_mask=mask).logits
    assert op_calls == {"moe_route": len(blocks), "fused_moe": len(blocks)}
    real = mask.bool()
    torch.testing.assert_close(patched[real], before[real], **TOL)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert list(model.parameters()) == params
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for path in blocks:
        block = model.get_submodule(path)
        for module in (block, block.gate):
            assert "forward" not in vars(module) and "_kpt_moe" not in vars(module)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_generation_matches_hf(family):
    model = tiny(family)
    ids, mask = padded_batch([6, 3], left=True, seed=3)
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **options)
        with kpt_hf.patch(model):
            got = model.generate(ids, **options)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_training_gradients_match_hf(family):
    """Gradients of the next-token loss plus HF's load-balancing loss (where the model adds
    one) reach the routers (through the routing weights and the router logits), every expert,
    the shared experts and their gate, and the input embeddings."""
    model = tiny(family).train()
    ids, mask = padded_batch([7, 5, 2], seed=1)
    labels = ids.masked_fill(mask == 0, -100)

    def loss_and_grads():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                     output_router_logits=True).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads, embeds.grad

    want_loss, want, want_x = loss_and_grads()
    with kpt_hf.patch(model):
        got_loss, got, got_x = loss_and_grads()
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    assert got.keys() == want.keys()
    assert any("gate.weight" in n for n in got) and any("gate_up_proj" in n for n in got)
    # float32: sums over tokens and experts of products of O(1) terms in another order.
    torch.testing.assert_close(got_x, want_x, rtol=1e-4, atol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_router_logits_and_aux_loss_are_still_recorded(family):
    """transformers records router_logits with forward hooks on the router modules: the
    patched routers still run as modules, so output_router_logits and aux_loss work."""
    model = tiny(family)
    ids, mask = padded_batch([6, 4], seed=2)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_router_logits=True)
        if getattr(want, "router_logits", None) is None:
            pytest.skip(f"transformers {transformers.__version__} records no router logits "
                        f"for {family}")  # DeepSeek-V3 before 5.2x
        with kpt_hf.patch(model):
            got = model(ids, attention_mask=mask, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits)
    real = mask.flatten().bool()  # per token; pad rows are don't-care (as in test_hf.py)
    for a, b in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(a[real], b[real], **TOL)
    if getattr(want, "aux_loss", None) is not None:
        torch.testing.assert_close(got.aux_loss, want.aux_loss, **TOL)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_bfloat16_is_as_close_to_float32_as_hf(family):
    exact = tiny(family)
    model = copy.deepcopy(exact).to(torch.bfloat16)
    ids, mask = padded_batch([8, 5], seed=4)
    real = mask.bool()
    with torch.no_grad():
        want = exact(ids, attention_mask=mask).logits[real]
        hf = model(ids, attention_mask=mask).logits[real].float()
        with kpt_hf.patch(model):
            got = model(ids, attention_mask=mask).logits[real].float()

    def rel(a):
        return ((a - want).norm() / want.norm()).item()

    # Qwen's routers round the weights to bf16 and HF's experts add each expert's share into a
    # bf16 sum; fused_moe keeps the weights in float32 and rounds each token's sum once. So kpt
    # lands no further from the float32 model than HF (here kpt 2.1e-2 / 1.3e-2, HF 2.9e-2 /
    # 1.4e-2 on qwen3_moe / qwen2_moe; the 10% margin covers the attention path, which rounds
    # where HF does but sums in another order).
    # A routing bug is off by ~1.
    assert rel(got) < 1.1 * rel(hf) and rel(got) < 3e-2, (rel(got), rel(hf))


def test_optimizer_made_before_patch_trains_the_same_weights():
    steps = 3
    batches = [padded_batch([6, 4], seed=s) for s in range(steps)]

    def train(patched: bool):
        model = tiny("qwen2_moe").train()
        # SGD: Adam's normalisation turns float32 summation noise in near-zero gradients (an
        # expert weight few tokens reach) into full-size steps of either sign.
        opt = torch.optim.SGD(model.parameters(), lr=1e-1, momentum=0.9)
        handle = kpt_hf.patch(model) if patched else None
        losses = []
        for ids, mask in batches:
            loss = _loss(model, ids, mask)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        if handle is not None:
            handle.unpatch()
        return losses, {k: v.clone() for k, v in model.state_dict().items()}

    want, want_state = train(False)
    got, got_state = train(True)
    # float32 summation order, carried through three steps; a weight the optimizer lost track
    # of would stay at its initial value (off by ~lr * grad ~ 1e-2).
    assert got == pytest.approx(want, rel=1e-5)
    for key in want_state:
        torch.testing.assert_close(got_state[key], want_state[key], rtol=1e-4, atol=1e-5,
                                   msg=key)


def test_save_pretrained_while_patched_writes_the_unpatched_checkpoint(tmp_path):
    from safetensors.torch import load_file

    model = tiny("qwen2_moe")
    with kpt_hf.patch(model):
        model.save_pretrained(tmp_path / "patched")
    model.save_pretrained(tmp_path / "plain")
    patched = load_file(tmp_path / "patched" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert patched.keys() == plain.keys()
    assert any(".experts." in k for k in patched)
    for key, value in patched.items():
        assert torch.equal(value, plain[key]), key


def test_a_patched_moe_model_deep_copies_and_pickles_with_its_patch():
    model = tiny("deepseek_v3")
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        want = model(ids).logits
        handle = kpt_hf.patch(model)
        patched = model(ids).logits
        twin = copy.deepcopy(model)
        twin._kpt_patch.unpatch()
        assert "forward" not in vars(twin.model.layers[1].mlp)
        assert "forward" in vars(model.model.layers[1].mlp)  # the original keeps its patch
        torch.testing.assert_close(twin(ids).logits, want, rtol=0, atol=0)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(ids).logits, patched, rtol=0, atol=0)
        loaded._kpt_patch.unpatch()
        handle.unpatch()
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def test_unsupported_experts_are_skipped_with_a_reason_or_raise_when_strict():
    model = tiny("qwen3_moe", hidden_act="relu")
    handle = kpt_hf.patch(model)
    assert sorted(handle.skipped) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all("activation ReLU" in " ".join(r) for r in handle.skipped.values())
    assert "model.layers.0" in handle.patched  # attention still patched
    handle.unpatch()
    with pytest.raises(ValueError, match="activation ReLU"):
        kpt_hf.patch(model, strict=True)
    assert not hasattr(model, "_kpt_patch")


def test_supported_lists_the_moe_entries():
    table = kpt_hf.supported()
    for family in ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"):
        assert "fused_moe" in table[family]["model.layers.*.mlp"]
    assert "shared expert" in table["qwen2_moe"]["model.layers.*.mlp"]
    assert "grouped" in table["deepseek_v3"]["model.layers.*.mlp"]
    assert table["qwen3_moe"][""] == table["llama"][""]


def test_compiled_decode_step_is_one_graph():
    """dynamo traces a patched MoE model's decode step without a graph break (backend="eager":
    tracing, not codegen): the routing and experts are custom ops with fake implementations."""
    model = tiny("qwen3_moe")
    ids = torch.randint(0, VOCAB, (2, 7))
    step_ids = torch.randint(0, VOCAB, (2, 1))
    step = dict(position_ids=torch.full((2, 1), 7), cache_position=torch.tensor([7]),
                use_cache=True)

    def decode(forward):
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        model(ids, past_key_values=cache, use_cache=True)
        return forward(step_ids, past_key_values=cache, **step).logits

    with torch.no_grad():
        want = decode(model.forward)
        with kpt_hf.patch(model):
            got = decode(torch.compile(model.forward, backend="eager", fullgraph=True))
    torch.testing.assert_close(got, want, **TOL)


def test_forced_triton_backend_matches():
    """patch(backend="triton") runs the MoE ops' Triton kernels too (on a CPU: the
    interpreter)."""
    pytest.importorskip("triton", reason="the triton backend needs triton")
    from kpt.ops.moe import ROUTE_SPEC, SPEC

    missing = [s.name for s in (ROUTE_SPEC, SPEC) if "triton" not in {b.name for b in
                                                                     s.backends}]
    if missing:
        pytest.skip(f"{', '.join(missing)}: no triton backend registered")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny("qwen3_moe", dtype=torch.bfloat16).to(device)
    ids, mask = (t.to(device) for t in padded_batch([5, 3]))
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits.float()
        with kpt_hf.patch(model, backend="triton"):
            got = model(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    # bf16: HF rounds per expert, kpt per token (see test_bfloat16_is_as_close_to_...).
    rel = ((got[real] - want[real]).norm() / want[real].norm()).item()
    assert rel < 3e-2, rel


def test_quantize_takes_attention_and_shared_experts_and_skips_experts_it_cannot_hold():
    model = tiny("qwen2_moe", shared_expert_intermediate_size=48)  # fp8_gemm: sizes of 16
    ids, mask = padded_batch([6, 3])
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if "experts." in n
               and "shared" not in n}
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with kpt_hf.patch(model, quantize="fp8") as handle:
            got = model(ids, attention_mask=mask).logits
            quantized = [n for n, m in model.named_modules()
                         if type(m).__name__ == "FP8Linear"]
            assert any(n.endswith("self_attn.q_proj") for n in quantized)
            assert any(".shared_expert." in n for n in quantized)
            assert not any(".experts." in n for n in quantized)
            # moe_intermediate_size 24: fp8 experts need multiples of 128; they stay float
            assert "intermediate_size = 24 % 128" in " ".join(
                handle.skipped["model.layers.0.mlp.experts"])
            assert handle.weight_bytes[1] < handle.weight_bytes[0]
    real = mask.bool()
    # e4m3 weights and activations (2^-4 relative per element) through two layers.
    assert (got[real] - want[real]).norm() < 0.15 * want[real].norm()
    for name, before in experts.items():
        assert torch.equal(dict(model.named_parameters())[name], before)


QUANT_OPTIONS = {"fp8": {}, "int4": dict(group_size=32)}


def _load_dequantized_experts(twin, quantized):
    """Copy ``quantized``'s experts, dequantised, into the float experts of ``twin``."""
    with torch.no_grad():
        for path, module in quantized.named_modules():
            if type(module).__name__ == "QuantizedExperts":
                target = twin.get_submodule(path)
                w13, w2 = module.dequantized(target.gate_up_proj.dtype)
                target.gate_up_proj.copy_(w13)
                target.down_proj.copy_(w2)


@pytest.mark.parametrize("quant", ["fp8", "int4"])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_quantize_swaps_routed_experts_for_quantized_ones(family, quant, op_calls):
    size = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    model = tiny(family, **{size: 128},  # fp8 experts: I % 128 == 0
                 **({"shared_expert_intermediate_size": 48} if family == "qwen2_moe" else {}))
    ids, mask = padded_batch([6, 3])
    real = mask.bool()
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    originals = {p: m for p, m in model.named_modules() if p.endswith("mlp.experts")}
    twin = copy.deepcopy(model)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        handle = kpt_hf.patch(model, quantize=quant, **QUANT_OPTIONS[quant])
        seen = {}
        hooks = [model.get_submodule(p).register_forward_hook(
            lambda m, args, out, p=p: seen.__setitem__(p, (args[0], out)))
            for p in moe_paths(model)]
        got = model(ids, attention_mask=mask).logits
        for hook in hooks:
            hook.remove()
        swapped = {p: m for p, m in model.named_modules() if p.endswith("mlp.experts")}
        assert all(type(m).__name__ == "QuantizedExperts" and m.quant == quant
                   for m in swapped.values()) and len(swapped) == 2
        assert not any(p.endswith("mlp.experts") for p in handle.skipped)
        assert op_calls["fused_moe"] == 2  # the patched blocks ran the quantized experts
        keys = model.state_dict().keys()
        assert "model.layers.0.mlp.experts.w13" in keys
        assert "model.layers.0.mlp.experts.gate_up_proj" not in keys
        before, after = handle.weight_bytes
        assert after < (0.3 if quant == "int4" else 0.6) * before
        # Each block against the same block with float experts holding the dequantised
        # weights (the rest, e.g. Qwen2-MoE's shared expert, quantized alike: round to nearest
        # is deterministic), on the same input, so the same routing. int4 (W4A16): the same
        # float32 weights and math up to summation order. fp8 also quantises the experts'
        # activations per token and 128 columns (e4m3: 2^-4 per element, ~2^-5 in norm).
        _load_dequantized_experts(twin, model)
        twin_handle = kpt_hf.patch(twin, quantize=quant, experts=False, **QUANT_OPTIONS[quant])
        assert not any(type(m).__name__ == "QuantizedExperts" for m in twin.modules())
        for path, (block_in, block_out) in seen.items():
            expected = twin.get_submodule(path)(block_in)
            assert ((block_out - expected).norm() <
                    (1e-5 if quant == "int4" else 2**-4) * expected.norm()), path
        if quant == "int4":  # and so the whole model
            expected = twin(ids, attention_mask=mask).logits
            assert (got[real] - expected[real]).norm() < 1e-4 * expected[real].norm()
        twin_handle.unpatch()
    if quant == "fp8":
        # Against the float model: e4m3 rounding of every projection and expert, two layers.
        # (int4 at 4 bits moves this random model's router choices; its quality is measured
        # on real weights in test_hf_quantize.py and per expert in test_quantized_experts.py.)
        assert (got[real] - want[real]).norm() < 0.25 * want[real].norm()
    handle.unpatch()
    assert {p: m for p, m in model.named_modules() if p.endswith("mlp.experts")} == originals
    for name, (param, value) in params.items():
        assert dict(model.named_parameters())[name] is param and torch.equal(param, value)


def test_quantized_experts_also_run_under_hfs_own_block_forward():
    """A block left as HF's (here: its patch removed) calls the QuantizedExperts with HF's
    router output (int64 ids, float weights) and gets the patched block's answer."""
    model = tiny("qwen3_moe", moe_intermediate_size=96)
    ids, mask = padded_batch([6, 3])
    with torch.no_grad(), kpt_hf.patch(model, quantize="int4", group_size=32):
        patched = model(ids, attention_mask=mask).logits
        blocks = [model.get_submodule(p) for p in moe_paths(model)]
        for block in blocks:
            _hf_moe._unpatch_block(block, block.gate)
        assert all(type(b.experts).__name__ == "QuantizedExperts" for b in blocks)
        hf_block = model(ids, attention_mask=mask).logits
    real = mask.bool()
    # float32: HF's router and kpt's moe_route pick the same experts with weights equal to a
    # few ulps; the experts are the same fused_moe call.
    assert (hf_block[real] - patched[real]).norm() < 1e-5 * patched[real].norm()


def test_quantize_experts_false_and_strict():
    model = tiny("qwen3_moe")  # moe_intermediate_size 24
    with torch.no_grad():
        with kpt_hf.patch(model, quantize="int4", group_size=32, experts=False) as handle:
            assert not any(type(m).__name__ == "QuantizedExperts" for m in model.modules())
            assert not any(p.endswith("mlp.experts") for p in handle.skipped)
        with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts: .*% 128 == 0"):
            kpt_hf.patch(model, quantize="fp8", strict=True)
    assert getattr(model, "_kpt_patch", None) is None
    with pytest.raises(ValueError, match="takes experts=True or False"):
        kpt_hf.patch(model, quantize="int4", experts="yes")


def test_quantize_is_refused_where_no_projection_table_exists():
    model = tiny("deepseek_v3")
    with pytest.raises(ValueError, match="quantize='fp8' is not available for model_type "
                                         "'deepseek_v3'"):
        kpt_hf.patch(model, quantize="fp8")
    assert getattr(model, "_kpt_patch", None) is None
