"""``FP8Linear`` and ``Int4Linear``: inference-only ``nn.Linear`` stand-ins with quantised weights.

Both are made from a float layer with ``from_linear`` and run through kpt's ``fp8_gemm`` /
``int4_gemm`` (whichever backend dispatch picks; on the CPU that is the reference backend,
which measures quality, not speed). Their tensors are buffers, so ``state_dict``,
``load_state_dict`` and ``.to(device)`` work; they have no parameters and no backward: calling
one with an input that requires grad while grad mode is on raises (run them under
``torch.no_grad()`` or ``torch.inference_mode()``), rather than silently cutting the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kpt.ops.fp8_gemm import ALIGN, FP8, W_BLOCK, fp8_gemm, quantize_fp8
from kpt.ops.int4_gemm import GROUP_SIZES, int4_gemm, pack_int4

# The smallest normal float32, the floor of quantize_fp8's scales (see fp8_gemm/reference.py).
_MIN_SCALE = 2.0**-126
WEIGHT_GRANULARITIES = ("row", "block")
ACTIVATIONS = ("dynamic", "static")


def _check_inference(module: nn.Module, x: Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(f"{type(module).__name__} is inference only (it has no backward): "
                           f"call it under torch.no_grad() or torch.inference_mode()")


def _check_linear(name: str, linear: nn.Module) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{name}.from_linear: expected an nn.Linear, got {type(linear).__name__}")


def _bias_for(bias: Tensor | None, dtype: torch.dtype, allowed: tuple[torch.dtype, ...]) -> \
        Tensor | None:
    return bias if bias is None or bias.dtype in allowed else bias.to(dtype)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s own parameters and buffers (what its forward reads)."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return sum(t.numel() * t.element_size() for t in tensors)


class FP8Linear(nn.Module):
    """``y = x @ W.T + b`` with W in fp8 (e4m3 by default) and x quantised to fp8 per call.

    Weight scales: ``"row"`` (one per output channel) or ``"block"`` (128x128 tiles).
    Activation scales: ``"dynamic"`` (one per token, computed at each call by ``quantize_fp8``)
    or ``"static"`` (one calibrated per-tensor scale, the ``input_scale`` buffer; inputs beyond
    its range saturate). Input (..., in_features) of float32, float16 or bfloat16; the output
    has the input's dtype. in_features and out_features must be multiples of 16.

    Buffers: ``weight8`` (out, in) uint8 holding the fp8 bits (stored as uint8 so that
    ``model.to(dtype)`` cannot cast the codes), ``weight_scale`` float32, ``input_scale``
    (static only), ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 weight_granularity: str = "row", activation: str = "dynamic",
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn, backend: str | None = None,
                 device: torch.device | str | None = None,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        reasons = self.reasons(in_features, out_features, weight_granularity, activation,
                               fp8_dtype)
        if reasons:
            raise ValueError("FP8Linear: " + "; ".join(reasons))
        self.in_features, self.out_features = in_features, out_features
        self.weight_granularity, self.activation = weight_granularity, activation
        self.fp8_dtype, self.backend = fp8_dtype, backend
        if weight_granularity == "row":
            scale_shape = (out_features, 1)
        else:
            scale_shape = (-(-out_features // W_BLOCK[0]), -(-in_features // W_BLOCK[1]))
        self.register_buffer("weight8", torch.zeros(out_features, in_features,
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, device=device))
        self.register_buffer("input_scale", torch.ones((), device=device)
                             if activation == "static" else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device)
                             if bias else None)

    @staticmethod
    def reasons(in_features: int, out_features: int, weight_granularity: str = "row",
                activation: str = "dynamic",
                fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> list[str]:
        """Why such a layer cannot be built (empty if it can)."""
        reasons = []
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % ALIGN:
                reasons.append(f"{name} = {size} must be a positive multiple of {ALIGN} "
                               f"(fp8_gemm's N and K)")
        if weight_granularity not in WEIGHT_GRANULARITIES:
            reasons.append(f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got "
                           f"{weight_granularity!r}")
        if activation not in ACTIVATIONS:
            reasons.append(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if fp8_dtype not in FP8:
            reasons.append(f"fp8_dtype must be float8_e4m3fn or float8_e5m2, got {fp8_dtype!r}")
        return reasons

    @staticmethod
    def static_input_scale(samples: Tensor | list[Tensor],
                           fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> Tensor:
        """The per-tensor activation scale that maps the samples' largest |x| to the fp8
        maximum (float32, 0-dim)."""
        samples = [samples] if isinstance(samples, Tensor) else list(samples)
        if not samples:
            raise ValueError("FP8Linear.static_input_scale: no sample inputs")
        amax = torch.stack([s.detach().float().abs().amax().cpu() for s in samples]).amax()
        if not bool(torch.isfinite(amax)):
            raise ValueError("FP8Linear.static_input_scale: the sample inputs are not finite")
        return (amax / torch.finfo(fp8_dtype).max).clamp_min(_MIN_SCALE)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, weight_granularity: str = "row",
                    activation: str = "dynamic", input_scale: Tensor | float | None = None,
                    sample_inputs: Tensor | list[Tensor] | None = None,
                    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                    backend: str | None = None,
                    quantized: tuple[Tensor, Tensor] | None = None) -> FP8Linear:
        """Quantise ``linear`` (its weight is read, never changed). ``activation="static"``
        takes ``input_scale`` or computes it from ``sample_inputs`` (inputs of this layer).
        ``quantized``: the weight already quantised, ``(w8, w_scale)`` of ``weight_granularity``
        and ``fp8_dtype`` (e.g. ``kpt.quant.gptq_fp8``'s), used instead of round-to-nearest;
        the bias is still linear's."""
        _check_linear("FP8Linear", linear)
        if activation == "static" and (input_scale is None) == (sample_inputs is None):
            raise ValueError("FP8Linear.from_linear: activation='static' needs exactly one of "
                             "input_scale or sample_inputs")
        if activation != "static" and (input_scale is not None or sample_inputs is not None):
            raise ValueError("FP8Linear.from_linear: input_scale and sample_inputs are for "
                             "activation='static'")
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    weight_granularity=weight_granularity, activation=activation,
                    fp8_dtype=fp8_dtype, backend=backend, device=weight.device,
                    bias_dtype=weight.dtype if linear.bias is None else linear.bias.dtype)
        if quantized is not None:
            w8, scale = _check_fp8_weight(quantized, layer, fp8_dtype)
        elif weight_granularity == "row":
            w8, scale = quantize_fp8(weight, "row", fp8_dtype)
        else:
            w8, scale = quantize_fp8(weight, "block", fp8_dtype, block=W_BLOCK)
        if not bool(torch.isfinite(scale).all()):
            raise ValueError("FP8Linear.from_linear: the weight is not finite")
        layer.weight8.copy_(w8.view(torch.uint8))
        layer.weight_scale.copy_(scale)
        if activation == "static":
            if sample_inputs is not None:
                input_scale = cls.static_input_scale(sample_inputs, fp8_dtype)
            scale = torch.as_tensor(input_scale, dtype=torch.float32)
            if scale.numel() != 1 or not bool(torch.isfinite(scale)) or float(scale) <= 0:
                raise ValueError(f"FP8Linear.from_linear: input_scale must be one positive "
                                 f"finite number, got {input_scale!r}")
            layer.input_scale.copy_(scale.reshape(()))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(self, x)
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"FP8Linear: input of shape {tuple(x.shape)} must end in "
                             f"in_features = {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is None:
            x8, x_scale = quantize_fp8(x2, "row", self.fp8_dtype)
        else:
            # Static: the calibrated scale, saturating what lies beyond the calibrated range.
            x_scale = self.input_scale.float()
            fmax = torch.finfo(self.fp8_dtype).max
            x8 = (x2.float() / x_scale).clamp(-fmax, fmax).to(self.fp8_dtype)
        y = fp8_gemm(x8, self.weight8.view(self.fp8_dtype), x_scale, self.weight_scale.float(),
                     out_dtype=x.dtype, bias=self.bias, backend=self.backend)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        dtype = str(self.fp8_dtype).removeprefix("torch.")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {dtype}, weight={self.weight_granularity}, "
                f"activation={self.activation}")


def _check_fp8_weight(quantized: Any, layer: FP8Linear, fp8_dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor]:
    """``quantized`` = (w8, w_scale) checked against the layer's buffers."""
    if (not isinstance(quantized, (tuple, list)) or len(quantized) != 2
            or not all(isinstance(t, Tensor) for t in quantized)):
        raise TypeError("FP8Linear.from_linear: quantized must be a (w8, w_scale) pair of "
                        "tensors")
    w8, scale = quantized
    if w8.dtype != fp8_dtype:
        raise ValueError(f"FP8Linear.from_linear: quantized w8 is {w8.dtype}, expected "
                         f"fp8_dtype {fp8_dtype}")
    for name, t, want in (("w8", w8, layer.weight8), ("w_scale", scale, layer.weight_scale)):
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"FP8Linear.from_linear: quantized {name} has shape "
                             f"{tuple(t.shape)}, expected {tuple(want.shape)} for "
                             f"weight_granularity={layer.weight_granularity!r}")
    return w8, scale.float()


class Int4Linear(nn.Module):
    """``y = x @ W.T + b`` with W in 4 bits (W4A16), round-to-nearest per group of
    ``group_size`` input channels (32, 64, 128, 256, or -1: one group per output channel),
    symmetric or with zero points (``pack_int4``). Input (..., in_features) of float16,
    bfloat16 or float32 (float32 on the reference backend); output in the input's dtype.
    in_features must be a multiple of 8 and of group_size.

    Buffers: ``packed`` (in // 8, out) int32, ``scales`` (groups, out) float32, ``zeros``
    (groups, out) uint8 (zero-point only), ``g_idx`` (in,) int32 (act-order groups, e.g.
    GPTQ's; ``act_order=True``), ``bias``. ``from_quantized`` takes an already quantised
    weight (``kpt.quant.gptq_int4``'s, an imported checkpoint's).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 group_size: int = 128, symmetric: bool = False, act_order: bool = False,
                 backend: str | None = None, device: torch.device | str | None = None,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        reasons = self.reasons(in_features, out_features, group_size, symmetric)
        if reasons:
            raise ValueError("Int4Linear: " + "; ".join(reasons))
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric, self.backend = group_size, symmetric, backend
        groups = 1 if group_size < 0 else in_features // group_size
        self.register_buffer("packed", torch.zeros(in_features // 8, out_features,
                                                   dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, device=device))
        self.register_buffer("zeros", None if symmetric else torch.zeros(
            groups, out_features, dtype=torch.uint8, device=device))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32,
                                                   device=device) // max(group_size, in_features)
                             if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device)
                             if bias else None)

    @staticmethod
    def reasons(in_features: int, out_features: int, group_size: int = 128,
                symmetric: bool = False) -> list[str]:
        """Why such a layer cannot be built (empty if it can)."""
        reasons = []
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                reasons.append(f"{name} must be a positive int, got {size!r}")
        if type(group_size) is not int or group_size not in GROUP_SIZES:  # not 32.0, True
            reasons.append(f"group_size must be one of {GROUP_SIZES} (-1: per channel), got "
                           f"{group_size!r}")
        elif not reasons and (in_features % 8 or (group_size > 0 and in_features % group_size)):
            reasons.append(f"in_features = {in_features} must be a multiple of 8 and of "
                           f"group_size = {group_size} (int4_gemm's K)")
        if not isinstance(symmetric, bool):
            reasons.append(f"symmetric must be a bool, got {symmetric!r}")
        return reasons

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = 128, symmetric: bool = False,
                    backend: str | None = None) -> Int4Linear:
        """Quantise ``linear`` by round-to-nearest (its weight is read, never changed)."""
        _check_linear("Int4Linear", linear)
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    group_size=group_size, symmetric=symmetric, backend=backend,
                    device=weight.device,
                    bias_dtype=weight.dtype if linear.bias is None else linear.bias.dtype)
        packed, scales, zeros = pack_int4(weight, group_size, symmetric)
        layer.packed.copy_(packed)
        layer.scales.copy_(scales)
        if zeros is not None:
            layer.zeros.copy_(zeros)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    @classmethod
    def from_quantized(cls, packed: Tensor, scales: Tensor, zeros: Tensor | None, *,
                       group_size: int, g_idx: Tensor | None = None, bias: Tensor | None = None,
                       backend: str | None = None) -> Int4Linear:
        """A layer over a weight already in ``int4_gemm``'s format (packed (K // 8, N) int32,
        scales (G, N), zeros or None, g_idx or None), e.g. ``kpt.quant.gptq_int4``'s."""
        if not (isinstance(packed, Tensor) and packed.dtype == torch.int32 and packed.dim() == 2):
            raise ValueError("Int4Linear.from_quantized: packed must be a (K // 8, N) int32 "
                             "tensor")
        (words, n), device = packed.shape, packed.device
        layer = cls(8 * words, n, bias=bias is not None, group_size=group_size,
                    symmetric=zeros is None, act_order=g_idx is not None, backend=backend,
                    device=device, bias_dtype=torch.float32 if bias is None else bias.dtype)
        for name, value in (("packed", packed), ("scales", scales), ("zeros", zeros),
                            ("g_idx", g_idx), ("bias", bias)):
            if value is None:
                continue
            if tuple(value.shape) != tuple(getattr(layer, name).shape):
                raise ValueError(f"Int4Linear.from_quantized: {name} has shape "
                                 f"{tuple(value.shape)}, expected "
                                 f"{tuple(getattr(layer, name).shape)}")
            getattr(layer, name).copy_(value.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(self, x)
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"Int4Linear: input of shape {tuple(x.shape)} must end in "
                             f"in_features = {self.in_features}")
        bias = _bias_for(self.bias, x.dtype, (x.dtype, torch.float32))
        return int4_gemm(x, self.packed, self.scales, self.zeros, group_size=self.group_size,
                         g_idx=self.g_idx, bias=bias, backend=self.backend)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "zero-point"
        order = ", act_order" if self.g_idx is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, {kind}{order}")


QUANTIZED_LINEARS = (FP8Linear, Int4Linear)

__all__ = ["FP8Linear", "Int4Linear", "QUANTIZED_LINEARS", "weight_bytes"]
