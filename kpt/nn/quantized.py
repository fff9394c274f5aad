"""``FP8Linear`` and ``Int4Linear``: inference-only ``nn.Linear`` stand-ins with quantised weights;
``QuantizedExperts``: the same for the routed experts of a MoE block (``fused_moe``).

The linears are made from a float layer with ``from_linear`` and run through kpt's ``fp8_gemm`` /
``int4_gemm``; the experts from 3-D expert weights with ``from_weights`` / ``from_hf`` and run
through ``fused_moe`` (whichever backend dispatch picks; on the CPU that is the reference
backend, which measures quality, not speed). Their tensors are buffers, so ``state_dict``,
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
from kpt.ops.moe import fused_moe

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


def _positive_ints(**sizes: Any) -> list[str]:
    return [f"{name} must be a positive int, got {size!r}" for name, size in sizes.items()
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0]


def _int4_reasons(reasons: list[str], ks: dict[str, int], group_size: Any,
                  symmetric: Any) -> list[str]:
    """``reasons`` plus those of int4 weights whose reduction sizes are ``ks`` (name: size)."""
    if type(group_size) is not int or group_size not in GROUP_SIZES:  # not 32.0, True
        reasons.append(f"group_size must be one of {GROUP_SIZES} (-1: per channel), got "
                       f"{group_size!r}")
    elif not reasons and any(k % 8 or (group_size > 0 and k % group_size) for k in ks.values()):
        names = " and ".join(f"{name} = {k}" for name, k in ks.items())
        reasons.append(f"{names} must be {'a multiple' if len(ks) == 1 else 'multiples'} of 8 "
                       f"and of group_size = {group_size} (int4_gemm's K)")
    if not isinstance(symmetric, bool):
        reasons.append(f"symmetric must be a bool, got {symmetric!r}")
    return reasons


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
        reasons = _positive_ints(in_features=in_features, out_features=out_features)
        return _int4_reasons(reasons, {"in_features": in_features}, group_size, symmetric)

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

# transformers' expert activation classes -> fused_moe's activation names
_EXPERT_ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu",
                       "GELU": "gelu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                       "NewGELUActivation": "gelu_tanh"}
EXPERT_QUANTS = ("fp8", "int4")
# transformers' experts-implementation options (use_experts_implementation) of the layout
# fused_moe reads: gate_up_proj (E, 2I, H) gate rows first, down_proj (E, H, I), no biases.
HF_EXPERTS_LAYOUT = (("has_bias", False), ("is_transposed", False), ("has_gate", True),
                     ("is_concatenated", True), ("has_post_expert_norm", False),
                     ("_is_expert_parallel", False))


class QuantizedExperts(nn.Module):
    """Routed experts with quantised weights, run by ``fused_moe``: a drop-in for the fused
    experts module of transformers 5 MoE blocks (``forward(hidden_states, top_k_index,
    top_k_weights)``, as ``Qwen3MoeExperts`` / ``MixtralExperts`` are called), inference only.

    ``"fp8"``: e4m3 weights with one float32 scale per 128x128 block (DeepSeek-V3's format;
    ``fused_moe`` quantises the activations per token and 128 columns on the fly); needs
    ``intermediate_size`` % 128 == 0 and ``hidden_size`` % 16 == 0. ``"int4"``: each expert's
    weight in ``int4_gemm``'s layout (``pack_int4``: round to nearest per group of
    ``group_size`` input channels, zero points unless ``symmetric``); needs both sizes
    multiples of 8 and of the group size.

    Buffers (``state_dict``): ``w13`` / ``w2`` (fp8: (E, 2I, H) / (E, H, I); int4: int32
    (E, H/8, 2I) / (E, I/8, H)), ``w13_scale`` / ``w2_scale`` and, int4 with zero points,
    ``w13_zeros`` / ``w2_zeros``. ``act_fn`` is the original module's (kept so code that
    inspects the experts' activation still finds it).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 quant: str, *, group_size: int = 128, symmetric: bool = False,
                 activation: str = "silu", act_fn: nn.Module | None = None,
                 backend: str | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        reasons = self.reasons(num_experts, hidden_size, intermediate_size, quant, group_size,
                               symmetric)
        if activation not in ("silu", "gelu", "gelu_tanh"):
            reasons.append(f"activation must be silu, gelu or gelu_tanh, got {activation!r}")
        if reasons:
            raise ValueError("QuantizedExperts: " + "; ".join(reasons))
        e, h, i = num_experts, hidden_size, intermediate_size
        self.num_experts, self.hidden_dim, self.intermediate_dim = e, h, i
        self.quant, self.activation, self.backend = quant, activation, backend
        self.group_size, self.symmetric = group_size, symmetric
        self.act_fn = act_fn
        if quant == "fp8":
            e4m3 = torch.float8_e4m3fn
            self.register_buffer("w13", torch.zeros(e, 2 * i, h, dtype=e4m3, device=device))
            self.register_buffer("w2", torch.zeros(e, h, i, dtype=e4m3, device=device))
            self.register_buffer("w13_scale", torch.ones(e, -(-2 * i // 128), -(-h // 128),
                                                         device=device))
            self.register_buffer("w2_scale", torch.ones(e, -(-h // 128), -(-i // 128),
                                                        device=device))
            self.register_buffer("w13_zeros", None)
            self.register_buffer("w2_zeros", None)
            return
        for name, k, n in (("w13", h, 2 * i), ("w2", i, h)):
            groups = 1 if group_size < 0 else k // group_size
            self.register_buffer(name, torch.zeros(e, k // 8, n, dtype=torch.int32,
                                                   device=device))
            self.register_buffer(f"{name}_scale", torch.ones(e, groups, n, device=device))
            self.register_buffer(f"{name}_zeros", None if symmetric else torch.zeros(
                e, groups, n, dtype=torch.uint8, device=device))

    @staticmethod
    def reasons(num_experts: int, hidden_size: int, intermediate_size: int, quant: str,
                group_size: int = 128, symmetric: bool = False) -> list[str]:
        """Why such experts cannot be built (empty if they can)."""
        reasons = _positive_ints(num_experts=num_experts, hidden_size=hidden_size,
                                 intermediate_size=intermediate_size)
        if quant not in EXPERT_QUANTS:
            reasons.append(f"quant must be one of {EXPERT_QUANTS}, got {quant!r}")
        if reasons:
            return reasons
        h, i = hidden_size, intermediate_size
        if quant == "fp8" and (i % 128 or h % 16):
            reasons.append(f"fp8 experts need intermediate_size = {i} % 128 == 0 (gate and up "
                           f"rows in separate 128-row scale blocks) and hidden_size = {h} % 16 "
                           f"== 0")
        if quant == "int4":  # both are the K of a GEMM: hidden of gate/up, intermediate of down
            return _int4_reasons(reasons, {"hidden_size": h, "intermediate_size": i},
                                 group_size, symmetric)
        return reasons

    @classmethod
    def from_weights(cls, w13: Tensor, w2: Tensor, quant: str, *, group_size: int = 128,
                     symmetric: bool = False, activation: str = "silu",
                     act_fn: nn.Module | None = None,
                     backend: str | None = None) -> QuantizedExperts:
        """Quantise float experts ``w13`` (E, 2I, H) and ``w2`` (E, H, I) (round to nearest;
        read, never changed), one expert at a time (the peak extra memory is one expert's
        weights in float32)."""
        for name, w in (("w13", w13), ("w2", w2)):
            if not isinstance(w, Tensor) or w.dim() != 3 or not w.is_floating_point():
                raise ValueError(f"QuantizedExperts.from_weights: {name} must be a 3-D float "
                                 f"tensor, got {getattr(w, 'shape', type(w).__name__)}")
        e, two_i, h = w13.shape
        if two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2):
            raise ValueError(f"QuantizedExperts.from_weights: w13 {tuple(w13.shape)} and w2 "
                             f"{tuple(w2.shape)} must be (E, 2I, H) and (E, H, I)")
        module = cls(e, h, two_i // 2, quant, group_size=group_size, symmetric=symmetric,
                     activation=activation, act_fn=act_fn, backend=backend, device=w13.device)
        with torch.no_grad():
            for name, w in (("w13", w13), ("w2", w2)):
                for expert in range(e):
                    weight = w[expert].detach()
                    if quant == "fp8":
                        codes, scale = quantize_fp8(weight, "block", block=W_BLOCK)
                        getattr(module, name)[expert].copy_(codes)
                        getattr(module, f"{name}_scale")[expert].copy_(scale)
                        continue
                    packed, scales, zeros = pack_int4(weight, group_size, symmetric)
                    getattr(module, name)[expert].copy_(packed)
                    getattr(module, f"{name}_scale")[expert].copy_(scales)
                    if zeros is not None:
                        getattr(module, f"{name}_zeros")[expert].copy_(zeros)
        return module

    @classmethod
    def from_hf(cls, experts: nn.Module, quant: str, *, group_size: int = 128,
                symmetric: bool = False, backend: str | None = None) -> QuantizedExperts:
        """Quantise a transformers 5 fused experts module (``gate_up_proj`` (E, 2I, H),
        ``down_proj`` (E, H, I), ``act_fn``); ``ValueError`` naming what does not fit."""
        w13, w2 = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if not (isinstance(w13, Tensor) and isinstance(w2, Tensor)):
            raise ValueError(f"QuantizedExperts.from_hf: {type(experts).__name__} has no 3-D "
                             f"gate_up_proj / down_proj")
        for attr, want in HF_EXPERTS_LAYOUT:
            if getattr(experts, attr, want) != want:
                raise ValueError(f"QuantizedExperts.from_hf: experts.{attr} is "
                                 f"{getattr(experts, attr)!r}")
        act_fn = getattr(experts, "act_fn", None)
        activation = _EXPERT_ACTIVATIONS.get(type(act_fn).__name__)
        if activation is None:
            raise ValueError(f"QuantizedExperts.from_hf: expert activation "
                             f"{type(act_fn).__name__} (kpt: silu, gelu, gelu_tanh)")
        return cls.from_weights(w13, w2, quant, group_size=group_size, symmetric=symmetric,
                                activation=activation, act_fn=act_fn, backend=backend)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """The weights these experts multiply by, as float (E, 2I, H) and (E, H, I) of
        ``dtype`` (fp8: codes times block scales; int4: ``(q - zero) * scale``)."""
        from kpt.ops.fp8_gemm import reference as fp8_ref
        from kpt.ops.int4_gemm import reference as int4_ref

        out = []
        for name in ("w13", "w2"):
            w, scale = getattr(self, name), getattr(self, f"{name}_scale")
            zeros = getattr(self, f"{name}_zeros")
            if self.quant == "fp8":
                rows = [fp8_ref.dequantize(w[e], scale[e], W_BLOCK) for e in range(w.shape[0])]
            else:
                group = w.shape[1] * 8 if self.group_size < 0 else self.group_size
                rows = [int4_ref.dequantize(w[e], scale[e], None if zeros is None else zeros[e],
                                            group, None, torch.float32)
                        for e in range(w.shape[0])]
            out.append(torch.stack(rows).to(dtype))
        return out[0], out[1]

    def operands(self) -> tuple[Tensor, Tensor, dict[str, Tensor | None]]:
        """``(w13, w2, {w13_scale, w2_scale, w13_zeros, w2_zeros})`` for ``fused_moe``."""
        return self.w13, self.w2, {"w13_scale": self.w13_scale, "w2_scale": self.w2_scale,
                                   "w13_zeros": self.w13_zeros, "w2_zeros": self.w2_zeros}

    def forward(self, hidden_states: Tensor, top_k_index: Tensor,
                top_k_weights: Tensor) -> Tensor:
        """``hidden_states`` (T, H), ``top_k_index`` (T, k) expert ids, ``top_k_weights``
        (T, k) routing weights -> (T, H) in the input's dtype."""
        _check_inference(self, hidden_states)
        w13, w2, scales = self.operands()
        return fused_moe(hidden_states, w13, w2, top_k_weights, top_k_index,
                         activation=self.activation, backend=self.backend, **scales)

    def extra_repr(self) -> str:
        text = (f"experts={self.num_experts}, hidden={self.hidden_dim}, "
                f"intermediate={self.intermediate_dim}, quant={self.quant}, "
                f"activation={self.activation}")
        if self.quant == "int4":
            kind = "symmetric" if self.symmetric else "zero-point"
            text += f", group_size={self.group_size}, {kind}"
        return text


__all__ = ["FP8Linear", "Int4Linear", "QuantizedExperts", "QUANTIZED_LINEARS",
           "weight_bytes"]
