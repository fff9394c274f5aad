"""kpt.nn.MoE against a plain PyTorch loop over tokens and experts (float64), and
``MoE.from_hf`` against transformers' own blocks.

On the CPU both ops run their reference backend. The loop picks experts with ``torch.topk`` on
the same float32 (or bf16) logits the module computes, so that selection is compared exactly
and the values in float64; random data has no ties.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kpt.nn import MoE

ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}
# Odd sizes: H not a multiple of 8, I odd, 7 tokens.
H, I, E, T = 24, 13, 8, 7  # noqa: E741 (I: the intermediate size, as in the docs)


def loop_moe(moe: MoE, x: torch.Tensor):
    """(y, logits, weights, ids) of ``moe`` on ``x`` (..., H): float64 from float64 copies of
    its parameters (leaves with requires_grad, returned too), the choice from its own logits."""
    r = moe.routing
    p = {n: t.detach().double().requires_grad_() for n, t in moe.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    x2 = x64.reshape(-1, moe.hidden_size)
    dtype = r.router_dtype or x.dtype
    with torch.no_grad():  # the choice: as the module computes its logits
        logits_q = F.linear(x.reshape(-1, moe.hidden_size).to(dtype),
                            moe.router_weight.to(dtype)).float()
        sel = logits_q.softmax(-1) if r.scoring == "softmax" else logits_q.sigmoid()
        if moe.correction_bias is not None:
            sel = sel + moe.correction_bias.float()
        groups = r.num_expert_groups or 1
        if groups > 1:
            by_group = sel.view(len(sel), groups, -1)
            score = by_group.topk(min(2, by_group.shape[-1]), -1).values.sum(-1)
            kept = score.topk(r.topk_groups, -1).indices
            mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, kept, True)
            sel = sel.masked_fill(~mask.repeat_interleave(E // groups, 1), float("-inf"))
        ids = sel.topk(r.top_k, -1).indices
    logits = x2 @ p["router_weight"].T
    scores = logits.softmax(-1) if r.scoring == "softmax" else logits.sigmoid()
    weights = scores.gather(1, ids)
    if r.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * r.routed_scaling_factor
    rows = []
    for t in range(x2.shape[0]):
        acc = x2.new_zeros(moe.hidden_size)
        for j in range(r.top_k):
            e = int(ids[t, j])
            h = p["w13"][e] @ x2[t]
            a = ACT[moe.activation](h[: moe.intermediate_size]) * h[moe.intermediate_size:]
            acc = acc + weights[t, j] * (p["w2"][e] @ a)
        rows.append(acc)
    y = torch.stack(rows) if rows else x2.new_zeros(0, moe.hidden_size)
    if moe.shared_experts is not None:
        mlp = {n: p[f"shared_experts.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")}
        s = (ACT[moe.activation](x2 @ mlp["gate_proj"].T) * (x2 @ mlp["up_proj"].T)) \
            @ mlp["down_proj"].T
        if moe.shared_gate is not None:
            s = torch.sigmoid(x2 @ p["shared_gate.weight"].T) * s
        y = y + s
    return y.view(x.shape), logits, weights, ids, x64, p


CONFIGS = {
    "softmax-renorm": {},
    "softmax-top1-plain": dict(top_k=1, renormalize=False),
    "sigmoid-grouped-bias-scaled": dict(top_k=3, scoring="sigmoid", num_expert_groups=4,
                                        topk_groups=2, correction_bias=True,
                                        routed_scaling_factor=2.5, renormalize=True),
    "sigmoid-plain-fp32-router": dict(scoring="sigmoid", renormalize=False,
                                      router_dtype=torch.float32),
    "shared-gated-gelu": dict(shared_intermediate_size=11, shared_gate=True, activation="gelu"),
    "shared-gelu-tanh": dict(shared_intermediate_size=9, activation="gelu_tanh"),
}


def make(seed: int = 0, dtype=torch.float32, **options) -> MoE:
    torch.manual_seed(seed)
    options = {"top_k": 2, **options}
    moe = MoE(H, I, E, options.pop("top_k"), **options).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():  # O(1) products: errors show at float32 ulps
            p.normal_(0, p.shape[-1] ** -0.5)
        if moe.correction_bias is not None:
            moe.correction_bias.normal_(0, 0.3)
    return moe


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_the_loop_float32(name):
    moe = make(**CONFIGS[name])
    x = torch.randn(T, H)
    y, logits = moe(x, return_router_logits=True)
    want, want_logits, _, _, _, _ = loop_moe(moe, x)
    # float32 against float64: sums of <= 2I products of O(1) terms, a few float32 ulps.
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.double(), want_logits, rtol=1e-5, atol=1e-5)


def test_route_returns_the_loops_choice_and_weights():
    moe = make(**CONFIGS["sigmoid-grouped-bias-scaled"])
    x = torch.randn(T, H)
    logits, weights, ids = moe.route(x)
    _, _, want_w, want_ids, _, _ = loop_moe(moe, x)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.long(), want_ids)  # descending scores, as the loop's topk
    torch.testing.assert_close(weights.double(), want_w, rtol=1e-5, atol=1e-6)


def test_batched_non_contiguous_input_and_no_tokens():
    moe = make(**CONFIGS["shared-gated-gelu"])
    x = torch.randn(H, 3, 5).permute(1, 2, 0)  # (3, 5, H), last dim strided
    want = loop_moe(moe, x)[0]
    torch.testing.assert_close(moe(x).double(), want, rtol=1e-5, atol=1e-5)
    empty = moe(torch.randn(2, 0, H))
    assert empty.shape == (2, 0, H)


def test_bfloat16_matches_the_loop_within_bf16_rounding():
    moe = make(dtype=torch.bfloat16, **CONFIGS["shared-gated-gelu"])
    x = torch.randn(T, H, dtype=torch.bfloat16)
    y = moe(x)
    assert y.dtype == torch.bfloat16
    # fused_moe rounds act(gate) * up to bf16 (2^-9 relative) before the down projection, and
    # the sum once; the shared expert rounds each linear: ~1e-2 of O(1) values at most.
    torch.testing.assert_close(y.double(), loop_moe(moe, x)[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["softmax-renorm", "sigmoid-grouped-bias-scaled",
                                  "shared-gated-gelu"])
def test_gradients_match_the_loop(name):
    """Gradients reach the router (through the routing weights), every expert, the shared
    expert and its gate, and the input."""
    moe = make(**CONFIGS[name])
    x = torch.randn(2, 4, H, requires_grad=True)
    grad_out = torch.randn(2, 4, H)
    y, logits = moe(x, return_router_logits=True)
    (y * grad_out).sum().backward()
    want, _, _, _, x64, p = loop_moe(moe, x)
    (want * grad_out.double()).sum().backward()
    # float32 against float64 through forward and backward sums of <= 2I terms: 1e-4 relative.
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    for n, param in moe.named_parameters():
        assert param.grad is not None, n
        torch.testing.assert_close(param.grad.double(), p[n].grad, rtol=1e-4, atol=1e-5,
                                   msg=n)
    assert moe.router_weight.grad.abs().sum() > 0  # the routed path really trains the router


def test_constructor_validates():
    with pytest.raises(ValueError, match="top_k 9 not in 1..8"):
        MoE(H, I, E, 9)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        MoE(H, I, E, 2, num_expert_groups=3, topk_groups=1)
    with pytest.raises(ValueError, match="top_k 5 > the 4 experts of 2 kept groups"):
        MoE(H, I, E, 5, num_expert_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match="activation"):
        MoE(H, I, E, 2, activation="relu")
    with pytest.raises(ValueError, match="shared_gate needs a shared expert"):
        MoE(H, I, E, 2, shared_gate=True)
    with pytest.raises(ValueError, match="scoring"):
        MoE(H, I, E, 2, scoring="tanh")


# ---- MoE.from_hf against transformers' blocks ----------------------------------------------


def hf_block(family: str):
    """A transformers 5 sparse MoE block (float32, random weights, eager experts) and its
    config."""
    transformers = pytest.importorskip("transformers", reason="from_hf needs transformers")
    common = dict(hidden_size=H, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                  experts_implementation="eager")
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
        config = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=I, num_experts=E,
                                             num_experts_per_tok=2, norm_topk_prob=True)
        block = Qwen3MoeSparseMoeBlock(config)
    elif family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
        config = transformers.Qwen2MoeConfig(**common, moe_intermediate_size=I, num_experts=E,
                                             num_experts_per_tok=2, norm_topk_prob=False,
                                             shared_expert_intermediate_size=11)
        block = Qwen2MoeSparseMoeBlock(config)
    elif family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        config = transformers.MixtralConfig(**common, intermediate_size=I, num_local_experts=E,
                                            num_experts_per_tok=2, router_jitter_noise=0.1)
        block = MixtralSparseMoeBlock(config)
    else:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
        config = transformers.DeepseekV3Config(**common, moe_intermediate_size=I,
                                               n_routed_experts=E, num_experts_per_tok=3,
                                               n_group=4, topk_group=2, n_shared_experts=1,
                                               routed_scaling_factor=2.5, norm_topk_prob=True)
        block = DeepseekV3MoE(config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
        for b in block.buffers():
            b.normal_(0, 0.3)  # DeepSeek's correction bias
    return block.eval()  # Mixtral's training-time jitter: test_from_hf_keeps_mixtrals_...


FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3")


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_reuses_the_blocks_parameters_and_matches_it(family):
    block = hf_block(family)
    moe = MoE.from_hf(block)
    assert moe.w13 is block.experts.gate_up_proj and moe.w2 is block.experts.down_proj
    assert moe.router_weight is block.gate.weight
    theirs = {id(p) for p in block.parameters()}
    assert {id(p) for p in moe.parameters()} == theirs  # no parameter of its own, none copied
    x = torch.randn(2, 5, H, requires_grad=True)
    grad_out = torch.randn(2, 5, H)
    y = moe(x)
    (y * grad_out).sum().backward()
    got = {n: p.grad.clone() for n, p in block.named_parameters()}, x.grad.clone()
    block.zero_grad()
    x.grad = None
    want = block(x)
    (want * grad_out).sum().backward()
    # float32, HF's per-expert loop against fused_moe: the same products, summed in another
    # order (HF adds expert by expert, kpt token by token).
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], x.grad, rtol=1e-4, atol=1e-5)
    for n, p in block.named_parameters():
        torch.testing.assert_close(got[0][n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_from_hf_keeps_mixtrals_training_jitter():
    """In training, Mixtral multiplies the block input by uniform noise: drawn the same way,
    so with the same seed the outputs agree."""
    block = hf_block("mixtral").train()
    moe = MoE.from_hf(block).train()
    assert moe.jitter_noise == pytest.approx(0.1)
    x = torch.randn(2, 5, H)
    torch.manual_seed(7)
    got = moe(x)
    torch.manual_seed(7)
    want = block(x.clone())  # HF scales its input in place
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, moe.eval()(x), rtol=1e-3, atol=1e-3)


def test_from_hf_rejects_other_modules():
    with pytest.raises(ValueError, match="not a supported MoE block"):
        MoE.from_hf(torch.nn.Linear(4, 4))
