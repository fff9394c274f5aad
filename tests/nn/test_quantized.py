"""kpt.nn.FP8Linear and Int4Linear against the float nn.Linear they are made from (CPU:
the reference backends of fp8_gemm / int4_gemm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kpt.nn import FP8Linear, Int4Linear
from kpt.ops.fp8_gemm import W_BLOCK
from kpt.ops.fp8_gemm.reference import dequantize
from kpt.ops.int4_gemm import dequantize_int4

# 96 in, 160 out: the block weight scales have a partial 128x128 tile in both directions.
IN, OUT = 96, 160


def linear(in_features=IN, out_features=OUT, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        if bias:
            layer.bias.normal_(0, 0.1)  # nn.Linear's init is small; make the bias count
    return layer


def inputs(*lead, k=IN, seed=1):
    return torch.randn(*lead, k, generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


FP8_CASES = [("row", "dynamic"), ("block", "dynamic"), ("row", "static"), ("block", "static")]


@pytest.mark.parametrize(("granularity", "activation"), FP8_CASES)
@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_fp8_linear_matches_its_dequantized_weight_and_the_float_layer(granularity, activation,
                                                                        bias):
    float_layer = linear(bias=bias)
    x = inputs(2, 3, 5)  # odd leading dims
    static = {"sample_inputs": x} if activation == "static" else {}
    layer = FP8Linear.from_linear(float_layer, weight_granularity=granularity,
                                  activation=activation, **static)
    y = layer(x)
    assert y.shape == (2, 3, 5, OUT) and y.dtype == x.dtype
    # Exactly the layer's own arithmetic: its fp8 weight (dequantised) times x rounded to fp8.
    w = dequantize(layer.weight8.view(torch.float8_e4m3fn), layer.weight_scale,
                   W_BLOCK if granularity == "block" else None)
    x2 = x.reshape(-1, IN)
    if activation == "static":
        s = layer.input_scale
        xq = (x2 / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    else:
        s = x2.abs().amax(-1, keepdim=True) / 448
        xq = (x2 / s).to(torch.float8_e4m3fn).float() * s
    expected = F.linear(xq, w, layer.bias).reshape(y.shape)
    # float32 throughout; only the summation order differs.
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # e4m3 keeps 3 mantissa bits: each operand is within 2^-4 relative, about 2^-4/sqrt(3) rms,
    # so a random dot product is off by about 3.6% of its size; 6% leaves room for the
    # coarser block and static scales (measured 3.6-3.8%).
    assert rel(y, float_layer(x)) < 0.06


@pytest.mark.parametrize(("group_size", "symmetric"), [(32, False), (32, True), (-1, False)])
@torch.no_grad()
def test_int4_linear_matches_its_dequantized_weight_and_the_float_layer(group_size, symmetric):
    float_layer = linear()
    x = inputs(3, 1, 7)
    layer = Int4Linear.from_linear(float_layer, group_size=group_size, symmetric=symmetric)
    y = layer(x)
    assert y.shape == (3, 1, 7, OUT)
    w = dequantize_int4(layer.packed, layer.scales, layer.zeros, group_size=group_size)
    torch.testing.assert_close(y, F.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)
    # 16 levels over a group's range: a uniform rounding error of step/sqrt(12), about 7-8% of
    # the weights' rms for these uniform weights (measured 6.8-7.7%); 12% bounds it.
    assert rel(y, float_layer(x)) < 0.12


@torch.no_grad()
def test_leading_dims_one_dimensional_and_non_contiguous_inputs():
    float_layer = linear()
    for layer in (FP8Linear.from_linear(float_layer), Int4Linear.from_linear(float_layer,
                                                                              group_size=32)):
        x = inputs(4, 9)
        rows = [layer(x[i, j]) for i in range(4) for j in range(9)]
        assert rows[0].shape == (OUT,)
        # Per-token activation scales (and int4's weight-only scheme): a row alone gives the
        # same result as inside a batch, up to float32 summation order.
        torch.testing.assert_close(layer(x).reshape(-1, OUT), torch.stack(rows),
                                   rtol=1e-5, atol=1e-5)
        wide = torch.randn(IN, 6)  # wide.T: a (6, IN) view with strides (1, 6)
        torch.testing.assert_close(layer(wide.T), layer(wide.T.contiguous()))


@pytest.mark.parametrize("make", [
    lambda lin: FP8Linear.from_linear(lin, weight_granularity="block"),
    lambda lin: FP8Linear.from_linear(lin, activation="static", input_scale=0.01),
    lambda lin: Int4Linear.from_linear(lin, group_size=32, symmetric=True),
    lambda lin: Int4Linear.from_linear(lin, group_size=-1),
])
@torch.no_grad()
def test_state_dict_round_trip_and_to(make):
    layer = make(linear())
    assert not list(layer.parameters())
    kwargs = ({"weight_granularity": layer.weight_granularity, "activation": layer.activation}
              if isinstance(layer, FP8Linear)
              else {"group_size": layer.group_size, "symmetric": layer.symmetric})
    fresh = type(layer)(IN, OUT, **kwargs)
    fresh.load_state_dict(layer.state_dict())
    x = inputs(5)
    assert torch.equal(fresh(x), layer(x))
    assert str(fresh) == str(layer) and "in_features=96, out_features=160" in str(layer)
    # model.to(dtype) converts floating buffers: the fp8 codes are stored as uint8 and int4's
    # as int32, so they survive; scales and bias become bf16 (float16/bf16 inputs then work).
    half = make(linear()).to(torch.bfloat16)
    y = half(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and rel(y, layer(x)) < 0.02


def test_unsupported_shapes_and_options_raise_value_errors():
    with pytest.raises(ValueError, match="FP8Linear: in_features = 24 must be a positive "
                                         "multiple of 16"):
        FP8Linear.from_linear(linear(24, 32))
    with pytest.raises(ValueError, match="out_features = 40"):
        FP8Linear.from_linear(linear(32, 40))
    with pytest.raises(ValueError, match="weight_granularity"):
        FP8Linear.from_linear(linear(), weight_granularity="tensor")
    with pytest.raises(ValueError, match="exactly one of input_scale or sample_inputs"):
        FP8Linear.from_linear(linear(), activation="static")
    with pytest.raises(ValueError, match="are for activation='static'"):
        FP8Linear.from_linear(linear(), input_scale=1.0)
    with pytest.raises(ValueError, match="input_scale must be one positive"):
        FP8Linear.from_linear(linear(), activation="static", input_scale=-1.0)
    with pytest.raises(ValueError, match="Int4Linear: in_features = 96 must be a multiple of 8 "
                                         "and of group_size = 64"):
        Int4Linear.from_linear(linear(), group_size=64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Linear.from_linear(linear(), group_size=48)
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        Int4Linear.from_linear(torch.nn.Conv1d(4, 4, 1))
    with torch.no_grad():
        for layer in (FP8Linear.from_linear(linear()), Int4Linear.from_linear(linear(),
                                                                               group_size=32)):
            with pytest.raises(ValueError, match="must end in in_features = 96"):
                layer(inputs(3, k=IN + 1))


def test_inference_only_raises_when_grad_is_required():
    x = inputs(2, 3).requires_grad_()
    for layer in (FP8Linear.from_linear(linear()), Int4Linear.from_linear(linear(),
                                                                          group_size=32)):
        with pytest.raises(RuntimeError, match="inference only"):
            layer(x)
        with torch.no_grad():
            assert not layer(x).requires_grad
        with torch.inference_mode():
            layer(x.detach())
        layer(x.detach())  # grad mode on, nothing requires grad: fine


@torch.no_grad()
def test_int4_from_quantized_takes_act_order_weights():
    from kpt.ops.int4_gemm import pack_int4

    float_layer = linear()
    g_idx = (torch.randperm(IN, generator=torch.Generator().manual_seed(2)) % 3).to(torch.int32)
    packed, scales, zeros = pack_int4(float_layer.weight, 32, g_idx=g_idx)
    layer = Int4Linear.from_quantized(packed, scales, zeros, group_size=32, g_idx=g_idx,
                                      bias=float_layer.bias)
    assert "act_order" in str(layer) and layer.g_idx is not None
    x = inputs(2, 5)
    w = dequantize_int4(packed, scales, zeros, group_size=32, g_idx=g_idx)
    torch.testing.assert_close(layer(x), F.linear(x, w, float_layer.bias), rtol=1e-5, atol=1e-5)
    fresh = Int4Linear(IN, OUT, group_size=32, act_order=True)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(ValueError, match="from_quantized: scales has shape"):
        Int4Linear.from_quantized(packed, scales[:1], zeros, group_size=32)
