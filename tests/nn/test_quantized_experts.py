"""kpt.nn.QuantizedExperts: routed experts with fp8 (128x128 block scales) or int4 weights,
against fused_moe on the float weights they dequantise to and on the weights they were made
from (CPU: fused_moe's reference backend)."""

from __future__ import annotations

import pytest
import torch

from kpt.nn import QuantizedExperts
from kpt.ops import fused_moe

E, TOP_K, T = 8, 2, 37
# fp8 experts need I % 128 == 0; H = 80 gives a partial 128-column scale block.
FP8_SHAPE = (80, 128)  # (H, I)
# int4: H and I multiples of the group (32) and of 8; I = 96 is 3 groups.
INT4_SHAPE = (64, 96)
CASES = [("fp8", {}), ("int4", dict(group_size=32)), ("int4", dict(group_size=32,
                                                                      symmetric=True)),
         ("int4", dict(group_size=-1))]


def experts(h: int, i: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * i, h, generator=gen) / h**0.5,
            torch.randn(E, h, i, generator=gen) / i**0.5)


def routing(h: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, h, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:TOP_K] for _ in range(T)])  # int64
    weights = torch.rand(T, TOP_K, generator=gen).softmax(-1)
    return x, ids, weights


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def shape_of(quant):
    return FP8_SHAPE if quant == "fp8" else INT4_SHAPE


@pytest.mark.parametrize(("quant", "options"), CASES)
@torch.no_grad()
def test_forward_is_fused_moe_over_its_dequantized_weights(quant, options):
    h, i = shape_of(quant)
    w13, w2 = experts(h, i)
    layer = QuantizedExperts.from_weights(w13, w2, quant, **options)
    x, ids, weights = routing(h)
    y = layer(x, ids, weights)  # transformers' call: int64 ids, float weights
    assert y.shape == x.shape and y.dtype == x.dtype
    d13, d2 = layer.dequantized()
    want = fused_moe(x, d13, d2, weights, ids)
    if quant == "int4":
        # W4A16: the same dequantised float32 weights and float32 math; only the order of the
        # float32 sums differs (a few ulps of O(1) values).
        assert rel(y, want) < 1e-5
    else:
        # fp8 also quantises the activations to e4m3 per token and 128 columns (and the
        # intermediate after its rounding): 3 mantissa bits, |error| <= 2^-4 of each value,
        # about 2^-5 in norm.
        assert rel(y, want) < 2**-4
    # Against the float weights it was made from: the weight rounding on top (int4 with groups
    # of 32: about 8 % of each weight's norm; per channel: about 12 %).
    assert rel(y, fused_moe(x, w13, w2, weights, ids)) < (0.1 if quant == "fp8" else 0.2)


@pytest.mark.parametrize(("quant", "options"), CASES)
def test_dequantized_weights_are_close_to_the_originals_and_buffers_roundtrip(quant, options):
    h, i = shape_of(quant)
    w13, w2 = experts(h, i)
    layer = QuantizedExperts.from_weights(w13, w2, quant, **options)
    d13, d2 = layer.dequantized()
    # fp8 e4m3: half a unit of a 3-bit mantissa, <= 2^-4 relative per element.
    # int4: a 16-level grid over each group's range (~6 std): ~10 % in norm, per channel more.
    bound = 2**-4 if quant == "fp8" else (0.12 if options.get("group_size") == 32 else 0.2)
    assert rel(d13, w13) < bound and rel(d2, w2) < bound
    assert not any(p.requires_grad for p in layer.parameters())
    fresh = QuantizedExperts(E, h, i, quant, **options)
    fresh.load_state_dict(layer.state_dict())
    x, ids, weights = routing(h)
    with torch.no_grad():
        assert torch.equal(fresh(x, ids, weights), layer(x, ids, weights))


def test_bfloat16_input_keeps_its_dtype():
    h, i = INT4_SHAPE
    layer = QuantizedExperts.from_weights(*experts(h, i), "int4", group_size=32)
    x, ids, weights = routing(h)
    with torch.no_grad():
        y = layer(x.bfloat16(), ids, weights.bfloat16())
        want = layer(x, ids, weights)
    assert y.dtype == torch.bfloat16
    assert rel(y, want) < 2**-6  # bf16 rounding of x, the dequantised weights, the result


def test_is_inference_only():
    h, i = INT4_SHAPE
    layer = QuantizedExperts.from_weights(*experts(h, i), "int4", group_size=32)
    x, ids, weights = routing(h)
    with pytest.raises(RuntimeError, match="QuantizedExperts is inference only"):
        layer(x.requires_grad_(), ids, weights)


@pytest.mark.parametrize(("args", "options", "match"), [
    ((E, 80, 96, "fp8"), {}, "fp8 experts need intermediate_size = 96 % 128 == 0"),
    ((E, 72, 128, "fp8"), {}, "hidden_size = 72 % 16 == 0"),
    ((E, 64, 96, "int4"), dict(group_size=64), "multiples of 8 and of group_size = 64"),
    ((E, 64, 96, "int4"), dict(group_size=48), "group_size must be one of"),
    ((E, 64, 96, "nf4"), {}, "quant must be one of"),
    ((0, 64, 96, "int4"), {}, "num_experts must be a positive int"),
    ((E, 64, 96, "int4"), dict(activation="relu"), "activation must be silu"),
])
def test_bad_shapes_and_options_are_named(args, options, match):
    with pytest.raises(ValueError, match=match):
        QuantizedExperts(*args, **options)


def test_from_weights_and_from_hf_refuse_what_does_not_fit():
    w13, w2 = experts(*INT4_SHAPE)
    with pytest.raises(ValueError, match=r"must be \(E, 2I, H\) and \(E, H, I\)"):
        QuantizedExperts.from_weights(w13, w2[:, :, :-8], "int4", group_size=32)
    with pytest.raises(ValueError, match="w13 must be a 3-D float tensor"):
        QuantizedExperts.from_weights(w13[0], w2, "int4")

    class ReluExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj = torch.nn.Parameter(w13), torch.nn.Parameter(w2)
            self.act_fn = torch.nn.ReLU()

    with pytest.raises(ValueError, match="expert activation ReLU"):
        QuantizedExperts.from_hf(ReluExperts(), "int4", group_size=32)

    class TransposedExperts(ReluExperts):  # another layout of the same shapes: never guessed
        is_transposed = True

    with pytest.raises(ValueError, match="experts.is_transposed is True"):
        QuantizedExperts.from_hf(TransposedExperts(), "int4", group_size=32)
